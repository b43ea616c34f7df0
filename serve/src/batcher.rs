//! Dynamic batching on a dedicated thread: concurrent requests send jobs; the thread takes
//! the first waiting job and every further one that fits the budget (TEI's
//! max-batch-tokens), runs them in one call, and answers each. Jobs whose caller gave up
//! (deadline passed, connection closed) are dropped before they cost anything.

use std::sync::mpsc;
use tokio::sync::oneshot;

/// A job with the channel its answer goes back on.
type Envelope<J, R> = (J, oneshot::Sender<R>);

/// The sending side of a batching thread.
#[derive(Debug)]
pub struct Batcher<J, R> {
    tx: mpsc::Sender<Envelope<J, R>>,
}

impl<J, R> Clone for Batcher<J, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

/// The batcher thread has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl<J: Send + 'static, R: Send + 'static> Batcher<J, R> {
    /// Starts the thread. `cost` weighs a job (tokens, points); a batch's cost stays within
    /// `budget` unless one job alone exceeds it. `run` answers a batch in order.
    pub fn spawn(
        name: &str,
        budget: usize,
        cost: impl Fn(&J) -> usize + Send + 'static,
        mut run: impl FnMut(Vec<J>) -> Vec<R> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Envelope<J, R>>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut carry: Option<Envelope<J, R>> = None;
                loop {
                    let first = match carry.take() {
                        Some(e) => e,
                        None => match rx.recv() {
                            Ok(e) => e,
                            Err(_) => return,
                        },
                    };
                    let mut total = cost(&first.0);
                    let mut batch = vec![first];
                    while let Ok(e) = rx.try_recv() {
                        let c = cost(&e.0);
                        if total + c > budget {
                            carry = Some(e);
                            break;
                        }
                        total += c;
                        batch.push(e);
                    }
                    batch.retain(|(_, reply)| !reply.is_closed());
                    if batch.is_empty() {
                        continue;
                    }
                    let (jobs, replies): (Vec<J>, Vec<_>) = batch.into_iter().unzip();
                    for (r, reply) in run(jobs).into_iter().zip(replies) {
                        let _ = reply.send(r);
                    }
                }
            })?;
        Ok(Batcher { tx })
    }

    /// Sends a job and waits for its answer.
    pub async fn call(&self, job: J) -> Result<R, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((job, reply)).map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn batches_within_the_budget_and_answers_in_order() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        let b = Batcher::spawn(
            "test",
            10,
            |j: &usize| *j,
            move |jobs: Vec<usize>| {
                if jobs == [0] {
                    g.wait();
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                seen.lock().unwrap().push(jobs.iter().sum::<usize>());
                jobs.iter().map(|j| j * 2).collect()
            },
        )
        .unwrap();
        // The first job holds the thread while the others queue up.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(0).await }
        });
        tokio::task::spawn_blocking(move || gate.wait())
            .await
            .unwrap();
        let calls: Vec<_> = [4usize, 4, 4, 12]
            .into_iter()
            .map(|j| {
                let b = b.clone();
                tokio::spawn(async move { b.call(j).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Ok(0));
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap().unwrap());
        }
        assert_eq!(out, vec![8, 8, 8, 24]);
        let sizes = sizes.lock().unwrap().clone();
        assert!(sizes.iter().all(|&s| s <= 12), "{sizes:?}");
        assert!(
            sizes.contains(&8),
            "two jobs of 4 shared a batch: {sizes:?}"
        );
    }
}
