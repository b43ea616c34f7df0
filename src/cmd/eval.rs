//! `gpo eval`: re-evaluates a checkpoint on the held-out groups of the run that wrote it.

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
    /// A checkpoint written by `gpo train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Context questions per held-out group (default: the run's).
    #[arg(long)]
    pub eval_context: Option<usize>,
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
    let (survey, features, desc) = inputs::load(&a.data, cfg.seed)?;
    if features.dim != cfg.model.dim_x {
        anyhow::bail!(
            "the checkpoint expects embeddings of width {}, the data has {}",
            cfg.model.dim_x,
            features.dim
        );
    }
    let model = model_from_checkpoint(&c, &cfg.model)?;
    let plan = RunPlan::new(&cfg, &survey)?;
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
