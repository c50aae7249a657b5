//! The retry policy: every retry and reconnect loop of sheepdog takes its delays from here.
//!
//! Each schedule is one of tokio-retry's strategies (exponential, capped with `max_delay`),
//! jittered with its `jitter` draw. Two shapes of jitter are used:
//!
//! - **equal jitter** (`d/2 + jitter(d/2)`): half the delay is kept, half is random, so replicas
//!   that failed together spread out but none comes back at once;
//! - **upward jitter** (`d + jitter(d/4)`): for pauses the upstream asked for, which must never be
//!   shorter than asked (`Retry-After` is a floor).
//!
//! | schedule | used by | delays |
//! |---|---|---|
//! | [`job_retry`] | `worker::decide` (a job's next attempt) | 2 s, 4 s, 8 s … capped at 10 min, equal jitter, never below `Retry-After` |
//! | [`too_many_requests`] | `limits::throttle::too_many` (the 429 pause of a scope) | `Retry-After`, then doubling per 429 round, capped at 60 s (never below `Retry-After`), upward jitter |
//! | [`reconnect`] | `worker::intake::run` (the AMQP session), `publish::Publisher::flush` (enqueue), the AMQP channel pool | 0.2 s doubling to 30 s, equal jitter, reset once connected |
//! | [`database`] | `worker::dispatcher::run` (dispatch and settlement failing), `worker::intake` (waiting for the database) | 0.2 s doubling to 3.2 s, equal jitter, reset once it answers |
//! | [`redelivery_pause`] | `worker::intake::settle_delivery` (a delivery nacked back) | 0.5 s to 2 s, uniform |
//! | [`outbox`] | `worker::outbox::run` (a publish or read that failed) | 0.25 s doubling to 5 s, equal jitter, reset after a publish |

use std::time::Duration;

use tokio_retry::strategy::{jitter, ExponentialBackoff};

/// The longest a job waits between two of its attempts (before `Retry-After`).
pub const JOB_RETRY_CAP: Duration = Duration::from_secs(600);
/// The longest a run of 429s pauses a scope (a `Retry-After` or reset hint may be longer).
pub const TOO_MANY_CAP: Duration = Duration::from_secs(60);
/// 429 rounds after which the pause stops growing (it is at its cap long before).
pub const TOO_MANY_ROUNDS: usize = 21;

/// An exponential schedule: `first`, then doubling, capped at `cap` (tokio-retry's strategy).
fn doubling(first: Duration, cap: Duration) -> ExponentialBackoff {
    // tokio-retry's delays are `factor × base^n` ms with n from 1: base 2, factor first/2.
    let half_ms = (first.as_millis() as u64 / 2).max(1);
    ExponentialBackoff::from_millis(2).factor(half_ms).max_delay(cap)
}

/// Equal jitter with a given draw from [0, 1): half of `d` kept, the other half scaled by `draw`.
pub fn equal_jitter_with(d: Duration, draw: f64) -> Duration {
    d / 2 + (d / 2).mul_f64(draw.clamp(0.0, 1.0))
}

/// Equal jitter with a random draw (tokio-retry's `jitter`).
pub fn equal_jitter(d: Duration) -> Duration {
    d / 2 + jitter(d / 2)
}

/// A schedule of delays, jittered as it is drawn; `reset` starts it again from the first delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    delays: ExponentialBackoff,
}

impl Backoff {
    fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            delays: doubling(first, cap),
        }
    }

    /// Back to the first delay (the thing retried answered).
    pub fn reset(&mut self) {
        self.delays = doubling(self.first, self.cap);
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.delays.next().map(equal_jitter)
    }
}

/// Reconnecting to RabbitMQ: 0.2 s doubling to 30 s, equal jitter.
pub fn reconnect() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
}

/// A database statement that failed (or waiting for the database to answer again): 0.2 s
/// doubling to 3.2 s, equal jitter. Short: the database coming back must be seen within seconds.
pub fn database() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_millis(3200))
}

/// The outbox after a failed read or publish: 0.25 s doubling to 5 s, equal jitter.
pub fn outbox() -> Backoff {
    Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
}

/// How long a delivery that could not be stored waits before it is nacked back to the queue,
/// so a lasting fault is not a hot loop: 0.5 s plus up to 1.5 s.
pub fn redelivery_pause() -> Duration {
    Duration::from_millis(500) + jitter(Duration::from_millis(1500))
}

/// The wait before a job's next attempt, after `attempt` calls (1 = the first): about 2 s, 4 s,
/// 8 s … up to 10 minutes, with equal jitter from `draw` (in [0, 1)), and never shorter than
/// the upstream's `Retry-After`.
pub fn job_retry(attempt: u32, draw: f64, retry_after: Option<Duration>) -> Duration {
    // 2^attempt seconds: the schedule from 1 s, one step per call made.
    let delay = doubling(Duration::from_secs(1), JOB_RETRY_CAP)
        .nth(attempt.min(30) as usize)
        .unwrap_or(JOB_RETRY_CAP);
    equal_jitter_with(delay, draw).max(retry_after.unwrap_or_default())
}

/// The pauses of a scope after a run of 429s, indexed by the 429 rounds before this one
/// (`[0]` for the first 429): `floor` (the upstream's `Retry-After`), then doubling, capped
/// at 60 s, never below `floor`, each with upward jitter. The replicas share the round count in
/// Postgres, so the whole schedule goes with the statement that picks from it.
pub fn too_many_requests(floor: Duration) -> Vec<Duration> {
    doubling(floor, TOO_MANY_CAP)
        .take(TOO_MANY_ROUNDS)
        .map(|d| {
            let d = d.max(floor);
            d + jitter(d / 4)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_schedule_doubles_from_two_seconds_and_caps_at_ten_minutes() {
        assert_eq!(job_retry(0, 1.0, None), Duration::from_secs(1));
        assert_eq!(job_retry(1, 0.0, None), Duration::from_secs(1));
        assert_eq!(job_retry(1, 1.0, None), Duration::from_secs(2));
        assert_eq!(job_retry(2, 1.0, None), Duration::from_secs(4));
        assert_eq!(job_retry(3, 0.0, None), Duration::from_secs(4));
        assert_eq!(job_retry(9, 1.0, None), Duration::from_secs(512));
        assert_eq!(job_retry(10, 1.0, None), Duration::from_secs(600));
        assert_eq!(job_retry(30, 1.0, None), Duration::from_secs(600));
        assert_eq!(
            job_retry(1, 0.0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn reconnects_start_small_grow_to_their_cap_and_start_again_after_a_reset() {
        let mut b = reconnect();
        let first = b.next().unwrap();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let late = b.nth(20).unwrap();
        assert!(late >= Duration::from_secs(15) && late <= Duration::from_secs(30));
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(200));
    }

    #[test]
    fn a_429_pause_is_never_below_retry_after_and_stops_growing_at_its_cap() {
        let s = too_many_requests(Duration::from_millis(1500));
        assert_eq!(s.len(), TOO_MANY_ROUNDS);
        assert!(s[0] >= Duration::from_millis(1500) && s[0] <= Duration::from_millis(1875));
        assert!(s[1] >= Duration::from_secs(3));
        assert!(s[20] >= TOO_MANY_CAP && s[20] <= TOO_MANY_CAP * 5 / 4);
        let long = too_many_requests(Duration::from_secs(90));
        assert!(long.iter().all(|d| *d >= Duration::from_secs(90)));
    }
}
