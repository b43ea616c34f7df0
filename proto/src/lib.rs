//! gpo-proto: the generated code of the `gpo.v1` gRPC API (see `gpo/v1/gpo.proto`) and of
//! the serving API (`gpo/v1/serve.proto`, the `Serve` service of `gpo serve`).

/// Version 1 of the API.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("gpo.v1");
}

pub mod serve_codec;

/// The serving API (`gpo.v1.Serve`), generated apart from [`v1`] because its codec differs.
pub mod serve {
    /// Package `gpo.v1` of `serve.proto`.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/serve/gpo.v1.rs"));
    }
}
