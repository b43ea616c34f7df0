//! gpo-worker: one GPO replica. It computes the gradient of the episodes assigned to it,
//! all-reduces that gradient with its peers through a [`Collective`], and takes the same
//! Adam step as every other replica, so all replicas stay identical.
//!
//! The single-process trainer runs one replica with the [`collective::Local`] collective;
//! the distributed transports plug in behind the same trait.

pub mod collective;
pub mod replica;

pub use collective::{Collective, Local};
pub use replica::{Replica, StepOutcome};
