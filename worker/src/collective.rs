//! The collective-communication seam: everything a replica needs from its peers is a
//! sum all-reduce of one flat buffer. The buffer is f64: replicas sum f32 shard gradients
//! in f64, where the sum is exact (order-independent), so that runs of any world size
//! agree (see [`crate::Replica::gradient`]).

use anyhow::Result;

/// A group of replicas that can sum a buffer across all members.
pub trait Collective: Send {
    /// This replica's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of replicas.
    fn world_size(&self) -> usize;
    /// Replaces `buf` with the element-wise sum of every replica's `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f64]) -> Result<()>;
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
