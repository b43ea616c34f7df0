//! The `FetchDataFile` RPC's adapter: turns a request into the chunks of one of the run's
//! served files ([`crate::data_files`]) on a bounded channel, read on a blocking thread so
//! that a large store never holds up the runtime. A request for anything else is
//! `NOT_FOUND`; a run with nothing to serve (the synthetic survey) `FAILED_PRECONDITION`.

use crate::data_files::{DataFiles, Refusal};
use gpo_proto::v1 as pb;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// The stream the RPC answers with.
pub type ChunkStream = ReceiverStream<Result<pb::DataFileChunk, Status>>;

/// Chunks in flight per stream (each at most 1 MiB).
const IN_FLIGHT: usize = 4;

/// The chunks of `root/path` of `files`, or why not.
pub fn stream(
    files: Option<&Arc<DataFiles>>,
    root: &str,
    path: &str,
) -> Result<ChunkStream, Status> {
    let files = files.ok_or_else(|| {
        Status::failed_precondition(
            "this coordinator serves no data files (the run's data is the built-in synthetic survey)",
        )
    })?;
    let chunks = files.chunks(root, path).map_err(|r| match r {
        Refusal::NotServed(m) => Status::not_found(m),
        Refusal::Io(m) => Status::internal(m),
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        for c in chunks {
            let msg = c
                .map(|c| pb::DataFileChunk {
                    offset: c.offset,
                    data: c.data,
                    last: c.sha256.is_some(),
                    size: c.size,
                    sha256: c.sha256.unwrap_or_default(),
                })
                .map_err(|e| {
                    tracing::warn!("serving a data file: {e}");
                    Status::internal(e.to_string())
                });
            let failed = msg.is_err();
            if tx.blocking_send(msg).is_err() || failed {
                return; // the worker went away, or the read failed (it was told)
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}
