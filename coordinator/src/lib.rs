//! gpo-coordinator: owns a GPO run. It splits groups, samples each step's episode specs
//! (pure functions of seed and step), hands them to replicas, evaluates on schedule, keeps
//! the best checkpoint, and writes the run's summary.
//!
//! [`run::train`] drives replicas through the [`run::Dispatch`] trait; the single-process
//! trainer dispatches to one in-process replica ([`run::InProcess`]); the distributed one
//! serves the `gpo.v1` gRPC API ([`server::CoordinatorService`], [`service`]) and dispatches to remote
//! workers ([`dispatch::GrpcDispatch`]). Membership, generations, fencing, the step round
//! and recovery are decided by the pure state machine in [`machine`]; the service and the
//! dispatch only carry its events and actions. Before a run whose embedding store lacks
//! texts, [`embed_service`] serves the embedding phase (the pure [`embed_job`] under a
//! tonic service) on the same port.

pub mod config;
mod data_fetch;
pub mod data_files;
pub mod dispatch;
pub mod embed_job;
pub mod embed_service;
pub mod etcd;
pub mod machine;
pub mod plan;
mod resume;
pub mod run;
pub mod security;
pub mod server;
pub mod service;
mod shared;
mod status;

pub use config::RunConfig;
pub use dispatch::{GrpcDispatch, StepTimes};
pub use run::{train, Dispatch, InProcess, RunEvent, Summary};
pub use security::Security;
pub use server::{new_run_id, CoordinatorService};
pub use service::{CoordinatorOptions, RunInfo};
