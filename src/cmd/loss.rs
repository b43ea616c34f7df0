//! `gpo loss`: the GPO loss of one batch in the official tensor layout, under a checkpoint's
//! weights, so the module can be checked against another implementation holding them.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use gpo_core::io::checkpoint;
use gpo_core::model::{Gpo, GpoConfig, ModelBatch, OpPath, Params};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A gpo checkpoint, or a plain safetensors file of the module's parameters under the
    /// official names.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Safetensors with xc [G,Nc,D], yc [G,Nc,1], xt [G,Nt,D], yt [G,Nt,1] (f32) and
    /// tarqlen [G,Q] (i64).
    #[arg(long)]
    pub batch: PathBuf,
    /// Attention heads (only read when the checkpoint does not record its config).
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Use the composite (reference) ops instead of the fused ones.
    #[arg(long)]
    pub composite: bool,
}

pub fn run(a: Args) -> Result<()> {
    let c = checkpoint::load(&a.checkpoint).map_err(anyhow::Error::msg)?;
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
    let cfg: GpoConfig = match c.config.get("model") {
        Some(m) => serde_json::from_value(m.clone()).context("checkpoint config `model`")?,
        None => Params::infer_config(&named, a.heads)
            .map_err(anyhow::Error::msg)
            .with_context(|| a.checkpoint.display().to_string())?,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let params = Params::from_named(&cfg, named)
        .map_err(anyhow::Error::msg)
        .with_context(|| a.checkpoint.display().to_string())?;
    let mut model = Gpo::from_params(cfg, params);
    if a.composite {
        model.path = OpPath::Composite;
    }
    let t = candle_core::safetensors::load(&a.batch, &Device::Cpu)
        .with_context(|| format!("{}: cannot read batch", a.batch.display()))?;
    let get = |n: &str| {
        t.get(n)
            .with_context(|| format!("{}: batch has no tensor `{n}`", a.batch.display()))
    };
    let f32t = |n: &str| -> Result<Tensor> { Ok(get(n)?.to_dtype(DType::F32)?) };
    let tarqlen: Vec<Vec<i64>> = get("tarqlen")?
        .to_dtype(DType::I64)?
        .to_vec2()
        .with_context(|| format!("{}: `tarqlen` must be [G, Q]", a.batch.display()))?;
    let batch = ModelBatch::from_official(
        &f32t("xc")?,
        &f32t("yc")?,
        &f32t("xt")?,
        &f32t("yt")?,
        &tarqlen,
    )
    .map_err(anyhow::Error::msg)
    .with_context(|| a.batch.display().to_string())?;
    let loss = model.loss(&batch)?.to_scalar::<f32>()?;
    println!("loss={loss}");
    Ok(())
}
