//! What a replica can do right now, and why not: the one place its readiness lives. The worker
//! writes it; `/readyz`, `/metrics` and the logs read it.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use crate::plan::{BlockKind, Blocked};

#[derive(Default)]
pub struct Health {
    amqp: AtomicBool,
    db: AtomicBool,
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

    /// Records whether the database answers; returns the previous value.
    pub fn set_db(&self, up: bool) -> bool {
        self.db.swap(up, Ordering::Relaxed)
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
        if !self.db() {
            return Some("database unreachable".into());
        }
        self.held().filter(|b| b.kind != BlockKind::Rate).map(|b| b.reason)
    }

    /// `/readyz`: ready while connected and some model can be served.
    pub fn ready(&self) -> Result<(), String> {
        if !self.amqp() {
            return Err("not connected to RabbitMQ".into());
        }
        if let Some(why) = self.paused() {
            return Err(format!("paused: {why}"));
        }
        Ok(())
    }
}
