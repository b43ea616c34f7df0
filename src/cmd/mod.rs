//! The subcommands, one module each.

pub mod bench;
pub mod eval;
pub mod loss;
pub mod model_info;
pub mod synth;
pub mod train;
