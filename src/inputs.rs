//! The CLI's I/O edge: datasets and embedding stores from paths (or the built-in synthetic
//! survey), turned into the pure [`Survey`] and [`PointFeatures`] the trainer consumes.

use anyhow::{bail, Context, Result};
use gpo_core::data::{LoadReport, Survey};
use gpo_core::features::PointFeatures;
use gpo_core::io::dataset::{self, Format, LoadOptions};
use gpo_core::io::store::EmbeddingStore;
use gpo_core::prompt::Template;
use gpo_core::synth::{self, SynthConfig};
use std::path::{Path, PathBuf};

/// Where a run's data comes from.
///
/// The OpinionQA attributes chosen with `--attributes` travel inside `format` (as
/// `NAME:ATTR,ATTR`, or `:ATTR,ATTR` to keep auto-detection), so that a distributed run's
/// workers, which receive the coordinator's format string, load the same groups.
#[derive(Debug, Clone, Default)]
pub struct DataArgs {
    /// Dataset path; without it, the built-in synthetic survey.
    pub data: Option<PathBuf>,
    /// Dataset layout, optionally with `:ATTR,ATTR` (see the type's documentation).
    pub format: Option<String>,
    /// Embedding store folder.
    pub embeddings: Option<PathBuf>,
}

/// The flags of [`DataArgs`] as the command line has them.
#[derive(Debug, Clone, clap::Args)]
struct DataFlags {
    /// Dataset path (gpo's folder format, an OpinionQA folder, or a CSV). Without it, the
    /// built-in synthetic survey is generated from the seed.
    #[arg(long, env = "GPO_DATA")]
    data: Option<PathBuf>,
    /// Dataset layout, when auto-detection is not wanted: native, opinionqa, weighted, global.
    #[arg(long, env = "GPO_FORMAT")]
    format: Option<String>,
    /// Embedding store folder (default: `<data>/embeddings` when it exists).
    #[arg(long, env = "GPO_EMBEDDINGS")]
    embeddings: Option<PathBuf>,
    /// OpinionQA counts: the attributes to load, comma-separated (default AGE, CREGION,
    /// EDUCATION, INCOME, POLIDEOLOGY, POLPARTY, RACE, SEX; a wave that lacks some loads
    /// the others, with a warning naming them).
    #[arg(long, env = "GPO_ATTRIBUTES", value_delimiter = ',')]
    attributes: Option<Vec<String>>,
}

impl From<DataFlags> for DataArgs {
    fn from(f: DataFlags) -> Self {
        let format = match f.attributes {
            Some(a) if !a.is_empty() => Some(format!(
                "{}:{}",
                f.format.unwrap_or_default(),
                a.iter().map(|s| s.trim()).collect::<Vec<_>>().join(",")
            )),
            _ => f.format,
        };
        DataArgs {
            data: f.data,
            format,
            embeddings: f.embeddings,
        }
    }
}

impl clap::FromArgMatches for DataArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        DataFlags::from_arg_matches(m).map(Into::into)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for DataArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        DataFlags::augment_args(cmd)
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        DataFlags::augment_args_for_update(cmd)
    }
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

/// Splits a format string `NAME[:ATTR,ATTR]` into the layout (`None`: detect) and the load
/// options.
pub fn parse_format_spec(s: &str) -> Result<(Option<Format>, LoadOptions)> {
    let (name, attrs) = match s.split_once(':') {
        Some((n, a)) => (n.trim(), Some(a)),
        None => (s.trim(), None),
    };
    let format = if name.is_empty() {
        None
    } else {
        Some(parse_format(name)?)
    };
    let attributes = match attrs {
        None => None,
        Some(a) => {
            let list: Vec<String> = a
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect();
            if list.is_empty() {
                bail!("`--attributes` (or `{s}`) names no attribute");
            }
            if format.is_some_and(|f| f != Format::OpinionQa) {
                bail!(
                    "`--attributes` applies to OpinionQA counts (format opinionqa), not to {name}"
                );
            }
            Some(list)
        }
    };
    Ok((format, LoadOptions { attributes }))
}

/// Prints a load report's warnings (the first 20) and counts to stderr.
pub fn print_load_report(what: &str, r: &LoadReport) {
    const SHOWN: usize = 20;
    for w in r.warnings.iter().take(SHOWN) {
        eprintln!("warning: {w}");
    }
    if r.warnings.len() > SHOWN {
        eprintln!("warning: … and {} more warnings", r.warnings.len() - SHOWN);
    }
    if let Some(line) = r.counts_line() {
        eprintln!("{what}: {line}");
    }
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

/// A run's data as loaded: the survey, its point features, a line for people, and the
/// embedder id of the store the features came from.
pub struct Loaded {
    pub survey: Survey,
    pub features: PointFeatures,
    /// What was loaded, for a log line.
    pub desc: String,
    /// The store's model identity (`index.json` `embedder`; the synthetic embedder's id
    /// for the built-in survey).
    pub embedder: String,
}

/// The embedding store folder the flags name: `--embeddings`, else `<data>/embeddings`
/// (a folder dataset) or `embeddings` beside a file dataset, when it holds an index.
pub fn store_dir(data: &Path, embeddings: Option<&Path>) -> Result<PathBuf> {
    let dir = match embeddings {
        Some(e) => e.to_path_buf(),
        None => {
            let guess = if data.is_dir() {
                data.join("embeddings")
            } else {
                data.with_file_name("embeddings")
            };
            if !guess.join(gpo_core::io::store::INDEX_FILE).exists() {
                bail!(
                    "no embeddings for {}: pass --embeddings STORE, an embedding store made by `gpo embed --data {} --model MODEL --out STORE` (MODEL: an HF folder, a .gguf file, or a hub id)",
                    data.display(),
                    data.display()
                );
            }
            guess
        }
    };
    if !dir.join(gpo_core::io::store::INDEX_FILE).exists() {
        bail!(
            "{} is not an embedding store (it has no {}): make one with `gpo embed --data {} --model MODEL --out {}`",
            dir.display(),
            gpo_core::io::store::INDEX_FILE,
            data.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// The data flags as a checkpoint records them: absolute paths, so `gpo eval` finds them
/// from any working directory (empty for the built-in synthetic survey).
pub fn recorded_paths(args: &DataArgs) -> gpo_core::checkpoint::DataPaths {
    let abs = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    gpo_core::checkpoint::DataPaths {
        data: args.data.as_deref().map(abs).unwrap_or_default(),
        format: args.format.clone().unwrap_or_default(),
        embeddings: args.embeddings.as_deref().map(abs).unwrap_or_default(),
    }
}

/// Loads the survey and its features as the flags say.
pub fn load(args: &DataArgs, synth_seed: u64) -> Result<(Survey, PointFeatures, String)> {
    let l = load_data(args, synth_seed)?;
    Ok((l.survey, l.features, l.desc))
}

/// [`load`], with the store's embedder id.
pub fn load_data(args: &DataArgs, synth_seed: u64) -> Result<Loaded> {
    let Some(data) = &args.data else {
        if args.embeddings.is_some() {
            bail!("--embeddings needs --data (the built-in synthetic survey brings its own embeddings)");
        }
        let cfg = SynthConfig {
            seed: synth_seed,
            ..Default::default()
        };
        let (survey, features) = synthetic(&cfg)?;
        return Ok(Loaded {
            survey,
            features,
            desc: format!("built-in synthetic survey (seed {synth_seed})"),
            embedder: synth::EMBEDDER.to_string(),
        });
    };
    let (format, opts) = match &args.format {
        Some(f) => parse_format_spec(f)?,
        None => (None, LoadOptions::default()),
    };
    let (survey, report) = dataset::load_with(data, format, &opts)?;
    print_load_report(&data.display().to_string(), &report);
    let store = EmbeddingStore::open(&store_dir(data, args.embeddings.as_deref())?)?;
    let features = features_from_store(&survey, &store)?;
    let embedder = store.meta().embedder.clone();
    let desc = format!(
        "{} ({} groups × {} questions), embeddings `{embedder}`",
        data.display(),
        survey.groups.len(),
        survey.questions.len(),
    );
    Ok(Loaded {
        survey,
        features,
        desc,
        embedder,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        data: DataArgs,
    }

    #[test]
    fn attributes_travel_in_the_format_string() {
        let c = Cli::parse_from(["x", "--data", "d", "--attributes", "SEX, RACE"]);
        assert_eq!(c.data.format.as_deref(), Some(":SEX,RACE"));
        let (f, o) = parse_format_spec(c.data.format.as_deref().unwrap()).unwrap();
        assert_eq!(f, None);
        assert_eq!(
            o.attributes,
            Some(vec!["SEX".to_string(), "RACE".to_string()])
        );
        let c = Cli::parse_from(["x", "--format", "opinionqa", "--attributes", "SEX"]);
        assert_eq!(c.data.format.as_deref(), Some("opinionqa:SEX"));
        let c = Cli::parse_from(["x", "--format", "global"]);
        assert_eq!(c.data.format.as_deref(), Some("global"));
        assert_eq!(parse_format_spec("global").unwrap().0, Some(Format::Global));
        let e = parse_format_spec("global:SEX").unwrap_err().to_string();
        assert!(e.contains("OpinionQA"), "{e}");
        assert!(parse_format_spec("opinionqa:").is_err());
    }
}
