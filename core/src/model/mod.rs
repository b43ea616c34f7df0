//! The GPO module (a Transformer Neural Process over preference points) in candle:
//! configuration and official parameter names ([`params`]), its input ([`batch`]), the
//! forward pass and loss ([`gpo`]), and the fused ops with their backward ([`ops`]) next
//! to their composite references ([`composite`]); the training step's hand-written backward
//! ([`tape`]); what a step costs in operations ([`flops`]).

pub mod balance;
pub mod batch;
pub mod composite;
pub mod flops;
pub mod gpo;
pub mod ops;
pub mod params;
pub mod tape;

pub use batch::{build_batch, ModelBatch};
pub use gpo::{Backward, EncodedContext, Gpo, OpPath};
pub use params::{GpoConfig, Params, Variant};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod variant_tests;
