//! `sheepdog enqueue FILE --batch ID --dry-run [--json]` (contract §11): every line checked as a
//! real `enqueue` checks it, then what the batch would cost and when it would be done at the
//! limits in force now. Publishes nothing and records nothing: it only reads Postgres.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;

use rust_decimal::Decimal;
use serde::Serialize;

use super::enqueue::{EnqueueArgs, Line, Lines, Refused};
use crate::estimate::{self, History, JobFigures, Lane};
use crate::prices::PriceTable;
use crate::store::Priority;

/// The estimate, as `--json` prints it (one object on one line).
#[derive(Debug, Serialize)]
pub struct Estimate {
    pub batch_id: String,
    pub dry_run: bool,
    /// Lines read (blank lines aside): accepted and refused.
    pub lines: u64,
    pub accepted: u64,
    pub refused: Vec<RefusedLine>,
    pub prompt_tokens: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub worst_case_usd: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub expected_usd: Decimal,
    pub eta_seconds: Option<f64>,
    pub binding_limit: String,
    pub assumptions: Vec<String>,
    pub warnings: Vec<String>,
    pub models: Vec<Lane>,
    #[serde(skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    pub expected_charged: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RefusedLine {
    pub line: u64,
    pub reason: String,
}

impl From<Refused> for RefusedLine {
    fn from(r: Refused) -> Self {
        RefusedLine {
            line: r.line,
            reason: r.reason,
        }
    }
}

/// Runs the dry run; exit code 3 when lines were refused, as `enqueue` would.
pub async fn dry_run(a: &EnqueueArgs) -> anyhow::Result<ExitCode> {
    let pool = super::open_db(&a.db).await?;
    let prices = PriceTable::load(a.pricing.prices.as_deref())?;
    let e = estimate(&pool, a, &prices).await?;
    if a.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        for r in &e.refused {
            eprintln!("line {}: refused: {}", r.line, r.reason);
        }
        print!("{}", render(&e));
    }
    Ok(if e.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

async fn estimate(pool: &sqlx::PgPool, a: &EnqueueArgs, prices: &PriceTable) -> anyhow::Result<Estimate> {
    let bar = super::enqueue::progress_bar(&a.file, !a.quiet && !a.json, "estimate");
    let default_max_tokens = a.pricing.default_max_tokens;
    let mut histories: HashMap<String, Option<History>> = HashMap::new();
    let mut lanes: BTreeMap<String, Lane> = BTreeMap::new();
    let mut refused = Vec::new();
    for line in Lines::open(&a.file, &a.batch, a.message.max_message_bytes, &bar)? {
        let (p, job) = match line? {
            Line::Refused(r) => {
                refused.push(r.into());
                continue;
            }
            Line::Valid(v) => *v,
        };
        let Some(price) = prices.get(&job.model) else {
            refused.push(RefusedLine {
                line: p.line,
                reason: format!(
                    "model {:?} has no price in the price file: a worker would fail it (unknown_model) before any call",
                    job.model
                ),
            });
            continue;
        };
        if !histories.contains_key(&job.model) {
            let h = estimate::history(pool, &job.model).await?;
            histories.insert(job.model.clone(), h);
        }
        let f = JobFigures::of(&job, price, default_max_tokens, histories[&job.model].as_ref());
        lanes
            .entry(job.model.clone())
            .or_insert_with(|| Lane::new(&job.model))
            .add(&f);
    }
    bar.finish_and_clear();
    let lanes: Vec<Lane> = lanes.into_values().collect();

    let mut assumptions = Vec::new();
    for lane in &lanes {
        match &histories[&lane.model] {
            None => assumptions.push(format!(
                "{}: no successful call in the ledger's last week; completions are assumed to use half their bound",
                lane.model
            )),
            Some(h) => assumptions.push(format!(
                "{}: {:.0} completion tokens per call and {:.0}% of the prompt read from the cache, as its last {} calls",
                lane.model,
                h.avg_completion_tokens,
                h.cached_share * 100.0,
                h.calls
            )),
        }
    }
    assumptions.push(
        "prompt tokens are estimated with o200k_base and OpenAI's chat framing; models of other vendors count the same text their own way"
            .into(),
    );

    // The batch as it would be: the settings given here, else those it has already.
    let existing = crate::store::batches::show(pool, &a.batch).await?;
    let settings = a.settings.settings();
    let priority = settings
        .priority
        .map(|p| p.level())
        .or_else(|| existing.as_ref().map(|b| Priority::from_name(&b.priority).level()))
        .unwrap_or(1);
    let cap_left = match (settings.max_cost_usd, &existing) {
        (Some(c), _) if c.is_zero() => None,
        (Some(c), b) => Some(c - b.as_ref().map_or(Decimal::ZERO, |b| b.cost_usd)),
        (None, Some(b)) => b.max_cost_usd.map(|c| c - b.cost_usd),
        (None, None) => None,
    };

    let mut c = estimate::conditions(pool).await?;
    assumptions.extend(c.assumptions.iter().cloned());
    let mut warnings = Vec::new();
    if c.capacity.slots == 0 {
        // Planned before the workers start: time it as one replica at the default concurrency.
        let concurrency = crate::config::defaults::<crate::config::WorkerArgs>().concurrency;
        c.capacity.replicas = 1;
        c.capacity.slots = u64::from(concurrency);
        warnings.push("no worker is running now: nothing is called until one starts".to_string());
        assumptions.push(format!(
            "the time to finish assumes one replica at the default concurrency ({concurrency}) once one starts"
        ));
    }
    let per_job: HashMap<&str, f64> = lanes
        .iter()
        .map(|l| {
            let own = l.expected_tokens as f64 / l.jobs.max(1) as f64;
            let h = histories[&l.model].as_ref().map(|h| h.avg_tokens);
            (l.model.as_str(), h.unwrap_or(own))
        })
        .collect();
    let ahead = estimate::ahead(&a.batch, priority, &lanes, &c.waiting, |m| {
        per_job.get(m).copied().unwrap_or(0.0)
    });
    let eta = estimate::eta(&lanes, &ahead, &c.limits, &c.capacity, cap_left);
    warnings.extend(eta.warnings.iter().cloned());
    if let (Some(window), Some(secs)) = (settings.completion_window, eta.seconds) {
        if secs > window.as_secs_f64() {
            warnings.push(format!(
                "it would finish after its completion window ({:.0} s): the jobs still waiting then end expired",
                window.as_secs_f64()
            ));
        }
    }

    let expected: Decimal = lanes.iter().map(|l| l.expected_usd).sum();
    let currency = prices.currency();
    let accepted = lanes.iter().map(|l| l.jobs).sum::<u64>();
    Ok(Estimate {
        batch_id: a.batch.clone(),
        dry_run: true,
        lines: accepted + refused.len() as u64,
        accepted,
        refused,
        prompt_tokens: lanes.iter().map(|l| l.prompt_tokens).sum(),
        worst_case_usd: lanes.iter().map(|l| l.worst_case_usd).sum::<Decimal>().normalize(),
        expected_usd: expected.normalize(),
        eta_seconds: eta.seconds,
        binding_limit: eta.binding,
        assumptions,
        warnings,
        models: lanes,
        expected_charged: (!currency.is_usd()).then(|| currency.charged(expected)),
        currency: (!currency.is_usd()).then(|| currency.code.clone()),
    })
}

fn render(e: &Estimate) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let money = |d: Decimal| d.round_dp(6).normalize().to_string();
    let _ = writeln!(
        o,
        "estimate for batch {} (dry run: nothing published, nothing recorded)",
        e.batch_id
    );
    let charged = match (&e.expected_charged, &e.currency) {
        (Some(c), Some(cur)) => format!("  (charged {} {cur})", money(*c)),
        _ => String::new(),
    };
    let eta = match e.eta_seconds {
        Some(s) if s >= 60.0 => format!("{} ({s:.0} s)", estimate::human_duration(s)),
        Some(s) => estimate::human_duration(s),
        None => "cannot finish as things stand".into(),
    };
    let rows = [
        (
            "lines",
            format!("{} ({} accepted, {} refused)", e.lines, e.accepted, e.refused.len()),
        ),
        ("prompt tokens", format!("{} (estimated)", e.prompt_tokens)),
        (
            "worst case",
            format!("{} USD (what budgets reserve)", money(e.worst_case_usd)),
        ),
        ("expected", format!("{} USD{charged}", money(e.expected_usd))),
        ("time to finish", eta),
        ("binding limit", e.binding_limit.clone()),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "  {k:<16} {v}");
    }
    if !e.models.is_empty() {
        let _ = writeln!(
            o,
            "\n  {:<20} {:>7} {:>12} {:>16} {:>16}",
            "model", "jobs", "prompt", "worst (USD)", "expected (USD)"
        );
        for l in &e.models {
            let _ = writeln!(
                o,
                "  {:<20} {:>7} {:>12} {:>16} {:>16}",
                l.model,
                l.jobs,
                l.prompt_tokens,
                money(l.worst_case_usd),
                money(l.expected_usd)
            );
        }
    }
    for (title, list) in [("warnings", &e.warnings), ("assumptions", &e.assumptions)] {
        if !list.is_empty() {
            let _ = writeln!(o, "\n  {title}:");
            for w in list.iter() {
                let _ = writeln!(o, "  - {w}");
            }
        }
    }
    o
}
