//! gpo-proto: the generated code of the `gpo.v1` gRPC API (see `gpo/v1/gpo.proto`).

/// Version 1 of the API.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("gpo.v1");
}
