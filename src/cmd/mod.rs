//! The subcommands, one module each.

pub mod bench;
pub mod bench_machinery;
pub mod bench_step;
pub mod bench_sweep;
pub mod coordinator;
pub mod credentials;
pub mod embed;
pub mod eval;
pub mod experiment;
pub mod gpu_check;
pub mod loss;
pub mod model_info;
pub mod roofline;
pub mod serve;
pub mod status;
pub mod sweep;
pub mod synth;
pub mod train;
pub mod worker;
pub mod worker_pool;
