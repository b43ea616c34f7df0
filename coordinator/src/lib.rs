//! gpo-coordinator: owns a GPO run. It splits groups, samples each step's episode specs
//! (pure functions of seed and step), hands them to replicas, evaluates on schedule, keeps
//! the best checkpoint, and writes the run's summary.
//!
//! [`run::train`] drives replicas through the [`run::Dispatch`] trait; the single-process
//! trainer dispatches to one in-process replica ([`run::InProcess`]); the distributed one
//! serves the `gpo.v1` gRPC API ([`server::CoordinatorService`]) and dispatches to remote
//! workers ([`server::GrpcDispatch`]).

pub mod config;
pub mod run;
pub mod server;

pub use config::RunConfig;
pub use run::{train, Dispatch, InProcess, RunEvent, Summary};
pub use server::{CoordinatorOptions, CoordinatorService, GrpcDispatch, RunInfo};
