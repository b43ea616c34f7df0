//! How a worker gets the run's data: from the path the coordinator names when it can read
//! it and the data's fingerprint is the run's (the fast path, a shared volume); else from
//! its cache (a copy fetched on an earlier join, found by the fingerprint); else fetched
//! from the coordinator over `FetchDataFile` into the cache ([`crate::data_cache`]).
//! Whatever the source, the data is used only when its fingerprint is the coordinator's.

use crate::client::{within, DataLoader, CALL_TIMEOUT};
use crate::data_cache::DataCache;
use crate::wire;
use anyhow::{bail, Context, Result};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_proto::v1 as pb;
use std::path::Path;
use std::time::Instant;

/// Loads `source` on a blocking thread and returns the data with its fingerprint.
async fn load(
    loader: &DataLoader,
    source: pb::DataSource,
) -> Result<(Survey, PointFeatures, String)> {
    let l = loader.clone();
    tokio::task::spawn_blocking(move || {
        let (s, f) = l(&source)?;
        let fp = wire::data_fingerprint(&s, &f);
        Ok((s, f, fp))
    })
    .await
    .context("loading the data panicked")?
}

/// A data source that reads the local copy at `copy`.
fn relocated(src: &pb::DataSource, ds: &pb::DatasetPath, copy: &Path) -> Result<pb::DataSource> {
    Ok(pb::DataSource {
        source: Some(pb::data_source::Source::Dataset(
            crate::data_cache::local_source(ds, copy).map_err(anyhow::Error::msg)?,
        )),
        fingerprint: src.fingerprint.clone(),
    })
}

/// The run's data for this registration, checked against `reg.data_fingerprint`.
pub async fn obtain(
    client: &mut crate::client::Client,
    reg: &pb::RegisterResponse,
    loader: &DataLoader,
    cache: &DataCache,
) -> Result<(Survey, PointFeatures)> {
    let source = reg
        .data
        .clone()
        .context("the coordinator named no data source")?;
    let want = &reg.data_fingerprint;
    // The fast path: the coordinator's own path.
    let why = match load(loader, source.clone()).await {
        Ok((s, f, fp)) if &fp == want => return Ok((s, f)),
        Ok((_, _, fp)) => format!(
            "the data at the coordinator's path has fingerprint {fp}, the coordinator's is {want}"
        ),
        Err(e) => format!("{e:#}"),
    };
    let ds = match &source.source {
        Some(pb::data_source::Source::Dataset(ds)) if !ds.files.is_empty() => ds,
        _ => bail!(
            "this worker's data differs from the coordinator's, and the coordinator serves no files to fetch: {why}"
        ),
    };
    // A copy from an earlier join.
    if let Some(copy) = cache.lookup(want) {
        match load(loader, relocated(&source, ds, &copy)?).await {
            Ok((s, f, fp)) if &fp == want => {
                tracing::info!(
                    "data: the coordinator's path is not usable here ({why}); using the copy cached at {}",
                    copy.display()
                );
                return Ok((s, f));
            }
            other => {
                let what = match other {
                    Ok((_, _, fp)) => format!("it loads with fingerprint {fp}"),
                    Err(e) => format!("{e:#}"),
                };
                tracing::warn!(
                    "the cached copy at {} is not the run's data ({what}); fetching it again",
                    copy.display()
                );
                cache.evict(want).map_err(anyhow::Error::msg)?;
            }
        }
    }
    tracing::info!(
        "data: the coordinator's path is not usable here ({why}); fetching {} files from the coordinator into {}",
        ds.files.len(),
        cache.dir().display()
    );
    let copy = fetch(client, &reg.run_id, ds, cache, want).await?;
    let (s, f, fp) = load(loader, relocated(&source, ds, &copy)?)
        .await
        .with_context(|| format!("loading the data fetched into {}", copy.display()))?;
    if &fp != want {
        let _ = cache.evict(want);
        bail!(
            "the data fetched from the coordinator has fingerprint {fp}, not the run's {want}: its files changed after it loaded them"
        );
    }
    Ok((s, f))
}

/// Fetches every file `ds` lists into a new copy of `fp` in `cache`; returns its folder.
pub async fn fetch(
    client: &mut crate::client::Client,
    run_id: &str,
    ds: &pb::DatasetPath,
    cache: &DataCache,
    fp: &str,
) -> Result<std::path::PathBuf> {
    let start = Instant::now();
    let staging = cache.stage(fp).map_err(anyhow::Error::msg)?;
    let mut bytes = 0u64;
    for entry in &ds.files {
        let name = format!("{}/{}", entry.root, entry.path);
        let mut w = staging.file(entry).map_err(anyhow::Error::msg)?;
        let req = pb::FetchDataFileRequest {
            run_id: run_id.to_string(),
            root: entry.root.clone(),
            path: entry.path.clone(),
        };
        let mut stream = within(
            CALL_TIMEOUT,
            "fetching a data file",
            client.fetch_data_file(req),
        )
        .await
        .map_err(|s| anyhow::anyhow!("fetching {name}: {}", s.message()))?
        .into_inner();
        loop {
            let msg = within(CALL_TIMEOUT, "fetching a data file", stream.message())
                .await
                .map_err(|s| anyhow::anyhow!("fetching {name}: {}", s.message()))?;
            let Some(chunk) = msg else { break };
            w.push(&chunk).map_err(anyhow::Error::msg)?;
            bytes += chunk.data.len() as u64;
        }
        w.finish().map_err(anyhow::Error::msg)?;
    }
    let copy = staging.commit().map_err(anyhow::Error::msg)?;
    tracing::info!(
        "fetched {} files ({bytes} bytes) in {:.2}s into {}",
        ds.files.len(),
        start.elapsed().as_secs_f64(),
        copy.display()
    );
    Ok(copy)
}
