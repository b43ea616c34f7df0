//! `gpo experiment --config FILE --out DIR`: the paper's protocol in one command (see
//! [`crate::experiment`]).

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experiment TOML (see examples/).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: results.json, fewshot.json, report.md, plots, per-run folders.
    #[arg(long)]
    pub out: PathBuf,
    /// Runs (dataset × split × seed) trained at once in this process, through the sweep's
    /// scheduler. Each run is seeded, so the results are the same for any value.
    #[arg(long, default_value_t = 1)]
    pub concurrent: usize,
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let cfg = crate::experiment::ExperimentConfig::from_toml(&text, &a.config)?;
    crate::experiment::run(&cfg, &a.out, a.concurrent)?;
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}
