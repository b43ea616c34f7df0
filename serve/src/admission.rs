//! Admission control: at most `concurrency` requests run and at most `queue` wait; any
//! request beyond that is refused at once (429 / RESOURCE_EXHAUSTED), never queued
//! forever, and a waiting request gives up at its deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Running and waiting requests are at their limits.
    Busy,
    /// The deadline passed while waiting.
    Deadline,
}

/// Whether one more request fits, given how many are in the system (running or waiting).
/// The pure rule behind [`Admission::admit`].
pub fn fits(in_system: usize, concurrency: usize, queue: usize) -> bool {
    in_system < concurrency + queue
}

/// The limits and their counters.
#[derive(Debug)]
pub struct Admission {
    running: Arc<Semaphore>,
    in_system: AtomicUsize,
    concurrency: usize,
    queue: usize,
}

/// An admitted request; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket<'a> {
    _permit: OwnedSemaphorePermit,
    owner: &'a Admission,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.owner.in_system.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Frees a place that was taken but not turned into a ticket.
struct Place<'a>(&'a Admission);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.in_system.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Limits of `concurrency` running (at least 1) and `queue` waiting requests.
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        Admission {
            running: Arc::new(Semaphore::new(concurrency)),
            in_system: AtomicUsize::new(0),
            concurrency,
            queue,
        }
    }

    /// Requests running or waiting now.
    pub fn in_system(&self) -> usize {
        self.in_system.load(Ordering::Acquire)
    }

    /// Admits a request, waiting at most until `deadline` for a running place.
    pub async fn admit(&self, deadline: tokio::time::Instant) -> Result<Ticket<'_>, Refusal> {
        let mut n = self.in_system.load(Ordering::Acquire);
        loop {
            if !fits(n, self.concurrency, self.queue) {
                return Err(Refusal::Busy);
            }
            match self.in_system.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        let place = Place(self);
        let permit = tokio::time::timeout_at(deadline, self.running.clone().acquire_owned())
            .await
            .map_err(|_| Refusal::Deadline)?
            .map_err(|_| Refusal::Busy)?;
        std::mem::forget(place);
        Ok(Ticket {
            _permit: permit,
            owner: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rule() {
        assert!(fits(0, 1, 0));
        assert!(!fits(1, 1, 0));
        assert!(fits(2, 1, 2));
        assert!(!fits(3, 1, 2));
    }

    #[tokio::test]
    async fn refuses_beyond_running_and_waiting() {
        let a = Admission::new(1, 1);
        let far = tokio::time::Instant::now() + Duration::from_secs(10);
        let t1 = a.admit(far).await.unwrap();
        // One may wait; a third is refused at once.
        let near = tokio::time::Instant::now() + Duration::from_millis(50);
        let waiting = a.admit(near);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_millis(5), &mut waiting)
            .await
            .is_err());
        assert_eq!(a.in_system(), 2);
        assert_eq!(a.admit(far).await.unwrap_err(), Refusal::Busy);
        // The waiting one gives up at its deadline and frees its place.
        assert_eq!(waiting.await.unwrap_err(), Refusal::Deadline);
        assert_eq!(a.in_system(), 1);
        drop(t1);
        assert_eq!(a.in_system(), 0);
        assert!(a.admit(far).await.is_ok());
    }
}
