//! The pages, as maud templates. Each page's changing part is inside `#live`, which a few lines
//! of inline script fetch again every 3 s and swap in (no reload; `<noscript>` pages reload
//! themselves every 10 s instead). Action forms sit outside `#live`, so a refresh never resets
//! a form being filled in.

use axum::response::Html;
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use rust_decimal::Decimal;

use super::auth::Viewer;
use super::chart;
use crate::dead::DeadLetter;
use crate::limits::ScopeUsage;
use crate::store::batches::BatchObject;
use crate::store::dashboard::{Breaker, Failure, MinuteCount, Overview, RecentJob, ScopeMinute};
use crate::store::report::ModelCost;

/// A rendered page.
pub type Page = Html<String>;

pub const STATUSES: [&str; 9] = [
    "validating",
    "queued",
    "in_progress",
    "paused",
    "cancelling",
    "cancelled",
    "expired",
    "completed",
    "failed",
];

const CSS: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cfd8ea;text-decoration:none}header a:hover{color:#fff}header .brand{font-weight:700;color:#fff}
header .right{margin-left:auto;display:flex;gap:8px;align-items:center}
main{padding:16px;max-width:1200px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:18px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e3e6eb;text-align:left;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #e3e6eb;border-radius:6px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600}.card .k{color:#5b6475;font-size:12px}
.status{padding:1px 6px;border-radius:8px;font-size:12px;background:#e3e6eb}
.s-in_progress{background:#d6e6ff}.s-completed{background:#d5f2dc}.s-cancelled,.s-cancelling,.s-expired{background:#f8d7d7}.s-paused,.s-validating{background:#fdf0c4}.s-failed{background:#f8d7d7}
progress{width:160px}
.chart{background:#fff;border:1px solid #e3e6eb}.chart .bar{fill:#4d7cc7}.chart .limit{stroke:#c0392b;stroke-dasharray:4 3}
.chart .axis{font-size:10px;fill:#5b6475}.chart .axisline{stroke:#9aa3b2}
.bad{color:#b03a2e}.muted{color:#5b6475}.actions{display:flex;gap:8px;flex-wrap:wrap;margin:8px 0}
form.inline{display:inline}button{cursor:pointer}
.banner{background:#f8d7d7;border:1px solid #e0a4a4;padding:12px;border-radius:6px}
"#;

/// Fetches the page again every 3 s and swaps its `#live` part in: no reload, no flicker. A
/// 503 page's `#live` says the database is unreachable; the next good answer swaps it back.
const LIVE_JS: &str = r#"
(function(){
  var live=document.getElementById('live');
  if(!live||live.dataset.refresh!=='1')return;
  function tick(){
    fetch(location.href,{credentials:'same-origin',cache:'no-store'}).then(function(r){return r.text();})
    .then(function(t){
      var d=new DOMParser().parseFromString(t,'text/html');
      var n=d.getElementById('live');
      if(n){live.innerHTML=n.innerHTML;}
      document.getElementById('stale').hidden=true;
    }).catch(function(){document.getElementById('stale').hidden=false;})
    .finally(function(){setTimeout(tick,3000);});
  }
  setTimeout(tick,3000);
})();
"#;

fn layout(viewer: &Viewer, title: &str, refresh: bool, live: Markup, after: Markup) -> Page {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sheepdog" }
                @if refresh { noscript { meta http-equiv="refresh" content="10"; } }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    a.brand href="/" { "sheepdog" }
                    a href="/" { "Overview" }
                    a href="/batches" { "Batches" }
                    a href="/limits" { "Limits" }
                    a href="/dead" { "Dead letters" }
                    span.right {
                        span #stale hidden { "⚠ not refreshing" }
                        @if let Some(csrf) = &viewer.csrf {
                            span { "signed in" }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Sign out" }
                            }
                        } @else if viewer.actions_enabled {
                            a href="/login" { "Sign in" }
                        } @else {
                            span.muted title="SHEEPDOG_DASHBOARD_TOKEN is not set" { "read-only" }
                        }
                    }
                }
                main {
                    div #live data-refresh=(if refresh { "1" } else { "0" }) { (live) }
                    (after)
                }
                script { (PreEscaped(LIVE_JS)) }
            }
        }
    };
    Html(page.into_string())
}

pub fn error_page(code: u16, title: &str, text: &str) -> Page {
    let viewer = Viewer {
        actions_enabled: false,
        csrf: None,
    };
    // A 503 keeps refreshing: the page comes back by itself when the database does.
    layout(
        &viewer,
        title,
        code == 503,
        html! {
            h1 { (title) }
            div.banner #error data-code=(code) { (text) }
        },
        html! {},
    )
}

fn money(d: Decimal) -> String {
    let r = d.round_dp(6).normalize();
    format!("${r}")
}

fn when(t: Option<i64>) -> String {
    t.and_then(|t| DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "–".into())
}

fn when_dt(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "–".into())
}

/// Percent-encodes a batch id for a path segment.
pub fn path_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ended(b: &BatchObject) -> i64 {
    b.request_counts.completed + b.request_counts.failed + b.cancelled + b.expired
}

/// Time left at the pace so far, for a batch in progress.
fn eta(b: &BatchObject) -> String {
    if b.status != "in_progress" {
        return "–".into();
    }
    let done = ended(b);
    let left = b.request_counts.total - done;
    let elapsed = Utc::now().timestamp() - b.created_at;
    if done <= 0 || elapsed <= 0 || left <= 0 {
        return "–".into();
    }
    let secs = left as f64 * elapsed as f64 / done as f64;
    duration(secs)
}

fn duration(secs: f64) -> String {
    let s = secs.round() as i64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

fn status_badge(s: &str) -> Markup {
    html! { span class=(format!("status s-{s}")) data-status=(s) { (s) } }
}

fn card(k: &str, v: Markup) -> Markup {
    html! { div.card { div.v { (v) } div.k { (k) } } }
}

pub fn overview(
    viewer: &Viewer,
    o: &Overview,
    minutes: &[MinuteCount],
    usage: &[ScopeUsage],
    breakers: &[Breaker],
    dead: Option<u32>,
    intake: Option<u32>,
) -> Page {
    let per_min: Vec<f64> = minutes.iter().map(|m| (m.ok + m.error) as f64).collect();
    let hour_total: f64 = per_min.iter().sum();
    let star = usage.iter().find(|u| u.scope == "*");
    let depth = |d: Option<u32>| match d {
        Some(n) => html! { (n) },
        None => html! { span.muted { "unknown" } },
    };
    let live = html! {
        h1 { "Overview" }
        div.cards {
            (card("jobs/s now (last 10 s)", html! { span #rate-now { (format!("{:.1}", o.ok_last_10s as f64 / 10.0)) } }))
            (card("jobs/s, last hour", html! { (format!("{:.2}", hour_total / 3600.0)) }))
            (card("calls in flight", html! { span #in-flight { (o.in_flight) } }))
            (card("backlog (waiting in Postgres)", html! { span #backlog { (o.backlog) } }))
            (card("intake queue (RabbitMQ)", depth(intake)))
            (card("dead letters", html! { span #dead-depth { (depth(dead)) } }))
            (card("spent today (UTC)", html! { (money(o.spent_today_usd)) }))
            @if let Some(currency) = o.currency.as_ref().filter(|c| c.as_str() != "USD") {
                (card(&format!("charged today ({currency})"), html! { span #charged-today { (o.charged_today.round_dp(6).normalize()) } }))
            }
            @if let Some(u) = star {
                @if let Some(b) = u.budget_usd {
                    (card(&format!("budget per {} ({})", u.budget_period, u.budget_period_key),
                          html! { (money(u.budget_spent_usd + u.budget_reserved_usd)) " of " (money(b)) }))
                } @else {
                    (card("budget", html! { span.muted { "none set" } }))
                }
            }
            (card("batches not finished", html! { (o.batches_active) }))
        }
        h2 { "Calls ended per minute, last hour" }
        (chart::bars("calls ended per minute", &per_min, None,
            &minutes.first().map(|m| m.minute.format("%H:%M").to_string()).unwrap_or_default(),
            &minutes.last().map(|m| m.minute.format("%H:%M UTC").to_string()).unwrap_or_default(), "calls"))
        h2 { "Breakers and pauses" }
        (scope_states(usage, breakers))
    };
    layout(viewer, "Overview", true, live, html! {})
}

fn scope_states(usage: &[ScopeUsage], breakers: &[Breaker]) -> Markup {
    html! {
        table {
            tr { th { "scope" } th { "breaker" } th { "since / reason" } th { "paused until" } th { "pause reason" } }
            @for u in usage {
                @let b = breakers.iter().find(|b| b.scope == u.scope);
                tr {
                    td { (u.scope) }
                    td { @match b { Some(b) if b.state != "closed" => { span.bad { (b.state) } }, _ => { "closed" } } }
                    td { @if let Some(b) = b.filter(|b| b.state != "closed") { (b.reason.clone().unwrap_or_default()) " (trips " (b.trips) ", open until " (when_dt(b.open_until)) ")" } }
                    td { @if let Some(p) = u.paused_until { span.bad { (when_dt(Some(p))) } } @else { "–" } }
                    td { (u.pause_reason.clone().unwrap_or_default()) }
                }
            }
            @for b in breakers.iter().filter(|b| !usage.iter().any(|u| u.scope == b.scope)) {
                tr { td { (b.scope) } td { (b.state) } td { (b.reason.clone().unwrap_or_default()) } td { "–" } td {} }
            }
        }
    }
}

fn progress(b: &BatchObject) -> Markup {
    let done = ended(b);
    let total = b.request_counts.total.max(done);
    html! {
        progress value=(done) max=(total.max(1)) data-batch=(b.id) {}
        " " span.ended data-value=(done) { (done) } " / " (total)
    }
}

pub fn batches(
    viewer: &Viewer,
    rows: &[BatchObject],
    status: Option<&str>,
    page: i64,
    page_size: usize,
    total_batches: i64,
) -> Page {
    let more = rows.len() > page_size;
    let rows = &rows[..rows.len().min(page_size)];
    let link = |p: i64| match status {
        Some(s) => format!("/batches?status={s}&page={p}"),
        None => format!("/batches?page={p}"),
    };
    let live = html! {
        h1 { "Batches" span.muted { " (" (total_batches) " in all)" } }
        div.actions {
            a href="/batches" { @if status.is_none() { b { "all" } } @else { "all" } }
            @for s in STATUSES {
                a href=(format!("/batches?status={s}")) { @if status == Some(s) { b { (s) } } @else { (s) } }
            }
        }
        table #batches {
            tr { th { "batch" } th { "status" } th { "progress" } th.num { "failed" } th.num { "cost" }
                 th { "ETA" } th { "priority" } th.num { "cap" } th { "deadline (UTC)" } th { "created (UTC)" } }
            @for b in rows {
                tr data-batch=(b.id) {
                    td { a href=(format!("/batches/{}", path_escape(&b.id))) { (b.id) } }
                    td { (status_badge(&b.status)) }
                    td { (progress(b)) }
                    td.num { (b.request_counts.failed) }
                    td.num { (money(b.cost_usd)) }
                    td { (eta(b)) }
                    td { (b.priority) }
                    td.num { (b.max_cost_usd.map(money).unwrap_or_else(|| "–".into())) }
                    td { (when(b.expires_at)) }
                    td { (when(Some(b.created_at))) }
                }
            }
        }
        @if rows.is_empty() { p.muted { "No batches here." } }
        div.actions {
            @if page > 0 { a href=(link(page - 1)) { "← newer" } }
            span.muted { "page " (page + 1) }
            @if more { a href=(link(page + 1)) { "older →" } }
        }
    };
    layout(viewer, "Batches", true, live, html! {})
}

pub fn batch(
    viewer: &Viewer,
    b: &BatchObject,
    models: &[ModelCost],
    latency: (Option<f64>, Option<f64>, Option<f64>),
    failures: &[Failure],
    recent: &[RecentJob],
    estimate: Option<&crate::estimate::Running>,
) -> Page {
    let c = &b.request_counts;
    let waiting = (c.total - ended(b) - b.in_flight).max(0);
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "–".into());
    let live = html! {
        h1 { "Batch " (b.id) " " (status_badge(&b.status)) }
        p { (progress(b)) " ended · ETA " (eta(b)) }
        div.cards {
            (card("total", html! { span #total { (c.total) } }))
            (card("succeeded", html! { span #succeeded { (c.completed) } }))
            (card("failed", html! { span #failed { (c.failed) } }))
            (card("cancelled", html! { span #cancelled { (b.cancelled) } }))
            (card("expired", html! { (b.expired) }))
            (card("in flight", html! { (b.in_flight) }))
            (card("waiting", html! { (waiting) }))
            (card("cost", html! { (money(b.cost_usd)) }))
            @if let (Some(charged), Some(currency)) = (b.cost_charged, &b.currency) {
                (card(&format!("charged ({currency})"), html! { span #charged { (charged.round_dp(6).normalize()) } }))
            }
            @if let Some(e) = estimate {
                (card("expected total", html! { span #expected-total title=(e.assumptions.join("; ")) {
                    (money(b.cost_usd + e.expected_rest_usd)) } " "
                    span.muted { "(" (money(e.expected_rest_usd)) " for " (e.jobs_left) " left)" } }))
                (card("ETA at the limits", html! { span #estimate-eta {
                    @match e.eta.seconds { Some(s) => (crate::estimate::human_duration(s)), None => "–" }
                    " " span.muted { "(" (e.eta.binding) ")" } } }))
            }
            (card("priority", html! { span #priority { (b.priority) } }))
            (card("cap", html! { (b.max_cost_usd.map(money).unwrap_or_else(|| "none".into())) }))
            (card("deadline (UTC)", html! { (when(b.expires_at)) }))
            (card("latency p50 / p95 / p99", html! { (ms(latency.0)) " / " (ms(latency.1)) " / " (ms(latency.2)) }))
        }
        h2 { "Cost and tokens by model" }
        table {
            tr { th { "model" } th.num { "calls" } th.num { "prompt tokens" } th.num { "completion tokens" } th.num { "cost" } }
            @for m in models {
                tr { td { (m.model) } td.num { (m.calls) } td.num { (m.prompt_tokens) } td.num { (m.completion_tokens) } td.num { (money(m.cost_usd)) } }
            }
        }
        h2 { "Failure reasons" }
        @if failures.is_empty() { p.muted { "None." } } @else {
            table {
                tr { th { "reason" } th.num { "jobs" } th { "for example" } }
                @for f in failures { tr { td { (f.reason) } td.num { (f.jobs) } td { code { (f.example) } } } }
            }
        }
        h2 { "Recent results" }
        table {
            tr { th { "custom_id" } th { "status" } th { "model" } th.num { "latency" } th.num { "cost" } th { "ended (UTC)" } th { "answer / error" } }
            @for j in recent {
                tr {
                    td { code { (j.custom_id) } } td { (j.status) } td { (j.model.clone().unwrap_or_default()) }
                    td.num { (j.latency_ms.map(|l| format!("{l} ms")).unwrap_or_else(|| "–".into())) }
                    td.num { (money(j.cost_usd)) } td { (when_dt(j.finished_at)) }
                    td.muted { (j.summary.clone().unwrap_or_default()) }
                }
            }
        }
    };
    let id = path_escape(&b.id);
    let after = html! {
        p { a href=(format!("/batches/{id}/export")) download { "Download the export (JSONL)" } }
        @if let Some(csrf) = viewer.csrf.as_ref().filter(|_| viewer.can_act()) {
            h2 { "Actions" }
            div.actions #actions {
                @for (action, label) in [("pause", "Pause"), ("resume", "Resume"), ("cancel", "Cancel batch")] {
                    form.inline method="post" action=(format!("/batches/{id}/{action}")) {
                        input type="hidden" name="csrf" value=(csrf);
                        button type="submit" id=(format!("action-{action}")) { (label) }
                    }
                }
                form.inline method="post" action=(format!("/batches/{id}/priority")) {
                    input type="hidden" name="csrf" value=(csrf);
                    select name="priority" {
                        @for p in ["high", "normal", "low"] { option value=(p) selected[p == b.priority] { (p) } }
                    }
                    button type="submit" id="action-priority" { "Set priority" }
                }
            }
        }
    };
    layout(viewer, &format!("Batch {}", b.id), true, live, after)
}

pub fn limits(viewer: &Viewer, usage: &[ScopeUsage], breakers: &[Breaker], minutes: &[ScopeMinute]) -> Page {
    let now = Utc::now();
    let series = |scope: &str, f: &dyn Fn(&ScopeMinute) -> f64| -> Vec<f64> {
        (0..30)
            .map(|i| {
                let m = now - chrono::Duration::minutes(29 - i);
                minutes
                    .iter()
                    .find(|x| x.scope == scope && x.minute.format("%H:%M").to_string() == m.format("%H:%M").to_string())
                    .map(f)
                    .unwrap_or(0.0)
            })
            .collect()
    };
    let first = (now - chrono::Duration::minutes(29)).format("%H:%M").to_string();
    let last = now.format("%H:%M UTC").to_string();
    let dec = |d: Option<Decimal>| {
        d.map(|d| d.normalize().to_string())
            .unwrap_or_else(|| "unlimited".into())
    };
    let f64_of = |d: Option<Decimal>| d.and_then(|d| d.to_string().parse::<f64>().ok());
    let live = html! {
        h1 { "Limits" }
        table {
            tr { th { "scope" } th.num { "rpm" } th.num { "tpm" } th.num { "requests, last min" } th.num { "tokens, last min" }
                 th { "budget" } th.num { "spent" } th.num { "reserved" } th.num { "left" } }
            @for u in usage {
                tr {
                    td { (u.scope) } td.num { (dec(u.rpm)) } td.num { (dec(u.tpm)) }
                    td.num { (u.requests_last_minute) } td.num { (u.tokens_last_minute.normalize()) }
                    td { @if let Some(b) = u.budget_usd { (money(b)) " per " (u.budget_period) " (" (u.budget_period_key) ")" } @else { "none" } }
                    td.num { (money(u.budget_spent_usd)) } td.num { (money(u.budget_reserved_usd)) }
                    td.num { (u.budget_left_usd.map(money).unwrap_or_else(|| "–".into())) }
                }
            }
        }
        h2 { "Breakers and pauses" }
        (scope_states(usage, breakers))
        @for u in usage {
            h2 { "Scope " code { (u.scope) } ": use per minute, last 30 minutes" }
            (chart::bars(&format!("{} requests per minute", u.scope), &series(&u.scope, &|m| m.requests as f64), f64_of(u.rpm), &first, &last, "requests"))
            " "
            (chart::bars(&format!("{} tokens per minute", u.scope), &series(&u.scope, &|m| m.tokens as f64), f64_of(u.tpm), &first, &last, "tokens"))
        }
        @if usage.is_empty() { p.muted { "No limits set: every scope is unlimited." } }
    };
    layout(viewer, "Limits", true, live, html! {})
}

pub fn dead(viewer: &Viewer, depth: u32, letters: &[DeadLetter]) -> Page {
    let mut by_reason: Vec<(String, usize, String)> = Vec::new();
    for l in letters {
        let reason = l.reason.clone().unwrap_or_else(|| "unknown".into());
        let example = format!(
            "{} / {}",
            l.batch_id.as_deref().unwrap_or("-"),
            l.custom_id.as_deref().unwrap_or("-")
        );
        match by_reason.iter_mut().find(|r| r.0 == reason) {
            Some(r) => r.1 += 1,
            None => by_reason.push((reason, 1, example)),
        }
    }
    by_reason.sort_by_key(|r| std::cmp::Reverse(r.1));
    let mut batches: Vec<(String, usize)> = Vec::new();
    for l in letters {
        let b = l.batch_id.clone().unwrap_or_default();
        match batches.iter_mut().find(|x| x.0 == b) {
            Some(x) => x.1 += 1,
            None => batches.push((b, 1)),
        }
    }
    let live = html! {
        h1 { "Dead letters" span.muted { " (" span #dead-total { (depth) } " in sheepdog.dead)" } }
        @if (letters.len() as u32) < depth { p.muted { "The first " (letters.len()) " are read for the table." } }
        h2 { "By reason" }
        table {
            tr { th { "reason" } th.num { "messages" } th { "for example (batch / custom_id)" } }
            @for (r, n, e) in &by_reason { tr { td { (r) } td.num { (n) } td { code { (e) } } } }
        }
        h2 { "By batch" }
        table {
            tr { th { "batch" } th.num { "messages" } @if viewer.can_act() { th {} } }
            @for (b, n) in &batches {
                tr {
                    td { (if b.is_empty() { "(unreadable)" } else { b }) } td.num { (n) }
                    @if let (true, Some(csrf)) = (viewer.can_act() && !b.is_empty(), &viewer.csrf) {
                        td { form.inline method="post" action="/dead/replay" {
                            input type="hidden" name="csrf" value=(csrf);
                            input type="hidden" name="batch" value=(b);
                            button type="submit" { "Replay" }
                        } }
                    } @else if viewer.can_act() { td {} }
                }
            }
        }
    };
    let after = html! {
        @if let (true, Some(csrf)) = (viewer.can_act(), &viewer.csrf) {
            @if depth > 0 {
                form method="post" action="/dead/replay" {
                    input type="hidden" name="csrf" value=(csrf);
                    p { button type="submit" id="replay-all" { "Replay all " (depth) " (after fixing their cause)" } }
                }
            }
        }
    };
    // Reading dead letters takes them off the queue for a moment: no automatic refresh here.
    layout(viewer, "Dead letters", false, live, after)
}

pub fn login(viewer: &Viewer, enabled: bool, refused: bool) -> Page {
    let live = html! {
        h1 { "Sign in" }
        @if !enabled {
            p { "This dashboard is read-only: start it with " code { "SHEEPDOG_DASHBOARD_TOKEN" } " set to allow actions." }
        } @else if viewer.csrf.is_some() {
            p { "You are signed in." }
        } @else {
            @if refused { p.bad #refused { "That is not the token." } }
            form method="post" action="/login" {
                label { "Token " input type="password" name="token" autocomplete="current-password" autofocus; }
                " " button type="submit" id="sign-in" { "Sign in" }
            }
        }
    };
    layout(viewer, "Sign in", false, live, html! {})
}
