//! What a replica can do right now, and why not: the one place its readiness lives. The worker
//! writes it; `/readyz`, `/metrics` and the logs read it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::plan::{BlockKind, Blocked};

#[derive(Default)]
pub struct Health {
    amqp: AtomicBool,
    db: AtomicBool,
    /// Why the database did not answer, as its last failure said (e.g. Postgres refusing
    /// another connection), until it answers again.
    db_reason: Mutex<Option<String>>,
    /// Statements that failed because the database did not answer, since start.
    db_failures: AtomicU64,
    /// Why this replica holds no life line (the session whose lock proves it alive), while it
    /// holds none; `None` once it does. Without one it grants no call: its calls could be taken
    /// over as a dead replica's.
    lifeline: Mutex<Option<String>>,
    /// This replica's id in `sheepdog.replicas` (0 before it registers).
    replica: AtomicI64,
    /// Why calls of every model are held, as the last dispatch found.
    held: Mutex<Option<Blocked>>,
    /// Models held back by their own limits, breaker or pause.
    lanes: Mutex<Vec<Blocked>>,
}

impl Health {
    pub fn set_amqp(&self, up: bool) {
        self.amqp.store(up, Ordering::Relaxed);
    }

    pub fn amqp(&self) -> bool {
        self.amqp.load(Ordering::Relaxed)
    }

    /// Records that the database answers; returns whether it did before.
    pub fn set_db(&self, up: bool) -> bool {
        if up {
            *self.db_reason.lock().unwrap() = None;
        }
        self.db.swap(up, Ordering::Relaxed)
    }

    /// Records that a statement failed because the database did not answer, and why; returns
    /// whether it answered before.
    pub fn db_failed(&self, why: &str) -> bool {
        self.db_failures.fetch_add(1, Ordering::Relaxed);
        *self.db_reason.lock().unwrap() = Some(why.to_string());
        self.db.swap(false, Ordering::Relaxed)
    }

    /// Statements that failed because the database did not answer, since start.
    pub fn db_failures(&self) -> u64 {
        self.db_failures.load(Ordering::Relaxed)
    }

    /// Records whether this replica holds its life line (`Err`: why not); returns whether it
    /// did before.
    pub fn set_lifeline(&self, state: Result<(), String>) -> bool {
        let mut l = self.lifeline.lock().unwrap();
        let had = l.is_none();
        *l = state.err();
        had
    }

    /// Whether this replica holds its life line.
    pub fn lifeline(&self) -> bool {
        self.lifeline.lock().unwrap().is_none()
    }

    pub fn db(&self) -> bool {
        self.db.load(Ordering::Relaxed)
    }

    pub fn set_replica(&self, id: i64) {
        self.replica.store(id, Ordering::Relaxed);
    }

    pub fn replica(&self) -> i64 {
        self.replica.load(Ordering::Relaxed)
    }

    /// What the last dispatch found holding calls back.
    pub fn set_held(&self, held: Option<Blocked>, lanes: Vec<Blocked>) {
        *self.held.lock().unwrap() = held;
        *self.lanes.lock().unwrap() = lanes;
    }

    pub fn held(&self) -> Option<Blocked> {
        self.held.lock().unwrap().clone()
    }

    pub fn lanes(&self) -> Vec<Blocked> {
        self.lanes.lock().unwrap().clone()
    }

    /// Why this replica serves no model now, if it serves none: the database is down, or
    /// every model is held by the account's breaker, the budget or the upstream's pause. A rate
    /// limit that refills within a second is not a pause.
    pub fn paused(&self) -> Option<String> {
        // The life line's reason first: it is what Postgres said to a new connection, where a
        // pooled statement may only have timed out waiting for one.
        if let Some(why) = self.lifeline.lock().unwrap().as_deref() {
            return Some(format!("no life line to the database: {why}"));
        }
        if !self.db() {
            return Some(match self.db_reason.lock().unwrap().as_deref() {
                Some(why) => format!("database unreachable: {why}"),
                None => "database unreachable".into(),
            });
        }
        self.held().filter(|b| b.kind != BlockKind::Rate).map(|b| b.reason)
    }

    /// `/readyz`: ready while connected and some model can be served.
    pub fn ready(&self) -> Result<(), String> {
        // The database's state first: while it refuses, intake's broker session may come and
        // go too, and the database is the cause to name.
        if let Some(why) = self.paused() {
            return Err(format!("paused: {why}"));
        }
        if !self.amqp() {
            return Err("not connected to RabbitMQ".into());
        }
        Ok(())
    }
}
