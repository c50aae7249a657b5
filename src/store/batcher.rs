//! Groups concurrent requests for the same statement into one multi-row
//! statement: one round trip and one commit for many jobs. This is what lets a
//! replica finish thousands of jobs a second with durable commits on two cores.
//!
//! Requests for the same job never share a batch (a multi-row `UPDATE … FROM`
//! would apply only one of them); a second one waits for the next batch. When a
//! batch fails, its requests are retried one by one so one bad row cannot fail
//! its neighbours.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::StoreError;
use crate::job::JobId;

/// A request that belongs to one job.
pub trait Keyed {
    fn key(&self) -> &JobId;
}

type Reply<Resp> = oneshot::Sender<Result<Resp, StoreError>>;

pub struct Batcher<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
}

impl<Req, Resp> Batcher<Req, Resp>
where
    Req: Keyed + Clone + Send + Sync + 'static,
    Resp: Send + 'static,
{
    /// Starts the batching task. `exec` runs one statement for a batch and
    /// returns one response per request, in order. At most `parallel` batches
    /// run at once; requests arriving meanwhile form the next batch. A batch of
    /// fewer than `fill` requests waits for more until its oldest request is
    /// `linger` old: requests that trickle in (a replica of many, each sent a
    /// share of the deliveries) ride together instead of a commit each.
    pub fn new<F, Fut>(max_batch: usize, parallel: usize, fill: usize, linger: Duration, exec: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Resp>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let shape = Shape {
            max_batch: max_batch.max(1),
            parallel: parallel.max(1),
            fill: fill.min(max_batch),
            linger,
        };
        tokio::spawn(run(rx, shape, Arc::new(exec)));
        Batcher { tx }
    }

    pub async fn call(&self, req: Req) -> Result<Resp, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((req, reply))
            .map_err(|_| StoreError::Unavailable("the database writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the database writer dropped a request".into()))?
    }
}

/// How batches are formed (see `Batcher::new`).
struct Shape {
    max_batch: usize,
    parallel: usize,
    fill: usize,
    linger: Duration,
}

async fn run<Req, Resp, F, Fut>(mut rx: mpsc::UnboundedReceiver<(Req, Reply<Resp>)>, shape: Shape, exec: Arc<F>)
where
    Req: Keyed + Clone + Send + Sync + 'static,
    Resp: Send + 'static,
    F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Resp>, StoreError>> + Send + 'static,
{
    let Shape {
        max_batch,
        parallel,
        fill,
        linger,
    } = shape;
    let slots = Arc::new(Semaphore::new(parallel));
    let mut carry: VecDeque<(Req, Reply<Resp>)> = VecDeque::new();
    // When the oldest request waiting arrived.
    let mut oldest = Instant::now();
    loop {
        if carry.is_empty() {
            match rx.recv().await {
                Some(item) => carry.push_back(item),
                None => return,
            }
            oldest = Instant::now();
        }
        // Wait for a free slot first: requests pile up meanwhile and ride together.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        while let Ok(item) = rx.try_recv() {
            carry.push_back(item);
        }
        // A small batch waits a little for more, never past its oldest request's linger.
        while carry.len() < fill {
            match tokio::time::timeout_at(oldest + linger, rx.recv()).await {
                Ok(Some(item)) => carry.push_back(item),
                Ok(None) | Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(max_batch.min(carry.len()));
        let mut keys: HashSet<JobId> = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(item) = carry.pop_front() {
            if batch.len() >= max_batch {
                later.push_back(item);
            } else if keys.insert(item.0.key().clone()) {
                batch.push(item);
            } else {
                later.push_back(item);
            }
        }
        carry = later;
        let exec = exec.clone();
        tokio::spawn(async move {
            let (reqs, replies): (Vec<Req>, Vec<Reply<Resp>>) = batch.into_iter().unzip();
            match exec(reqs.clone()).await {
                Ok(resps) if resps.len() == reqs.len() => {
                    for (reply, resp) in replies.into_iter().zip(resps) {
                        let _ = reply.send(Ok(resp));
                    }
                }
                Ok(resps) => {
                    let msg = format!(
                        "batch statement returned {} rows for {} requests",
                        resps.len(),
                        reqs.len()
                    );
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::Rejected(msg.clone())));
                    }
                }
                Err(e) if reqs.len() == 1 || e.is_unavailable() => {
                    // An outage fails the whole batch alike; only a refused batch is worth
                    // splitting to find the row it refused.
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(_) => {
                    // Isolate the failure: each request on its own.
                    for (req, reply) in reqs.into_iter().zip(replies) {
                        let r = exec(vec![req]).await.and_then(|mut v| {
                            v.pop()
                                .ok_or_else(|| StoreError::Rejected("batch statement returned no row".into()))
                        });
                        let _ = reply.send(r);
                    }
                }
            }
            drop(permit);
        });
    }
}
