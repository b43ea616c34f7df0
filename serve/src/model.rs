//! Loads the served module from a `gpo train` checkpoint, as `gpo eval` rebuilds it: the
//! run configuration's `model` sizes and the parameters under their official names.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use gpo_core::model::{Gpo, GpoConfig, Params};
use std::collections::HashMap;
use std::path::Path;

/// The module held by the checkpoint at `path`, and the checkpoint's step.
pub fn load(path: &Path) -> Result<(Gpo, u64)> {
    let c = gpo_core::io::checkpoint::load(path).map_err(anyhow::Error::msg)?;
    let cfg: GpoConfig = c
        .config
        .get("model")
        .cloned()
        .map(serde_json::from_value)
        .transpose()?
        .with_context(|| {
            format!(
                "{}: no gpo run configuration in the checkpoint",
                path.display()
            )
        })?;
    if cfg.variant.reads_prior() {
        anyhow::bail!(
            "{}: a `{}` checkpoint reads the population prior of its meta-training groups' answers to each question, which a served request does not carry; serve a `faithful` checkpoint (`model.variant`)",
            path.display(),
            cfg.variant.name()
        );
    }
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
    let params = Params::from_named(&cfg, named).map_err(anyhow::Error::msg)?;
    Ok((Gpo::from_params(cfg, params), c.step))
}
