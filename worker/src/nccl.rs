//! NCCL all-reduce through `cudarc::nccl` (the `cuda` feature).
//!
//! Rank 0 creates NCCL's unique id ([`unique_id`]) and hands it to the coordinator in its
//! `CollectiveSetup` request; every member receives it in the response and joins the
//! communicator with [`Nccl::new`]. Each all-reduce copies the host gradient to the device,
//! sums it in place across ranks (`ncclAllReduce`, f64) and copies it back. The replica
//! computes its gradient wherever `--device` says (the host buffer is what Adam and this
//! collective share): this is the collective only.
//!
//! The communicator is held as NCCL's raw handle rather than cudarc's `Comm`, because
//! recovery must be able to abort it from another thread (`ncclCommAbort`, through
//! [`Collective::aborter`]) and `Comm` keeps its handle private. The handle sits behind a
//! mutex that is held only while an operation is enqueued or the communicator is aborted
//! or freed, never while the host waits for the GPU: a call blocked on a dead peer is
//! waiting in the stream synchronization, which `ncclCommAbort` ends (NCCL's kernels stop).
//! A failed or aborted call leaves the caller's buffer as it was.
//!
//! This is the cudarc candle re-exports (`candle_core::cuda_backend::cudarc`, linked
//! dynamically against libcuda and libnccl by candle's `cuda` and `nccl` features). The
//! driver is probed ([`crate::device::probe_cuda`]) before a context is made, and every
//! entry point runs under [`guarded`], so a broken driver is an error, not a panic.

use crate::collective::{Aborter, Collective};
use crate::device::guarded;
use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::{result, sys, Id};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The CUDA device a worker uses: `GPO_CUDA_DEVICE`, else `LOCAL_RANK`, else 0.
pub fn device_ordinal() -> usize {
    ["GPO_CUDA_DEVICE", "LOCAL_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}

/// A fresh NCCL unique id (rank 0), as the 128 bytes that travel through the coordinator.
pub fn unique_id() -> Result<Vec<u8>> {
    guarded("creating NCCL's unique id", || {
        let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    })
}

/// NCCL's communicator handle, shared by the communicator and its aborters.
struct Handle {
    /// Null once the communicator has been aborted.
    comm: Mutex<sys::ncclComm_t>,
    aborted: AtomicBool,
}

// SAFETY: the raw handle is only used under the mutex; NCCL allows a communicator to be
// used from any thread as long as calls on it do not overlap, and `ncclCommAbort` is the
// documented way to stop one from another thread.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let mut comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        if !comm.is_null() {
            let c = std::mem::replace(&mut *comm, std::ptr::null_mut());
            // SAFETY: `c` is a live communicator (non-null under the lock) that nothing
            // uses again: the null left behind makes every later call fail.
            let r = guarded("aborting the NCCL communicator", || unsafe {
                result::comm_abort(c).map_err(|e| anyhow::anyhow!("ncclCommAbort: {e:?}"))
            });
            if let Err(e) = r {
                tracing::warn!("{e:#}");
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Abort rather than destroy: ncclCommDestroy waits for outstanding work, which
        // never finishes when a peer is gone.
        self.abort();
    }
}

fn aborted_error(rank: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "nccl: the all-reduce of rank {rank} was aborted (its Aborter called ncclCommAbort, so that recovery does not wait on a peer); the communicator must be set up again"
    )
}

/// One rank of an NCCL communicator.
pub struct Nccl {
    handle: Arc<Handle>,
    stream: Arc<CudaStream>,
    dev: CudaSlice<f64>,
    host: Vec<f64>,
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
        let count = crate::device::probe_cuda()?;
        guarded("joining the NCCL communicator", || {
            let ordinal = device_ordinal();
            if ordinal >= count {
                bail!("NCCL rank {rank}: CUDA device {ordinal} asked for (GPO_CUDA_DEVICE or LOCAL_RANK), the driver sees {count}");
            }
            let ctx = CudaContext::new(ordinal)
                .with_context(|| format!("opening CUDA device {ordinal}"))?;
            let stream = ctx.default_stream();
            let dev = stream
                .alloc_zeros::<f64>(buffer_len)
                .context("allocating the gradient buffer on the device")?;
            let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
            // SAFETY: NCCL writes the new handle through the pointer, which points at
            // storage for one handle; it is read only after NCCL reported success.
            let comm = unsafe {
                result::comm_init_rank(
                    comm.as_mut_ptr(),
                    world as std::ffi::c_int,
                    sys::ncclUniqueId { internal },
                    rank as std::ffi::c_int,
                )
                .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
                comm.assume_init()
            };
            Ok(Nccl {
                handle: Arc::new(Handle {
                    comm: Mutex::new(comm),
                    aborted: AtomicBool::new(false),
                }),
                stream,
                dev,
                host: vec![0.0; buffer_len],
                rank,
                world,
            })
        })
    }

    fn aborted_error(&self) -> anyhow::Error {
        aborted_error(self.rank)
    }

    /// Enqueues an in-place sum of the first `count` values of the device buffer.
    fn enqueue(&mut self, count: usize) -> Result<()> {
        let rank = self.rank;
        let (ptr, _written) = self.dev.device_ptr_mut(&self.stream);
        let comm = self.handle.comm.lock().unwrap_or_else(|p| p.into_inner());
        if comm.is_null() {
            return Err(aborted_error(rank));
        }
        // SAFETY: `ptr` is this communicator's device buffer of at least `count` f64 values
        // (callers check), reduced in place on this communicator's stream; the handle is
        // live (non-null under the lock) for the duration of the enqueue.
        unsafe {
            result::all_reduce(
                ptr as _,
                ptr as _,
                count,
                sys::ncclDataType_t::ncclFloat64,
                sys::ncclRedOp_t::ncclSum,
                *comm,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| anyhow::anyhow!("ncclAllReduce: {e:?}"))?;
        Ok(())
    }

    fn reduce(&mut self, buf: &[f64]) -> Result<()> {
        self.stream
            .memcpy_htod(buf, &mut self.dev)
            .context("copying the gradient to the device")?;
        self.enqueue(self.dev.len())?;
        self.stream
            .memcpy_dtoh(&self.dev, &mut self.host)
            .context("copying the gradient back")?;
        self.stream.synchronize().context("waiting for NCCL")?;
        Ok(())
    }

    /// Seconds per in-place all-reduce of the first `count` f64 values of the device
    /// buffer, over `reps` back-to-back calls after one warm-up, without host copies: the
    /// collective's own speed (`gpo gpu-check`'s bandwidth sweep).
    pub fn time_device_all_reduce(&mut self, count: usize, reps: usize) -> Result<f64> {
        if count > self.dev.len() {
            bail!(
                "nccl: {count} values asked for, the buffer holds {}",
                self.dev.len()
            );
        }
        guarded("timing nccl all-reduce", || {
            self.enqueue(count)?;
            self.stream.synchronize().context("waiting for NCCL")?;
            let t = std::time::Instant::now();
            for _ in 0..reps.max(1) {
                self.enqueue(count)?;
            }
            self.stream.synchronize().context("waiting for NCCL")?;
            Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
        })
    }

    /// Bytes per second of a device-to-device copy of `bytes` (counting the bytes copied
    /// once), on this communicator's device: the memory bandwidth that bounds a 1-rank
    /// all-reduce, where no link is crossed.
    pub fn device_copy_rate(&self, bytes: usize, reps: usize) -> Result<f64> {
        guarded("timing a device copy", || {
            let n = bytes / 8;
            let src = self.stream.alloc_zeros::<f64>(n).context("allocating")?;
            let mut dst = self.stream.alloc_zeros::<f64>(n).context("allocating")?;
            self.stream.memcpy_dtod(&src, &mut dst).context("copying")?;
            self.stream.synchronize().context("waiting for the copy")?;
            let t = std::time::Instant::now();
            for _ in 0..reps.max(1) {
                self.stream.memcpy_dtod(&src, &mut dst).context("copying")?;
            }
            self.stream.synchronize().context("waiting for the copy")?;
            Ok((n * 8 * reps.max(1)) as f64 / t.elapsed().as_secs_f64())
        })
    }
}

// SAFETY: an NCCL communicator is not bound to the thread that created it; it must only
// not be used by two threads at once, which `&mut self` on every use (and the handle's
// mutex against aborters) guarantees. The worker moves its collective between tokio's
// blocking threads from one step to the next.
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
        if self.handle.aborted.load(Ordering::SeqCst) {
            return Err(self.aborted_error());
        }
        let r = guarded("nccl all-reduce", || self.reduce(buf));
        // An abort during the call makes whatever came back meaningless, even "success".
        if self.handle.aborted.load(Ordering::SeqCst) {
            return Err(self.aborted_error());
        }
        r?;
        buf.copy_from_slice(&self.host);
        Ok(())
    }

    fn aborter(&self) -> Aborter {
        let handle = self.handle.clone();
        Aborter::new(move || handle.abort())
    }
}
