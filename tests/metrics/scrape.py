"""Parses a /metrics body (argv[1], a file) with the `prometheus_client` package's OpenMetrics
parser and checks it against what reads it: every metric the Grafana dashboard and the KEDA
trigger query, with its type and labels. Prints one JSON line (the families found); exits 1 with
the reasons when something is missing. Run by tests/metrics.rs from the venv `scripts/services`
makes."""
import json
import pathlib
import re
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent

# The families sheepdog exposes (README "Health and metrics"): type and label names.
EXPECTED = {
    "sheepdog_jobs": ("counter", {"outcome"}),
    "sheepdog_jobs_in_flight": ("gauge", set()),
    "sheepdog_upstream_calls": ("counter", {"outcome"}),
    "sheepdog_tokens": ("counter", {"model", "kind"}),
    "sheepdog_cost_usd": ("counter", {"model"}),
    "sheepdog_upstream_latency_seconds": ("histogram", set()),
    "sheepdog_backlog_jobs": ("gauge", set()),
    "sheepdog_breaker_state": ("gauge", {"scope", "state"}),
    "sheepdog_scope_held": ("gauge", {"scope", "kind"}),
    "sheepdog_limit": ("gauge", {"scope", "kind"}),
    "sheepdog_limit_used_last_minute": ("gauge", {"scope", "kind"}),
    "sheepdog_budget_left_usd": ("gauge", {"scope"}),
    "sheepdog_queue_depth": ("gauge", {"queue"}),
    "sheepdog_paused": ("gauge", set()),
    "sheepdog_up": ("gauge", {"part"}),
}
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


def queried():
    """(metric sample name, labels it is filtered or grouped by) of every query that reads us."""
    exprs = []
    grafana = json.loads((ROOT / "deploy/grafana/sheepdog.json").read_text())

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "expr" and isinstance(x, str):
                    exprs.append(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(grafana)
    keda = (ROOT / "deploy/k8s/base/scaledobject.yaml").read_text()
    exprs += re.findall(r"query:\s*(.+)", keda)
    out = []
    for e in exprs:
        for m in re.finditer(r"(sheepdog_[a-z_]+)(\{[^}]*\})?", e):
            labels = set(re.findall(r"([a-z_]+)\s*=~?", m.group(2) or ""))
            for by in re.findall(r"by \(([^)]*)\)", e):
                labels |= {x.strip() for x in by.split(",")}
            out.append((m.group(1), labels - {"instance", "namespace", "job", "pod"}))
    return out


def main():
    text = pathlib.Path(sys.argv[1]).read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    problems = []
    samples = {}
    for f in families.values():
        for s in f.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    for name, (typ, labels) in EXPECTED.items():
        f = families.get(name)
        if f is None:
            problems.append(f"no family {name}")
            continue
        if f.type != typ:
            problems.append(f"{name} is a {f.type}, not a {typ}")
        if not f.documentation:
            problems.append(f"{name} has no HELP")
        for s in f.samples:
            have = set(s.labels) - {"le"}
            if s.name.endswith("_created"):
                continue
            if have != labels:
                problems.append(f"{s.name} has labels {sorted(have)}, not {sorted(labels)}")
    latency = families.get("sheepdog_upstream_latency_seconds")
    if latency is not None:
        les = [float(s.labels["le"]) for s in latency.samples if s.name.endswith("_bucket")]
        if les != LATENCY_BUCKETS + [float("inf")]:
            problems.append(f"latency buckets {les}")
    for name, labels in queried():
        if name not in samples:
            problems.append(f"the dashboards query {name}, which /metrics does not expose")
        elif not labels <= samples[name] | {"le"}:
            problems.append(f"the dashboards use labels {sorted(labels)} of {name}; it has {sorted(samples[name])}")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(json.dumps({n: {"type": f.type, "samples": sorted({s.name for s in f.samples})} for n, f in families.items()}))


main()
