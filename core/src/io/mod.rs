//! The I/O edge of the core crate: reading and writing files. Everything else in gpo-core is
//! pure; modules here turn paths into the pure types (and back) with located errors.

pub mod checkpoint;
pub mod dataset;
pub mod store;
