//! `gpo synth`: writes the seeded synthetic survey in gpo's folder format, with an
//! embedding store of its latent features (labelled synthetic) beside it.

use anyhow::{Context, Result};
use gpo_core::io::{dataset, store::StoreWriter};
use gpo_core::synth::{generate, SynthConfig};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder (gets survey.json, answers.jsonl and embeddings/).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of questions.
    #[arg(long, default_value_t = SynthConfig::default().n_questions)]
    pub questions: usize,
    /// Number of groups.
    #[arg(long, default_value_t = SynthConfig::default().n_groups)]
    pub groups: usize,
    /// Embedding width.
    #[arg(long, default_value_t = SynthConfig::default().dim)]
    pub dim: usize,
    /// Dimensions of the groups' latent stances.
    #[arg(long, default_value_t = SynthConfig::default().latent)]
    pub latent: usize,
    /// Noise added to every embedding coordinate.
    #[arg(long, default_value_t = SynthConfig::default().noise)]
    pub noise: f32,
    /// Write individual users instead of groups: this many per latent group, each
    /// answering one option per question (scored by accuracy).
    #[arg(long, default_value_t = 0)]
    pub individuals: usize,
    /// How far each question's loading strays from its topic's direction: the part of the
    /// structure a text embedder cannot see in the question's wording.
    #[arg(long, default_value_t = SynthConfig::default().loading_spread)]
    pub loading_spread: f64,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = SynthConfig {
        seed: a.seed,
        n_questions: a.questions,
        n_groups: a.groups,
        dim: a.dim,
        latent: a.latent,
        noise: a.noise,
        individuals_per_group: a.individuals,
        loading_spread: a.loading_spread,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let out = generate(&cfg);
    dataset::write_native(&a.out, &out.survey)?;
    let mut w = StoreWriter::new(out.store_meta());
    for (k, v) in &out.embeddings {
        w.insert(k.clone(), v)?;
    }
    let store_dir = a.out.join("embeddings");
    w.write(&store_dir)
        .with_context(|| format!("writing {}", store_dir.display()))?;
    println!(
        "wrote {}: {} questions, {} groups; {} embeddings (dim {}, synthetic) in {}",
        a.out.display(),
        out.survey.questions.len(),
        out.survey.groups.len(),
        out.embeddings.len(),
        out.dim,
        store_dir.display()
    );
    Ok(())
}
