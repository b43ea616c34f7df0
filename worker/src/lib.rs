//! gpo-worker: one GPO replica. It computes the gradient of the episodes assigned to it,
//! all-reduces that gradient with its peers through a [`Collective`], and takes the same
//! Adam step as every other replica, so all replicas stay identical.
//!
//! The single-process trainer runs one replica with the [`collective::Local`] collective.
//! A distributed worker ([`client`]) registers with a coordinator over gRPC, reads its data
//! from a shared path or fetches it from the coordinator into a local cache
//! ([`data_fetch`], [`data_cache`]), and all-reduces over a [`ring::TcpRing`] (CPU) or NCCL
//! (`nccl`, under the `cuda` feature).

pub mod addr;
pub mod client;
pub mod collective;
pub mod data_cache;
pub mod data_fetch;
pub mod device;
pub mod embed_work;
pub mod etcd;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod replica;
pub mod ring;
pub mod ring_addr;
pub mod session;
pub mod wire;

pub use collective::{Aborter, Collective, Local};
pub use replica::{Replica, StepOutcome};
