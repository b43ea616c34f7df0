//! The gRPC adapter (`gpo.v1.Serve`, tonic): the same validation and core as HTTP, with
//! [`ServeError`] mapped to gRPC codes; INVALID_ARGUMENT and NOT_FOUND name the field in the
//! message and in the `gpo-field` metadata.

use crate::service::{ServeError, Server};
use crate::task;
use gpo_proto::serve::v1 as pb;
use gpo_proto::serve_codec::invalid;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC service over a [`Server`].
#[derive(Clone)]
pub struct Grpc(pub Arc<Server>);

/// The status of a failed request.
pub fn status(e: ServeError) -> Status {
    match e {
        ServeError::Invalid(f) => invalid(&f.field, &f.message),
        ServeError::NotFound(f) => {
            let mut s = Status::not_found(format!("{}: {}", f.field, f.message));
            if let Ok(v) = f.field.parse() {
                s.metadata_mut()
                    .insert(gpo_proto::serve_codec::FIELD_METADATA, v);
            }
            s
        }
        ServeError::Busy => Status::resource_exhausted(
            "the server is at its concurrency and queue limits; retry later",
        ),
        ServeError::Deadline => Status::deadline_exceeded("the request's deadline passed"),
        ServeError::Internal(m) => Status::internal(m),
    }
}

#[tonic::async_trait]
impl pb::serve_server::Serve for Grpc {
    async fn predict(
        &self,
        r: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let s = &self.0;
        let p = s
            .handle("predict", async {
                let t = task::predict_from_pb(r.into_inner(), &s.options.limits)
                    .map_err(ServeError::Invalid)?;
                s.predict(t).await
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PredictResponse {
            predictions: p
                .into_iter()
                .map(|distribution| pb::Prediction { distribution })
                .collect(),
        }))
    }

    async fn rerank(
        &self,
        r: Request<pb::RerankRequest>,
    ) -> Result<Response<pb::RerankResponse>, Status> {
        let s = &self.0;
        let res = s
            .handle("rerank", async {
                let t = task::rerank_from_pb(r.into_inner(), &s.options.limits)
                    .map_err(ServeError::Invalid)?;
                s.rerank(t).await
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RerankResponse {
            results: res
                .into_iter()
                .map(|(i, score)| pb::RerankResult {
                    index: i as u32,
                    score,
                })
                .collect(),
        }))
    }

    async fn create_group(
        &self,
        r: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let s = &self.0;
        let (group_id, n) = s
            .handle("groups", async {
                let c = task::group_from_pb(r.into_inner(), &s.options.limits)
                    .map_err(ServeError::Invalid)?;
                s.create_group(c).await
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateGroupResponse {
            group_id,
            context_size: n as u32,
        }))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(pb::InfoResponse {
            json: self.0.info().to_string(),
        }))
    }
}

/// The tonic service to mount.
pub fn service(server: Arc<Server>) -> pb::serve_server::ServeServer<Grpc> {
    pb::serve_server::ServeServer::new(Grpc(server))
}
