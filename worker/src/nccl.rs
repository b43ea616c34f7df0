//! NCCL all-reduce through `cudarc::nccl` (the `cuda` feature).
//!
//! Rank 0 creates NCCL's unique id ([`unique_id`]) and hands it to the coordinator in its
//! `CollectiveSetup` request; every member receives it in the response and joins the
//! communicator with [`Nccl::new`]. Each all-reduce copies the host gradient to the device,
//! sums it in place across ranks (`ncclAllReduce`, f64) and copies it back. The replica
//! itself computes on the CPU: this is the collective only.
//!
//! cudarc loads the driver and NCCL at run time (`fallback-dynamic-loading`) and panics,
//! rather than returning an error, when the driver is missing; every entry point here
//! catches that and returns an error instead.

use crate::collective::Collective;
use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;

/// The CUDA device a worker uses: `GPO_CUDA_DEVICE`, else `LOCAL_RANK`, else 0.
pub fn device_ordinal() -> usize {
    ["GPO_CUDA_DEVICE", "LOCAL_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}

fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => bail!("{what}: the CUDA driver or NCCL library could not be loaded"),
    }
}

/// A fresh NCCL unique id (rank 0), as the 128 bytes that travel through the coordinator.
pub fn unique_id() -> Result<Vec<u8>> {
    guarded("creating NCCL's unique id", || {
        let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    })
}

/// One rank of an NCCL communicator.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    dev: CudaSlice<f64>,
    rank: usize,
    world: usize,
}

impl Nccl {
    /// Joins the communicator named by `id` (from rank 0) as `rank` of `world`, with a
    /// device buffer of `buffer_len` values.
    pub fn new(rank: usize, world: usize, id: &[u8], buffer_len: usize) -> Result<Nccl> {
        if id.len() != 128 {
            bail!(
                "NCCL's unique id has {} bytes, expected 128 (wrong buffer size)",
                id.len()
            );
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        guarded("joining the NCCL communicator", || {
            let ordinal = device_ordinal();
            let ctx = CudaContext::new(ordinal)
                .with_context(|| format!("opening CUDA device {ordinal}"))?;
            let stream = ctx.default_stream();
            let dev = stream
                .alloc_zeros::<f64>(buffer_len)
                .context("allocating the gradient buffer on the device")?;
            let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
                .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
            Ok(Nccl {
                comm,
                stream,
                dev,
                rank,
                world,
            })
        })
    }
}

// SAFETY: an NCCL communicator is not bound to the thread that created it; it must only
// not be used by two threads at once, which `&mut self` on every use guarantees. The worker
// moves its collective between tokio's blocking threads from one step to the next.
unsafe impl Send for Nccl {}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f64]) -> Result<()> {
        if buf.len() != self.dev.len() {
            bail!(
                "nccl: asked to reduce {} values, the communicator was set up for {} (wrong buffer size)",
                buf.len(),
                self.dev.len()
            );
        }
        self.stream
            .memcpy_htod(&*buf, &mut self.dev)
            .context("copying the gradient to the device")?;
        self.comm
            .all_reduce_in_place(&mut self.dev, &ReduceOp::Sum)
            .map_err(|e| anyhow::anyhow!("ncclAllReduce: {e:?}"))?;
        self.stream
            .memcpy_dtoh(&self.dev, buf)
            .context("copying the gradient back")?;
        self.stream.synchronize().context("waiting for NCCL")?;
        Ok(())
    }
}
