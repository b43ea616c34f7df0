//! The collective-communication seam: everything a replica needs from its peers is a
//! sum all-reduce of one flat buffer. The buffer is f64: replicas sum f32 shard gradients
//! in f64, where the sum is exact (order-independent), so that runs of any world size
//! agree (see [`crate::Replica::gradient`]).
//!
//! A collective can also be broken from outside: recovery must never wait on a dead or
//! stopped peer, so whoever drives recovery (the worker's coordinator connection) holds an
//! [`Aborter`] and calls it from its own thread; the replica's pending all-reduce then
//! returns an error at once, and so does every later call.

use anyhow::Result;
use std::sync::Arc;

/// Breaks a collective's pending and future calls from another thread.
#[derive(Clone)]
pub struct Aborter(Arc<dyn Fn() + Send + Sync>);

impl Aborter {
    /// An aborter that runs `f` (which must be safe to call more than once, from any
    /// thread, while a call of the collective is in progress).
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Aborter(Arc::new(f))
    }

    /// An aborter with nothing to break: for collectives that never wait on a peer.
    pub fn noop() -> Self {
        Aborter::new(|| {})
    }

    /// Breaks the collective: a call blocked on a peer returns an error saying it was
    /// aborted, and every later call fails at once. The collective must then be set up again.
    pub fn abort(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Aborter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aborter")
    }
}

/// A group of replicas that can sum a buffer across all members.
pub trait Collective: Send {
    /// This replica's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of replicas.
    fn world_size(&self) -> usize;
    /// Replaces `buf` with the element-wise sum of every replica's `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f64]) -> Result<()>;
    /// A handle that breaks this collective's pending and future calls from another thread.
    /// The default breaks nothing, for collectives that never wait on a peer.
    fn aborter(&self) -> Aborter {
        Aborter::noop()
    }

    /// Bytes this member has sent to its peers in all-reduces since it was set up
    /// (`gpo_allreduce_bytes_total`); 0 where the backend does not say (NCCL, a world of one).
    fn bytes_sent(&self) -> u64 {
        0
    }
}

/// A world of one: the all-reduce is the identity. It never waits on anyone, so its
/// aborter is the default no-op: there is no pending call to break.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_aborter_runs_its_function_from_any_clone_and_thread() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let a = Aborter::new(move || {
            m.fetch_add(1, Ordering::SeqCst);
        });
        let b = a.clone();
        std::thread::spawn(move || b.abort()).join().unwrap();
        a.abort();
        assert_eq!(n.load(Ordering::SeqCst), 2);
        // Local's is the no-op, and Local keeps working.
        Local.aborter().abort();
        let mut buf = [1.0, 2.0];
        Local.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.0, 2.0]);
    }
}
