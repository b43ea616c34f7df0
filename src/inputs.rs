//! The CLI's I/O edge: datasets and embedding stores from paths (or the built-in synthetic
//! survey), turned into the pure [`Survey`] and [`PointFeatures`] the trainer consumes.

use anyhow::{bail, Context, Result};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_core::io::dataset::{self, Format};
use gpo_core::io::store::EmbeddingStore;
use gpo_core::prompt::Template;
use gpo_core::synth::{self, SynthConfig};
use std::path::{Path, PathBuf};

/// Where a run's data comes from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DataArgs {
    /// Dataset path (gpo's folder format, an OpinionQA folder, or a CSV). Without it, the
    /// built-in synthetic survey is generated from the seed.
    #[arg(long, env = "GPO_DATA")]
    pub data: Option<PathBuf>,
    /// Dataset layout, when auto-detection is not wanted: native, opinionqa, weighted, global.
    #[arg(long, env = "GPO_FORMAT")]
    pub format: Option<String>,
    /// Embedding store folder (default: `<data>/embeddings` when it exists).
    #[arg(long, env = "GPO_EMBEDDINGS")]
    pub embeddings: Option<PathBuf>,
}

/// Parses a `--format` value.
pub fn parse_format(s: &str) -> Result<Format> {
    Format::ALL
        .into_iter()
        .find(|f| f.name() == s)
        .with_context(|| {
            let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
            format!(
                "unknown --format `{s}` (expected one of: {})",
                names.join(", ")
            )
        })
}

/// Builds point features for a survey from an embedding store, using the store's template.
pub fn features_from_store(s: &Survey, store: &EmbeddingStore) -> Result<PointFeatures> {
    let meta = store.meta().clone();
    let template = Template::parse(&meta.template)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("embedding store {}", store.dir().display()))?;
    PointFeatures::build(s, store.dim(), |q, k| {
        store.get(&meta.key(&template.render(q, k)))
    })
    .map_err(anyhow::Error::msg)
    .with_context(|| {
        format!(
            "embedding store {} (embedder `{}`)",
            store.dir().display(),
            meta.embedder
        )
    })
}

/// The synthetic survey and its features, in memory.
pub fn synthetic(cfg: &SynthConfig) -> Result<(Survey, PointFeatures)> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let out = synth::generate(cfg);
    let table: std::collections::HashMap<&str, &[f32]> = out
        .embeddings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let meta = out.store_meta();
    let f = PointFeatures::build(&out.survey, out.dim, |q, k| {
        table
            .get(meta.key(&out.template.render(q, k)).as_str())
            .copied()
    })
    .map_err(anyhow::Error::msg)?;
    Ok((out.survey.clone(), f))
}

/// Loads the survey and its features as the flags say.
pub fn load(args: &DataArgs, synth_seed: u64) -> Result<(Survey, PointFeatures, String)> {
    let Some(data) = &args.data else {
        if args.embeddings.is_some() {
            bail!("--embeddings needs --data (the built-in synthetic survey brings its own embeddings)");
        }
        let cfg = SynthConfig {
            seed: synth_seed,
            ..Default::default()
        };
        let (s, f) = synthetic(&cfg)?;
        return Ok((
            s,
            f,
            format!("built-in synthetic survey (seed {synth_seed})"),
        ));
    };
    let survey = match &args.format {
        Some(f) => dataset::load_as(data, parse_format(f)?)?,
        None => dataset::load(data)?,
    };
    let store_dir = match &args.embeddings {
        Some(e) => e.clone(),
        None => {
            let guess = if data.is_dir() {
                data.join("embeddings")
            } else {
                data.with_file_name("embeddings")
            };
            if !guess.join("index.json").exists() {
                bail!(
                    "no embeddings for {}: pass --embeddings DIR (an embedding store), or put one at {}",
                    data.display(),
                    guess.display()
                );
            }
            guess
        }
    };
    let store = EmbeddingStore::open(&store_dir)?;
    let features = features_from_store(&survey, &store)?;
    let desc = format!(
        "{} ({} groups × {} questions), embeddings `{}`",
        data.display(),
        survey.groups.len(),
        survey.questions.len(),
        store.meta().embedder
    );
    Ok((survey, features, desc))
}

/// Prints an alignment table.
pub fn print_table(
    metric: gpo_core::data::MetricKind,
    methods: &std::collections::BTreeMap<String, f64>,
    note: &str,
) {
    let mut rows: Vec<_> = methods.iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1));
    println!("{:<12} alignment ({:?}{note})", "method", metric);
    for (m, v) in rows {
        println!("{m:<12} {v:.4}");
    }
}

/// Checks that a path is absent or an empty-ish output folder we may write into.
pub fn output_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p)
        .with_context(|| format!("cannot create output folder {}", p.display()))
}
