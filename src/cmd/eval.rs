//! `gpo eval`: re-evaluates a checkpoint on the held-out groups of the run that wrote it.
//! The data must be the run's: a checkpoint records the data fingerprint and the embedder
//! id, and other data of the same width is refused unless `--force` (then it warns).

use crate::inputs::{self, DataArgs};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use gpo_coordinator::run::RunPlan;
use gpo_coordinator::RunConfig;
use gpo_core::io::checkpoint;
use gpo_core::model::{Gpo, Params};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint written by `gpo train`. It names its run's data (dataset, format and
    /// store), which is evaluated on unless --data (with --format, --embeddings) says
    /// otherwise; --embeddings alone swaps the store of the recorded dataset.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Context questions per held-out group (default: the run's).
    #[arg(long)]
    pub eval_context: Option<usize>,
    /// Evaluate even when the data is not the one the checkpoint was trained on (its
    /// fingerprint differs): warn instead of refusing.
    #[arg(long)]
    pub force: bool,
}

/// Whether the data loaded is the data a checkpoint was trained on: `Ok(None)` when it
/// is, `Ok(Some(warning))` when it cannot be told (an older checkpoint) or differs under
/// `force`, and an error naming both fingerprints when it differs without `force`.
pub fn check_data(
    recorded: Option<&gpo_core::checkpoint::DataIdentity>,
    fingerprint: &str,
    embedder: &str,
    checkpoint: &std::path::Path,
    force: bool,
) -> Result<Option<String>> {
    let Some(d) = recorded else {
        return Ok(Some(format!(
            "{} records no data fingerprint (written before gpo recorded one): cannot check that this is the data it was trained on",
            checkpoint.display()
        )));
    };
    if d.fingerprint == fingerprint {
        return Ok(None);
    }
    let what = format!(
        "{} was trained on data with fingerprint {} (embedder `{}`), but this data's fingerprint is {fingerprint} (embedder `{embedder}`)",
        checkpoint.display(),
        d.fingerprint,
        d.embedder
    );
    if force {
        Ok(Some(format!("{what}; evaluating anyway (--force)")))
    } else {
        anyhow::bail!("{what}: pass the run's --data and --embeddings, or --force to evaluate on this data anyway")
    }
}

/// The data to evaluate on: the flags when they name a dataset, else what the checkpoint
/// records (with `--embeddings`, if given, in place of the recorded store).
pub fn data_of(
    flags: &DataArgs,
    recorded: Option<&gpo_core::checkpoint::DataIdentity>,
) -> DataArgs {
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    match recorded {
        Some(d) if flags.data.is_none() && !d.paths.data.is_empty() => DataArgs {
            data: Some(PathBuf::from(&d.paths.data)),
            format: flags.format.clone().or(nonempty(&d.paths.format)),
            embeddings: flags
                .embeddings
                .clone()
                .or(nonempty(&d.paths.embeddings).map(PathBuf::from)),
        },
        _ => flags.clone(),
    }
}

/// Rebuilds the module held by a checkpoint.
pub fn model_from_checkpoint(
    c: &gpo_core::checkpoint::Checkpoint,
    cfg: &gpo_core::model::GpoConfig,
) -> Result<Gpo> {
    let named: HashMap<String, Tensor> = c
        .params
        .iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                Tensor::from_slice(&p.data, p.shape.as_slice(), &Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let params = Params::from_named(cfg, named).map_err(anyhow::Error::msg)?;
    Ok(Gpo::from_params(cfg.clone(), params))
}

pub fn run(a: Args) -> Result<()> {
    let c = checkpoint::load(&a.checkpoint).map_err(anyhow::Error::msg)?;
    let mut cfg: RunConfig = serde_json::from_value(c.config.clone()).with_context(|| {
        format!(
            "{}: no gpo run configuration in the checkpoint",
            a.checkpoint.display()
        )
    })?;
    if let Some(n) = a.eval_context {
        cfg.eval_context = n;
    }
    let data = data_of(&a.data, c.data.as_ref());
    let inputs::Loaded {
        survey,
        features,
        desc,
        embedder,
    } = inputs::load_data(&data, cfg.seed)?;
    cfg.check_embedder(&embedder, &crate::cmd::train::store_name(&data))
        .map_err(anyhow::Error::msg)?;
    if features.dim != cfg.model.dim_x {
        anyhow::bail!(
            "the checkpoint expects embeddings of width {}, the data has {}",
            cfg.model.dim_x,
            features.dim
        );
    }
    let fingerprint = gpo_worker::wire::data_fingerprint(&survey, &features);
    if let Some(w) = check_data(
        c.data.as_ref(),
        &fingerprint,
        &embedder,
        &a.checkpoint,
        a.force,
    )? {
        eprintln!("warning: {w}");
    }
    let model = model_from_checkpoint(&c, &cfg.model)?;
    let plan = RunPlan::new(&cfg, &survey)?;
    let features = gpo_coordinator::plan::run_features(&cfg, &survey, features)?;
    let scores = plan.evaluate(&model, &survey, &features, &Device::Cpu)?;
    let report = scores.test;
    eprintln!("data: {desc}; checkpoint step {}", c.step);
    if let Some(v) = &scores.validation {
        eprintln!(
            "validation groups ({}, which selected the checkpoint): gpo {:.4}",
            plan.validation.len(),
            v.methods["gpo"]
        );
    }
    inputs::print_table(
        report.metric,
        &report.methods,
        &format!(
            ", {} held-out groups, {} pairs",
            plan.test.len(),
            report.pairs
        ),
    );
    Ok(())
}
