//! The collective-communication seam: everything a replica needs from its peers is a
//! sum all-reduce of one flat buffer. The buffer is f64: replicas sum f32 shard gradients
//! in f64, where the sum is exact (order-independent), so that runs of any world size
//! agree (see [`crate::Replica::gradient`]).

use anyhow::Result;
use std::sync::Arc;

/// Breaks a collective's pending and future calls from another thread.
#[derive(Clone)]
pub struct Aborter(Arc<dyn Fn() + Send + Sync>);

impl Aborter {
    /// An aborter that runs `f`.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Aborter(Arc::new(f))
    }
    /// An aborter that does nothing (a collective with nothing to break).
    pub fn noop() -> Self {
        Aborter::new(|| {})
    }
    /// Breaks the collective.
    pub fn abort(&self) {
        (self.0)()
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
    /// A handle that breaks this collective's pending and future calls.
    fn aborter(&self) -> Aborter {
        Aborter::noop()
    }
}

/// A world of one: the all-reduce is the identity.
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
