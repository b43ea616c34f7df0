//! gpo-core: the pure logic of Group Preference Optimization.
//!
//! Everything here is deterministic and free of I/O except the [`io`] module, which is the
//! one edge that touches files (dataset folders, the embedding store, checkpoint files).
//! The GPO module itself lives in [`model`]; episodes come from [`sampler`]; alignment
//! scores from [`metrics`].

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod features;
pub mod grad;
pub mod io;
pub mod lm_prompt;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod presets;
pub mod prior;
pub mod prompt;
pub mod rng;
pub mod sampler;
pub mod store;
pub mod synth;
