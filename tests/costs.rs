//! Exact cost as real providers answer (contract §3): `sheepdog worker` processes against a mock
//! that answers each model in its vendor's own `usage` shape, judged by what the mock itself
//! recorded and priced here from `prices.json`'s own figures, not by sheepdog's code.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use common::{job_line, TestEnv, WorkerProcess};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sheepdog::upstream::mock::{CallRecord, MockConfig, MockModel, UsageShape};

/// A model's prices straight from `prices.json`, read as exact decimals from the file's text.
struct ListPrice {
    input: Decimal,
    output: Decimal,
    cache_read: Decimal,
    cache_write: Decimal,
}

fn list_prices() -> HashMap<String, ListPrice> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/prices.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let exact = |v: &Value| {
        let text = v.to_string();
        if text.contains(['e', 'E']) {
            Decimal::from_scientific(&text).unwrap()
        } else {
            Decimal::from_str(&text).unwrap()
        }
    };
    v.as_object()
        .unwrap()
        .iter()
        .map(|(model, e)| {
            let input = exact(&e["input_cost_per_token"]);
            let price = ListPrice {
                input,
                output: exact(&e["output_cost_per_token"]),
                cache_read: e.get("cache_read_input_token_cost").map(exact).unwrap_or(input),
                cache_write: e.get("cache_creation_input_token_cost").map(exact).unwrap_or(input),
            };
            (model.clone(), price)
        })
        .collect()
}

/// What a call the mock answered costs, by the contract's formula.
fn priced(p: &ListPrice, c: &CallRecord) -> Decimal {
    let uncached = c.prompt_tokens - c.cached_tokens - c.cache_write_tokens;
    (p.input * Decimal::from(uncached)
        + p.cache_read * Decimal::from(c.cached_tokens)
        + p.cache_write * Decimal::from(c.cache_write_tokens)
        + p.output * Decimal::from(c.completion_tokens))
    .normalize()
}

const REASONING: &[&str] = &["o3", "o4-mini", "deepseek-reasoner"];

/// Each model's answers in its vendor's shape, with cache reads everywhere, cache writes where
/// the vendor has them, and reasoning tokens where the model reasons.
fn vendors_mock() -> MockConfig {
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "claude-sonnet-4.5".to_string(),
        MockModel {
            cache_write_percent: Some(20),
            ..Default::default()
        },
    );
    models.insert(
        "gemini-2.5-flash".to_string(),
        MockModel {
            reasoning_percent: Some(40),
            ..Default::default()
        },
    );
    // Anthropic's own shape (`input_tokens` = the uncached part only), for one model.
    models.insert(
        "gpt-4.1".to_string(),
        MockModel {
            usage_shape: Some(UsageShape::AnthropicNative),
            cache_write_percent: Some(10),
            ..Default::default()
        },
    );
    MockConfig {
        cached_percent: 50,
        latency_ms_min: 5,
        latency_ms_max: 40,
        models,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vendors_usage_is_priced_exactly_and_reasoning_models_get_their_bound() {
    let env = TestEnv::new(vendors_mock()).await;
    let models = [
        "gpt-4o-mini",
        "gpt-4.1",
        "deepseek-v3.2",
        "deepseek-reasoner",
        "claude-sonnet-4.5",
        "gemini-2.5-flash",
        "o4-mini",
        "o3",
    ];
    // Per model: jobs with no maximum, with `max_tokens` (an old habit) and with
    // `max_completion_tokens`.
    let mut lines = Vec::new();
    let mut bound_of = HashMap::new();
    for m in models {
        for i in 0..12 {
            let id = format!("{m}-{i:02}");
            let text = format!("Question {i} for {m}: {}", "explain the tides. ".repeat(i % 5 + 1));
            let mut l = job_line(&id, m, &text);
            let body = l["body"].as_object_mut().unwrap();
            body.remove("max_tokens");
            let bound = match i % 3 {
                0 => None,
                1 => {
                    body.insert("max_tokens".into(), json!(25));
                    Some(("max_tokens", 25))
                }
                _ => {
                    body.insert("max_completion_tokens".into(), json!(30));
                    Some(("max_completion_tokens", 30))
                }
            };
            bound_of.insert(text.chars().take(200).collect::<String>(), (m, bound));
            lines.push(l);
        }
    }
    let n = lines.len() as i64;
    env.enqueue_lines("vendors", &lines).await;
    let _workers = WorkerProcess::start_many(&env, 2, &[]);
    let status = env.wait_batch("vendors", Duration::from_secs(120)).await;
    assert_eq!(
        (status.succeeded, status.failed),
        (n, 0),
        "every job succeeds, reasoning models included"
    );

    let calls = env.mock.state.calls();
    assert_eq!(calls.len() as i64, n, "one call per job: none refused by the upstream");
    assert!(calls.iter().all(|c| c.status == 200));

    // What the upstream saw: reasoning models never `max_tokens`, always their bound under
    // `max_completion_tokens`; the others what the producer wrote, or the default `max_tokens`.
    for c in &calls {
        let (model, bound) = bound_of[&c.content];
        assert_eq!(c.model, model);
        let sent = (c.max_tokens, c.max_completion_tokens);
        if REASONING.contains(&model) {
            let want = bound.map_or(4096, |b| b.1);
            assert_eq!(sent, (None, Some(want)), "{model}: {}", c.content);
        } else {
            let want = match bound {
                None => (Some(4096), None),
                Some(("max_tokens", b)) => (Some(b), None),
                Some((_, b)) => (None, Some(b)),
            };
            assert_eq!(sent, want, "{model}: {}", c.content);
        }
    }

    // The ledger: every call at the usage the upstream reported, priced exactly.
    let prices = list_prices();
    let by_request: HashMap<&str, &CallRecord> = calls.iter().map(|c| (c.request_id.as_str(), c)).collect();
    type Row = (String, String, Decimal, Decimal, i64, i64, i64, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT l.model, l.upstream_request_id, l.cost_usd, c.reserved_cost_usd, l.prompt_tokens,
                l.completion_tokens, l.cached_tokens, l.cache_write_tokens, l.reasoning_tokens
           FROM sheepdog.llm_calls l
           JOIN sheepdog.calls c USING (batch_id, custom_id, attempt)
          WHERE l.batch_id = 'vendors'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, n);
    let mut ledger: BTreeMap<String, (Decimal, Decimal, Decimal)> = BTreeMap::new();
    for (model, request_id, cost, reserved, prompt, completion, cached, written, reasoning) in rows {
        let rec = by_request[request_id.as_str()];
        assert_eq!(
            (prompt, completion, cached, written, reasoning),
            (
                rec.prompt_tokens as i64,
                rec.completion_tokens as i64,
                rec.cached_tokens as i64,
                rec.cache_write_tokens as i64,
                rec.reasoning_tokens as i64
            ),
            "{model}: the ledger's tokens are the upstream's"
        );
        let exact = priced(&prices[&model], rec);
        assert_eq!(cost, exact, "{model} {request_id}: the ledger's cost");
        assert!(cost <= reserved, "{model}: {cost} within its reservation {reserved}");
        // What the ledger charged before: every prompt token at the input price (cache fields
        // other than OpenAI's unread, Gemini's thoughts missed).
        let naive = prices[&model].input * Decimal::from(rec.prompt_tokens)
            + prices[&model].output * Decimal::from(rec.completion_tokens);
        let e = ledger.entry(model).or_default();
        e.0 += cost;
        e.1 += exact;
        e.2 += naive;
    }
    println!("model: ledger / priced from the mock's usage / every prompt token at the input price");
    for (model, (stored, exact, naive)) in &ledger {
        println!(
            "  {model:<18} {} / {} / {}",
            stored.normalize(),
            exact.normalize(),
            naive.normalize()
        );
        assert_eq!(stored, exact, "{model}");
    }
    for m in ["deepseek-v3.2", "claude-sonnet-4.5", "gpt-4.1"] {
        assert_ne!(ledger[m].1, ledger[m].2, "{m}: the cache fields change the cost");
    }
    assert!(calls
        .iter()
        .any(|c| c.model == "gemini-2.5-flash" && c.reasoning_tokens > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_currency_shows_beside_usd() {
    let env = TestEnv::new(common::mock_latency(5, 20)).await;
    let mut table: Value = serde_json::from_str(sheepdog::prices::BUILT_IN).unwrap();
    table["sheepdog"] = json!({"currency": "CNY", "per_usd": "7.12"});
    let path = std::env::temp_dir().join(format!("{}-prices.json", env.name));
    std::fs::write(&path, table.to_string()).unwrap();
    env.enqueue_lines("yuan", &common::small_lines(30, "y")).await;
    let _worker = WorkerProcess::start(&env, &[("SHEEPDOG_PRICES", path.display().to_string())]);
    let status = env.wait_batch("yuan", Duration::from_secs(60)).await;
    assert_eq!(status.succeeded, 30);
    let rate = Decimal::from_str("7.12").unwrap();

    // The view.
    let (usd, charged, currency): (Decimal, Decimal, String) = sqlx::query_as(
        "SELECT sum(cost_usd), sum(cost_charged), min(currency) FROM sheepdog.cost_daily WHERE batch_id = 'yuan'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(usd > Decimal::ZERO);
    assert_eq!((charged, currency.as_str()), (usd * rate, "CNY"));

    // The commands.
    let out = env.cli(&["report", "--batch", "yuan", "--format", "json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let charged_total = Decimal::from_str(report["total"]["charged"]["CNY"].as_str().unwrap()).unwrap();
    assert_eq!(charged_total, usd * rate);
    assert_eq!(report["rows"][0]["currency"], "CNY");

    let out = env.cli(&["status", "--batch", "yuan", "--json"]).await;
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cost = Decimal::from_str(s["cost_usd"].as_str().unwrap()).unwrap();
    let charged = Decimal::from_str(s["cost_charged"].as_str().unwrap()).unwrap();
    assert_eq!((charged, s["currency"].as_str()), (cost * rate, Some("CNY")));
    assert_eq!(cost, usd);

    let out = env.cli(&["batch", "show", "yuan"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("charged (CNY)")).expect(&text);
    assert!(line.contains(&(usd * rate).normalize().to_string()), "{line}");

    let out = env.cli(&["report", "--batch", "yuan"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(text.contains("CNY"));
    let _ = std::fs::remove_file(&path);
}

/// `n` jobs over three vendors' models, the same shape for every batch (prompts of a few
/// sentences, `max_tokens` 40), told apart by `prefix`.
fn estimate_lines(n: usize, prefix: &str) -> Vec<Value> {
    let models = ["gpt-4o-mini", "deepseek-v3.2", "claude-sonnet-4.5"];
    (0..n)
        .map(|i| {
            let text = format!(
                "{prefix} question {i}: {}",
                "summarise the history of the harbour town in two lines. ".repeat(i % 4 + 1)
            );
            let mut l = job_line(&format!("{prefix}-{i:04}"), models[i % models.len()], &text);
            l["body"]["max_tokens"] = 40.into();
            l
        })
        .collect()
}

fn write_lines(env: &TestEnv, name: &str, lines: &[Value]) -> String {
    let path = std::env::temp_dir().join(format!("{}-{name}.jsonl", env.name));
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_estimate_matches_what_the_batch_then_costs_and_takes() {
    let env = TestEnv::new(MockConfig {
        cached_percent: 20,
        latency_ms_min: 80,
        latency_ms_max: 200,
        ..Default::default()
    })
    .await;
    // Workers first, then the limit, as users do.
    let _workers = WorkerProcess::start_many(&env, 2, &[]);
    let out = env.cli(&["limits", "set", "--rpm", "600"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A first batch gives the ledger its history.
    let first = write_lines(&env, "first", &estimate_lines(150, "first"));
    let out = env.cli(&["enqueue", &first, "--batch", "first", "--quiet"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_batch("first", Duration::from_secs(120)).await;

    // The dry run of a second of the same shape publishes and records nothing.
    let second = write_lines(&env, "second", &estimate_lines(240, "second"));
    let calls_before = env.mock.state.call_count();
    let out = env
        .cli(&["enqueue", &second, "--batch", "second", "--dry-run", "--json"])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object on one line: {stdout}");
    let e: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        env.queue_depth(sheepdog::amqp::JOBS_QUEUE).await,
        0,
        "nothing published"
    );
    for table in ["jobs", "batches", "calls", "backlog"] {
        let n = env
            .count(&format!(
                "SELECT count(*) FROM sheepdog.{table} WHERE batch_id = 'second'"
            ))
            .await;
        assert_eq!(n, 0, "nothing recorded in {table}");
    }
    assert_eq!(env.mock.state.call_count(), calls_before);
    assert_eq!((e["lines"].as_u64(), e["accepted"].as_u64()), (Some(240), Some(240)));
    assert_eq!(e["binding_limit"], "* rpm 600", "{e}");

    // Then the real thing.
    let started = std::time::Instant::now();
    let out = env.cli(&["enqueue", &second, "--batch", "second", "--quiet"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_batch("second", Duration::from_secs(120)).await;
    let took = started.elapsed().as_secs_f64();
    let cost: Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM sheepdog.llm_calls WHERE batch_id = 'second'")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    let expected = Decimal::from_str(e["expected_usd"].as_str().unwrap()).unwrap();
    let worst = Decimal::from_str(e["worst_case_usd"].as_str().unwrap()).unwrap();
    let eta = e["eta_seconds"].as_f64().expect("an ETA");
    let off = |a: f64, b: f64| (a - b).abs() / b;
    let cost_f: f64 = cost.to_string().parse().unwrap();
    let expected_f: f64 = expected.to_string().parse().unwrap();
    println!(
        "estimate: expected {expected} USD, worst case {worst} USD, ETA {eta} s ({}); real: {cost} USD, {took:.1} s",
        e["binding_limit"]
    );
    println!(
        "expected off by {:.1}% of the real cost; ETA off by {:.1}% of the real time",
        off(expected_f, cost_f) * 100.0,
        off(eta, took) * 100.0
    );
    assert!(off(expected_f, cost_f) <= 0.25, "expected within 25% of the real cost");
    assert!(worst >= cost, "the worst case is never below the real cost");
    assert!(off(eta, took) <= 0.35, "ETA within 35% of the real time");
}
