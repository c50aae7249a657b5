//! What a batch will cost and when it will be done, before it runs (contract §11) and while it
//! runs (the dashboard). The arithmetic (`JobFigures`, `ahead`, `eta`) is pure and unit-tested;
//! `conditions`, `history` and `running` read its inputs through the store.
//!
//! - **Worst case**: what the budgets reserve before each call: the prompt reservation (the
//!   `o200k_base` estimate with its margin) at the dearest prompt price, plus the completion bound
//!   at the output price. The spend of one attempt per job never passes it.
//! - **Expected**: the prompt estimate, the share of prompts the model's recent calls read from
//!   the cache, and the completion tokens its recent calls returned on average (never more than
//!   the job's bound), from the ledger. A model without history is assumed to use half its bound,
//!   and the estimate says so.
//! - **Time to finish**: every limit in force now (requests and tokens per minute of `*` and of
//!   each model) against what must pass it before the batch is done: the batch's own jobs and
//!   those that wait ahead of them (all of higher priority; of equal priority, as many as the
//!   batch has, since equal batches take turns); and the replicas alive, at the mean length of a
//!   call. The slowest of these binds, and is named.

use std::collections::BTreeMap;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::job::Job;
use crate::prices::{Price, Usage};

/// The all-models scope.
const ALL: &str = "*";

/// Completion assumed for a model the ledger knows nothing of: this share of the job's bound.
const NO_HISTORY_SHARE: u32 = 2;
/// Length of a call assumed when the ledger has no finished call.
pub const ASSUMED_CALL_SECONDS: f64 = 2.0;

/// What the ledger says a model's recent calls used.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Calls it is drawn from.
    pub calls: u64,
    pub avg_completion_tokens: f64,
    /// Share of prompt tokens read from the cache.
    pub cached_share: f64,
    /// Prompt and completion tokens per call.
    pub avg_tokens: f64,
}

/// One job's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobFigures {
    /// The prompt as estimated (no margin).
    pub prompt_tokens: u64,
    pub worst_case_usd: Decimal,
    pub worst_case_tokens: u64,
    pub expected_usd: Decimal,
    pub expected_tokens: u64,
}

impl JobFigures {
    /// A job's worst case (as intake reserves it) and expected cost (from the model's history).
    pub fn of(job: &Job, price: &Price, default_max_tokens: u32, history: Option<&History>) -> JobFigures {
        let request = job.upstream_request(default_max_tokens, price.reasoning);
        let prompt = crate::tokens::prompt_tokens(&request.body);
        let reserved_prompt = crate::tokens::prompt_reservation(&job.model, prompt);
        let bound = u64::from(request.max_completion_tokens);
        let completion = match history.filter(|h| h.calls > 0) {
            Some(h) => (h.avg_completion_tokens.round().max(0.0) as u64).min(bound),
            None => bound / u64::from(NO_HISTORY_SHARE),
        };
        let cached = history.map_or(0, |h| (prompt as f64 * h.cached_share.clamp(0.0, 1.0)) as u64);
        let expected = Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            ..Default::default()
        };
        JobFigures {
            prompt_tokens: prompt,
            worst_case_usd: price.worst_case(reserved_prompt, bound),
            worst_case_tokens: reserved_prompt + bound,
            expected_usd: price.cost(&expected),
            expected_tokens: prompt + completion,
        }
    }
}

/// A model's jobs of the batch, summed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lane {
    pub model: String,
    pub jobs: u64,
    pub prompt_tokens: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub worst_case_usd: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub expected_usd: Decimal,
    pub expected_tokens: u64,
}

impl Lane {
    pub fn new(model: &str) -> Lane {
        Lane {
            model: model.to_string(),
            ..Default::default()
        }
    }

    pub fn add(&mut self, f: &JobFigures) {
        self.jobs += 1;
        self.prompt_tokens += f.prompt_tokens;
        self.worst_case_usd = (self.worst_case_usd + f.worst_case_usd).normalize();
        self.expected_usd = (self.expected_usd + f.expected_usd).normalize();
        self.expected_tokens += f.expected_tokens;
    }
}

/// Jobs of one batch waiting in one model's lane.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub model: String,
    pub batch_id: String,
    /// 2 high, 1 normal, 0 low.
    pub priority: i16,
    pub jobs: u64,
}

/// What must pass a model's lane before the batch's last job there.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ahead {
    pub jobs: u64,
    pub tokens: u64,
}

/// What waits ahead of the batch's jobs in each lane: every waiting job of higher priority, and
/// of each other batch of equal priority as many as the batch has there (they take turns).
pub fn ahead(
    batch_id: &str,
    priority: i16,
    lanes: &[Lane],
    waiting: &[Waiting],
    tokens_per_job: impl Fn(&str) -> f64,
) -> BTreeMap<String, Ahead> {
    let mut out = BTreeMap::new();
    for lane in lanes {
        let jobs: u64 = waiting
            .iter()
            .filter(|w| w.model == lane.model && w.batch_id != batch_id)
            .map(|w| match w.priority.cmp(&priority) {
                std::cmp::Ordering::Greater => w.jobs,
                std::cmp::Ordering::Equal => w.jobs.min(lane.jobs),
                std::cmp::Ordering::Less => 0,
            })
            .sum();
        let tokens = (jobs as f64 * tokens_per_job(&lane.model)).round() as u64;
        out.insert(lane.model.clone(), Ahead { jobs, tokens });
    }
    out
}

/// A scope's limits in force now.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// `*` or a model.
    pub scope: String,
    pub rpm: Option<Decimal>,
    pub tpm: Option<Decimal>,
    pub budget_left: Option<Decimal>,
}

/// The replicas alive and how long a call takes.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub replicas: u64,
    /// Calls they keep in flight together.
    pub slots: u64,
    pub call_seconds: f64,
}

/// When the batch will be done, and what decides it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Eta {
    /// `None` when it cannot finish as things stand (no replica, or money runs out first).
    pub seconds: Option<f64>,
    /// The scope and limit that sets it, e.g. `* rpm 600`, `gpt-4.1 tpm 30000`, `workers`.
    pub binding: String,
    pub warnings: Vec<String>,
}

fn money(d: Decimal) -> String {
    d.round_dp(6).normalize().to_string()
}

/// The time to finish the lanes at these limits, with what waits ahead and the replicas alive.
/// `cap_left` is what the batch may still spend under its cap.
pub fn eta(
    lanes: &[Lane],
    ahead: &BTreeMap<String, Ahead>,
    limits: &[Limits],
    capacity: &Capacity,
    cap_left: Option<Decimal>,
) -> Eta {
    let mut warnings = Vec::new();
    let ahead_of = |m: &str| ahead.get(m).copied().unwrap_or_default();
    let total_jobs: u64 = lanes.iter().map(|l| l.jobs + ahead_of(&l.model).jobs).sum();
    if lanes.iter().all(|l| l.jobs == 0) {
        return Eta {
            seconds: Some(0.0),
            binding: "nothing to do".into(),
            warnings,
        };
    }
    // The slowest of the limits and the replicas sets the time; money that runs out first means
    // the batch cannot finish in this period at all.
    let mut slowest: Option<(f64, String)> = None;
    let mut consider = |t: f64, what: String| {
        if slowest.as_ref().is_none_or(|(s, _)| t > *s) {
            slowest = Some((t, what));
        }
    };
    let mut stopped: Option<String> = None;
    for scope in limits {
        let in_scope: Vec<&Lane> = lanes
            .iter()
            .filter(|l| scope.scope == ALL || l.model == scope.scope)
            .collect();
        if in_scope.is_empty() {
            continue;
        }
        let requests: u64 = in_scope.iter().map(|l| l.jobs + ahead_of(&l.model).jobs).sum();
        let tokens: u64 = in_scope
            .iter()
            .map(|l| l.expected_tokens + ahead_of(&l.model).tokens)
            .sum();
        if let Some(rpm) = scope.rpm.and_then(|r| r.to_f64()).filter(|r| *r > 0.0) {
            consider(
                requests as f64 * 60.0 / rpm + capacity.call_seconds,
                format!("{} rpm {}", scope.scope, scope.rpm.unwrap_or_default().normalize()),
            );
        }
        if let Some(tpm) = scope.tpm.and_then(|t| t.to_f64()).filter(|t| *t > 0.0) {
            consider(
                tokens as f64 * 60.0 / tpm + capacity.call_seconds,
                format!("{} tpm {}", scope.scope, scope.tpm.unwrap_or_default().normalize()),
            );
        }
        if let Some(left) = scope.budget_left {
            let expected: Decimal = in_scope.iter().map(|l| l.expected_usd).sum();
            let worst: Decimal = in_scope.iter().map(|l| l.worst_case_usd).sum();
            if expected > left {
                warnings.push(format!(
                    "the expected cost ({} USD) passes what is left of the {} budget ({} USD): jobs will wait for the next period",
                    money(expected), scope.scope, money(left)
                ));
                stopped.get_or_insert(format!("{} budget", scope.scope));
            } else if worst > left {
                warnings.push(format!(
                    "the worst case ({} USD) passes what is left of the {} budget ({} USD): jobs may wait while calls in flight hold their reservations",
                    money(worst), scope.scope, money(left)
                ));
            }
        }
    }
    if let Some(left) = cap_left {
        let expected: Decimal = lanes.iter().map(|l| l.expected_usd).sum();
        let worst: Decimal = lanes.iter().map(|l| l.worst_case_usd).sum();
        if expected > left {
            warnings.push(format!(
                "the expected cost ({} USD) passes the batch's cap ({} USD left): its last jobs will wait until the cap is raised",
                money(expected),
                money(left)
            ));
            stopped.get_or_insert_with(|| "batch cap".into());
        } else if worst > left {
            warnings.push(format!(
                "the worst case ({} USD) passes the batch's cap ({} USD left): jobs may wait while calls in flight hold their reservations",
                money(worst),
                money(left)
            ));
        }
    }
    if capacity.slots == 0 {
        warnings.push("no worker is running: nothing is called until one starts".into());
        return Eta {
            seconds: None,
            binding: "workers: none running".into(),
            warnings,
        };
    }
    let waves = total_jobs.div_ceil(capacity.slots);
    consider(
        waves as f64 * capacity.call_seconds,
        format!(
            "workers: {} replica(s), {} calls in flight",
            capacity.replicas, capacity.slots
        ),
    );
    let (seconds, binding) = slowest.unwrap_or((0.0, "nothing".into()));
    match stopped {
        Some(what) => Eta {
            seconds: None,
            binding: what,
            warnings,
        },
        None => Eta {
            seconds: Some((seconds * 10.0).round() / 10.0),
            binding,
            warnings,
        },
    }
}

/// A duration as people read it: `45 s`, `12 min 30 s`, `3 h 5 min`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.round().max(0.0) as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The conditions in force now, as the estimate reads them from Postgres.
#[derive(Debug, Clone)]
pub struct Conditions {
    pub limits: Vec<Limits>,
    pub waiting: Vec<Waiting>,
    pub capacity: Capacity,
    /// What had to be assumed (no call in the ledger to time).
    pub assumptions: Vec<String>,
}

/// Reads the limits of every scope, what waits in the backlog, the replicas alive and the mean
/// length of a recent call.
pub async fn conditions(pool: &sqlx::PgPool) -> Result<Conditions, crate::store::StoreError> {
    let limits = crate::limits::usage_without_last_minute(pool)
        .await?
        .into_iter()
        .map(|u| Limits {
            scope: u.scope,
            rpm: u.rpm,
            tpm: u.tpm,
            budget_left: u.budget_left_usd,
        })
        .collect();
    let waiting = crate::store::estimate::waiting(pool)
        .await?
        .into_iter()
        .map(|(model, batch_id, priority, jobs)| Waiting {
            model,
            batch_id,
            priority,
            jobs: jobs.max(0) as u64,
        })
        .collect();
    let (replicas, slots) = crate::store::estimate::replicas(pool).await?;
    let mut assumptions = Vec::new();
    let call_seconds = match crate::store::estimate::call_seconds(pool).await? {
        Some(s) if s > 0.0 => s,
        _ => {
            assumptions.push(format!(
                "no finished call in the ledger to time: a call is assumed to take {ASSUMED_CALL_SECONDS} s"
            ));
            ASSUMED_CALL_SECONDS
        }
    };
    Ok(Conditions {
        limits,
        waiting,
        capacity: Capacity {
            replicas: replicas.max(0) as u64,
            slots: slots.max(0) as u64,
            call_seconds,
        },
        assumptions,
    })
}

/// The recent history of a model in the ledger, if it has any.
pub async fn history(pool: &sqlx::PgPool, model: &str) -> Result<Option<History>, crate::store::StoreError> {
    let rows = crate::store::estimate::history(pool, &[model.to_string()]).await?;
    Ok(rows
        .into_iter()
        .find(|r| r.1 > 0)
        .map(|(_, calls, completion, cached, tokens)| History {
            calls: calls as u64,
            avg_completion_tokens: completion,
            cached_share: cached,
            avg_tokens: tokens,
        }))
}

/// What is left of a running batch: its jobs not ended, what they are expected to cost, and
/// when it will be done at the limits in force now.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    pub jobs_left: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub expected_rest_usd: Decimal,
    pub eta: Eta,
    pub assumptions: Vec<String>,
}

/// The estimate of a batch that is still running: each model's jobs left at the mean cost and
/// tokens of the batch's own successful calls of that model so far (at their worst case where
/// it has none yet).
pub async fn running(
    pool: &sqlx::PgPool,
    batch_id: &str,
    priority: i16,
    cap_left: Option<Decimal>,
) -> Result<Running, crate::store::StoreError> {
    let mut assumptions = Vec::new();
    let mut lanes = Vec::new();
    for (model, jobs, worst_usd, worst_tokens, usd, tokens, calls) in
        crate::store::estimate::remaining(pool, batch_id).await?
    {
        let jobs = jobs.max(0) as u64;
        let (each_usd, each_tokens) = match (usd, tokens) {
            (Some(u), Some(t)) if calls > 0 => (u, t),
            _ => {
                assumptions.push(format!(
                    "{model}: no call of this batch has succeeded yet; its jobs are counted at their worst case"
                ));
                (worst_usd, worst_tokens)
            }
        };
        lanes.push(Lane {
            model,
            jobs,
            prompt_tokens: 0,
            worst_case_usd: worst_usd * Decimal::from(jobs),
            expected_usd: each_usd * Decimal::from(jobs),
            expected_tokens: (each_tokens * jobs as f64).round() as u64,
        });
    }
    let c = conditions(pool).await?;
    assumptions.extend(c.assumptions.iter().cloned());
    let per_job: BTreeMap<String, f64> = lanes
        .iter()
        .map(|l| (l.model.clone(), l.expected_tokens as f64 / l.jobs.max(1) as f64))
        .collect();
    let ahead = ahead(batch_id, priority, &lanes, &c.waiting, |m| {
        per_job.get(m).copied().unwrap_or(0.0)
    });
    Ok(Running {
        jobs_left: lanes.iter().map(|l| l.jobs).sum(),
        expected_rest_usd: lanes.iter().map(|l| l.expected_usd).sum::<Decimal>().normalize(),
        eta: eta(&lanes, &ahead, &c.limits, &c.capacity, cap_left),
        assumptions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(model: &str, jobs: u64, tokens_each: u64, usd_each: &str) -> Lane {
        let each: Decimal = usd_each.parse().unwrap();
        Lane {
            model: model.into(),
            jobs,
            prompt_tokens: jobs * tokens_each / 2,
            worst_case_usd: each * Decimal::from(jobs) * Decimal::from(3),
            expected_usd: each * Decimal::from(jobs),
            expected_tokens: jobs * tokens_each,
        }
    }

    fn capacity(slots: u64) -> Capacity {
        Capacity {
            replicas: 1,
            slots,
            call_seconds: 1.0,
        }
    }

    fn limits(scope: &str, rpm: Option<u64>, tpm: Option<u64>) -> Limits {
        Limits {
            scope: scope.into(),
            rpm: rpm.map(Decimal::from),
            tpm: tpm.map(Decimal::from),
            budget_left: None,
        }
    }

    #[test]
    fn the_slowest_limit_binds() {
        let lanes = [lane("a", 300, 100, "0.001"), lane("b", 100, 1000, "0.001")];
        let none = BTreeMap::new();
        // 400 requests at 600 rpm: 40 s; b's 100 000 tokens at 60 000 tpm: 100 s.
        let e = eta(
            &lanes,
            &none,
            &[limits("*", Some(600), None), limits("b", None, Some(60_000))],
            &capacity(1000),
            None,
        );
        assert_eq!((e.seconds, e.binding.as_str()), (Some(101.0), "b tpm 60000"));
        // Without limits the replicas bind: 400 jobs, 32 at a time, 1 s each.
        let e = eta(&lanes, &none, &[limits("*", None, None)], &capacity(32), None);
        assert_eq!(e.seconds, Some(13.0));
        assert!(e.binding.starts_with("workers"), "{}", e.binding);
    }

    #[test]
    fn what_waits_ahead_counts_by_priority_and_fair_turns() {
        let lanes = [lane("a", 100, 10, "0.001")];
        let waiting = [
            Waiting {
                model: "a".into(),
                batch_id: "big".into(),
                priority: 1,
                jobs: 10_000,
            },
            Waiting {
                model: "a".into(),
                batch_id: "urgent".into(),
                priority: 2,
                jobs: 50,
            },
            Waiting {
                model: "a".into(),
                batch_id: "later".into(),
                priority: 0,
                jobs: 500,
            },
            Waiting {
                model: "a".into(),
                batch_id: "mine".into(),
                priority: 1,
                jobs: 7,
            },
        ];
        let a = ahead("mine", 1, &lanes, &waiting, |_| 20.0);
        // All 50 urgent ones, 100 of the big one (turns), none of the low one nor its own.
        assert_eq!(
            a["a"],
            Ahead {
                jobs: 150,
                tokens: 3000
            }
        );
        let e = eta(&lanes, &a, &[limits("*", Some(60), None)], &capacity(100), None);
        assert_eq!(e.seconds, Some(251.0));
    }

    #[test]
    fn money_that_runs_out_or_no_worker_means_no_time() {
        let lanes = [lane("a", 10, 10, "0.01")];
        let none = BTreeMap::new();
        let mut l = limits("*", Some(600), None);
        l.budget_left = Some("0.05".parse().unwrap());
        let e = eta(&lanes, &none, &[l.clone()], &capacity(10), None);
        assert_eq!((e.seconds, e.binding.as_str()), (None, "* budget"));
        l.budget_left = Some("0.2".parse().unwrap());
        let e = eta(&lanes, &none, &[l], &capacity(10), None);
        assert!(
            e.seconds.is_some() && e.warnings.iter().any(|w| w.contains("worst case")),
            "{e:?}"
        );
        let e = eta(&lanes, &none, &[], &capacity(10), Some("0.01".parse().unwrap()));
        assert_eq!(e.binding, "batch cap");
        let e = eta(&lanes, &none, &[], &capacity(0), None);
        assert_eq!((e.seconds, e.binding.as_str()), (None, "workers: none running"));
    }

    #[test]
    fn a_job_is_expected_at_its_models_history_and_reserved_at_its_bound() {
        let job = Job::from_value(serde_json::json!({"custom_id": "x", "body": {"model": "o4-mini",
            "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 300}}))
        .unwrap();
        let table = crate::prices::PriceTable::built_in();
        let price = table.get("o4-mini").unwrap();
        let h = History {
            calls: 50,
            avg_completion_tokens: 120.0,
            cached_share: 0.0,
            avg_tokens: 130.0,
        };
        let f = JobFigures::of(&job, price, 4096, Some(&h));
        assert_eq!(f.prompt_tokens, 3 + 3 + 1 + 2);
        // Reserved at its own bound (300, sent as max_completion_tokens), not the default.
        let reserved_prompt = crate::tokens::prompt_reservation("o4-mini", 9);
        assert_eq!(f.worst_case_tokens, reserved_prompt + 300);
        assert_eq!(f.worst_case_usd, price.worst_case(reserved_prompt, 300));
        assert_eq!(f.expected_tokens, 9 + 120);
        // Without history: half the bound, said so by the caller.
        assert_eq!(JobFigures::of(&job, price, 4096, None).expected_tokens, 9 + 150);
    }
}
