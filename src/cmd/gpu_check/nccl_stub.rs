//! The NCCL checks without the `cuda` feature: each fails saying so. A file of its own so
//! that the CPU build, which has no NCCL, still has the `nccl` module `all_checks` calls
//! (`nccl.rs` is the real one).

use super::Outcome;
use anyhow::{bail, Result};

pub fn one_rank() -> Result<Outcome> {
    bail!("built without the `cuda` feature: no NCCL")
}

pub fn sweep(_max_mb: usize) -> Result<Outcome> {
    bail!("built without the `cuda` feature: no NCCL")
}
