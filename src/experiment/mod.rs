//! `gpo experiment`: the paper's protocol in one command. For every dataset, group split
//! and seed it meta-trains GPO (keeping the checkpoint that scores best on validation groups
//! carved from the meta-training groups, by default; `train.selection = "test"` selects on
//! the held-out groups, as the paper does), scores it on the held-out groups next to the
//! baselines, traces the few-shot curve, and writes `results.json`, `fewshot.json`,
//! `report.md` and PNG plots.

mod lm;
pub(crate) mod plots;
mod report;
mod variants;

use crate::inputs::{self, DataArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use gpo_coordinator::run::RunPlan;
use gpo_coordinator::{train, InProcess, RunConfig, RunEvent, Summary};
use gpo_core::data::Survey;
use gpo_core::eval::evaluate;
use gpo_core::features::PointFeatures;
use gpo_core::io::checkpoint;
use gpo_core::model::Variant;
use gpo_core::sampler::{common_questions, eval_episodes, evaluable_groups, subsample_targets};
use gpo_core::synth::SynthConfig;
use gpo_worker::Replica;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One dataset of an experiment.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Name used in results and file names.
    pub name: String,
    /// Dataset path (any layout `gpo train --data` takes); absent: the synthetic survey.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Explicit layout (native, opinionqa, weighted, global).
    #[serde(default)]
    pub format: Option<String>,
    /// Embedding store for `data`.
    #[serde(default)]
    pub embeddings: Option<PathBuf>,
    /// Model that fills `embeddings` first when the store is missing or incomplete
    /// (`gpo embed --model`: an HF folder, a GGUF, or a cached hub id).
    #[serde(default)]
    pub embed_model: Option<String>,
    /// Prompt template for `embed_model` (plain, alpaca, llama2-chat).
    #[serde(default = "default_template")]
    pub embed_template: String,
    /// Group preset: `all`, `opinionqa-paper`, `globalqa-paper`.
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Synthetic survey settings when `data` is absent (its seed is the run seed's).
    #[serde(default)]
    pub synth: Option<SynthConfig>,
    /// Decoder LLM for the baselines `lm_base`, `lm_steered` and `few_shot` (a GGUF, an HF
    /// folder or a cached hub id); absent: those baselines are not run.
    #[serde(default)]
    pub lm_model: Option<String>,
    /// Target questions per held-out group the LLM baselines score (one fixed subset of the
    /// survey's questions; 0: all). Every method is also scored on the same subset.
    #[serde(default = "default_lm_targets")]
    pub lm_targets: usize,
}

fn default_lm_targets() -> usize {
    100
}

fn default_preset() -> String {
    "all".into()
}

fn default_template() -> String {
    "plain".into()
}

/// Runs `gpo embed` for a dataset whose spec names a model (resumable: keys already in the
/// store are skipped, so a complete store costs one pass over the texts' hashes).
fn ensure_embeddings(d: &DatasetSpec) -> Result<()> {
    let (Some(model), Some(data), Some(store)) = (&d.embed_model, &d.data, &d.embeddings) else {
        return Ok(());
    };
    embed_store(model, data, d.format.as_deref(), &d.embed_template, store)
        .with_context(|| format!("embedding dataset `{}` with {model}", d.name))
}

/// `gpo embed --model MODEL --data DATA --template TEMPLATE --out STORE [--format F]`
/// (the layout part of F only: attributes change which groups load, not the texts).
pub fn embed_store(
    model: &str,
    data: &Path,
    format: Option<&str>,
    template: &str,
    store: &Path,
) -> Result<()> {
    #[derive(clap::Parser)]
    struct Embed {
        #[command(flatten)]
        args: crate::cmd::embed::Args,
    }
    let mut argv: Vec<std::ffi::OsString> = vec!["embed".into(), "--model".into(), model.into()];
    argv.extend([
        "--data".into(),
        data.into(),
        "--template".into(),
        template.into(),
    ]);
    argv.extend(["--out".into(), store.into()]);
    if let Some(f) = format.map(|f| f.split(':').next().unwrap_or("")) {
        if !f.is_empty() {
            argv.extend(["--format".into(), f.into()]);
        }
    }
    let e = <Embed as clap::Parser>::try_parse_from(argv).context("embedding arguments")?;
    crate::cmd::embed::run(e.args)
}

/// An experiment: datasets × splits × seeds, plus the few-shot curve.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Title of the report.
    #[serde(default = "default_name")]
    pub name: String,
    /// Meta-training fractions (the paper: 0.4, 0.6, 0.8).
    #[serde(default = "default_splits")]
    pub splits: Vec<f64>,
    /// Seeds (the paper: 3).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Context sizes of the few-shot curve (questions per held-out group); empty: none.
    #[serde(default = "default_few_shot")]
    pub few_shot: Vec<usize>,
    /// The split the few-shot curve is drawn on (default: the first).
    #[serde(default)]
    pub few_shot_split: Option<f64>,
    /// The seeds the few-shot curve is drawn for (default: every seed). The LLM baselines'
    /// few-shot prompts make each point costly on CPU.
    #[serde(default)]
    pub few_shot_seeds: Option<Vec<u64>>,
    /// Training settings shared by every run (seed and split are set per run).
    #[serde(default)]
    pub train: RunConfig,
    /// The forms of GPO to train (`model.variant`), each as its own run per dataset, split
    /// and seed, reported as `gpo` (faithful) and `gpo+<variant>`. Default: the one
    /// `train.model.variant` names. The first listed also runs the LLM baselines.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// Datasets.
    pub datasets: Vec<DatasetSpec>,
}

fn default_name() -> String {
    "GPO experiment".into()
}
fn default_splits() -> Vec<f64> {
    vec![0.4, 0.6, 0.8]
}
fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}
fn default_few_shot() -> Vec<usize> {
    vec![0, 1, 2, 5, 10, 20, 50]
}

impl ExperimentConfig {
    /// Parses and checks a TOML experiment file.
    pub fn from_toml(text: &str, file: &Path) -> Result<Self> {
        let c: ExperimentConfig = toml::from_str(text)
            .with_context(|| format!("{}: invalid experiment", file.display()))?;
        if c.datasets.is_empty() {
            bail!("{}: `datasets` is empty", file.display());
        }
        if c.splits.is_empty() || c.seeds.is_empty() {
            bail!("{}: `splits` and `seeds` must not be empty", file.display());
        }
        for s in &c.splits {
            if !(*s > 0.0 && *s < 1.0) {
                bail!("{}: split {s} is not in (0, 1)", file.display());
            }
        }
        let mut vs = c.variants.clone();
        vs.sort_by_key(|v| v.name());
        if vs.windows(2).any(|w| w[0] == w[1]) {
            bail!("{}: `variants` lists a variant twice", file.display());
        }
        let mut names: Vec<&str> = c.datasets.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            bail!("{}: dataset names must be unique", file.display());
        }
        Ok(c)
    }

    /// The variants trained, in order (see [`ExperimentConfig::variants`]).
    pub fn variants(&self) -> Vec<Variant> {
        if self.variants.is_empty() {
            vec![self.train.model.variant]
        } else {
            self.variants.clone()
        }
    }
}

/// What one (dataset, split, seed) run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Dataset name.
    pub dataset: String,
    /// Split.
    pub split: f64,
    /// Seed.
    pub seed: u64,
    /// The form of GPO the run trained.
    pub variant: Variant,
    /// The run's summary (scores, curves, checkpoint).
    pub summary: Summary,
    /// Every method on the LLM baselines' target subset (empty without `lm_model`).
    pub lm_subset: BTreeMap<String, f64>,
}

/// One point of the few-shot curve: method → alignment at `k` context questions.
#[derive(Debug, Clone, Serialize)]
pub struct FewShotPoint {
    /// Dataset.
    pub dataset: String,
    /// Seed.
    pub seed: u64,
    /// Context questions per held-out group.
    pub k: usize,
    /// Alignment per method (GPO is absent at k = 0: it has nothing to attend to).
    pub methods: BTreeMap<String, f64>,
    /// The form of GPO whose run drew the point (its methods fold into one point per k).
    #[serde(skip)]
    pub variant: Variant,
}

fn load_dataset(d: &DatasetSpec, seed: u64) -> Result<(Survey, PointFeatures, String)> {
    let (s, f, desc) = match &d.data {
        Some(_) => inputs::load(
            &DataArgs {
                data: d.data.clone(),
                format: d.format.clone(),
                embeddings: d.embeddings.clone(),
            },
            seed,
        )?,
        None => {
            let cfg = SynthConfig {
                seed,
                ..d.synth.clone().unwrap_or_default()
            };
            let (s, f) = inputs::synthetic(&cfg)?;
            (s, f, format!("synthetic survey (seed {seed})"))
        }
    };
    let groups = gpo_core::presets::resolve(&s, &d.preset).map_err(anyhow::Error::msg)?;
    Ok((gpo_core::presets::restrict(&s, &groups), f, desc))
}

/// Every method on the LLM baselines' subset of `eps`' targets: GPO from its best
/// checkpoint, `uniform`, `train_mean`, and the LLM's three.
fn subset_scores(
    lm: Option<&mut lm::LmBaselines>,
    targets: usize,
    model: &gpo_core::model::Gpo,
    s: &Survey,
    f: &PointFeatures,
    train: &[usize],
    eps: &[gpo_core::sampler::EpisodeSpec],
) -> Result<BTreeMap<String, f64>> {
    let sub = subsample_targets(eps, s.questions.len(), targets, 0);
    let mut methods = if sub.iter().all(|e| e.context.is_empty()) {
        gpo_core::eval::baselines(s, train, &sub)
    } else {
        evaluate(model, s, f, train, &sub, &Device::Cpu)?.methods
    };
    if let Some(lm) = lm {
        let t = std::time::Instant::now();
        methods.extend(lm.evaluate(s, &sub)?);
        tracing::info!(
            "LLM baselines on {} episodes in {:.1} s",
            sub.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(methods)
}

/// Few-shot curve of one trained run: GPO (best checkpoint) and baselines at each k (all on
/// the LLM baselines' target subset of `subset` questions when the dataset has an LLM; the
/// LLM's own methods only when `lm` is given).
#[allow(clippy::too_many_arguments)]
fn few_shot(
    cfg: &RunConfig,
    (model, plan): (&gpo_core::model::Gpo, &RunPlan),
    s: &Survey,
    f: &PointFeatures,
    ks: &[usize],
    dataset: &str,
    subset: Option<usize>,
    mut lm: Option<&mut lm::LmBaselines>,
) -> Result<Vec<FewShotPoint>> {
    let mut out = Vec::new();
    for &k in ks {
        // Groups that answered no more than k questions have nothing left to score.
        let (groups, skipped) = evaluable_groups(s, &plan.test, k);
        if groups.is_empty() {
            tracing::warn!("few-shot k = {k}: no held-out group answered more than {k} questions; point skipped");
            continue;
        }
        if !skipped.is_empty() {
            tracing::warn!(
                "few-shot k = {k}: {} held-out groups answered no more than {k} questions and are left out of this point",
                skipped.len()
            );
        }
        let pool = s
            .metric
            .shares_questions()
            .then(|| common_questions(s, &groups));
        let eps =
            eval_episodes(s, cfg.seed, &groups, pool.as_deref(), k).map_err(anyhow::Error::msg)?;
        let methods = match subset {
            Some(targets) => {
                subset_scores(lm.as_deref_mut(), targets, model, s, f, &plan.train, &eps)?
            }
            None if k == 0 => gpo_core::eval::baselines(s, &plan.train, &eps),
            None => evaluate(model, s, f, &plan.train, &eps, &Device::Cpu)?.methods,
        };
        out.push(FewShotPoint {
            dataset: dataset.into(),
            seed: cfg.seed,
            k,
            methods,
            variant: cfg.model.variant,
        });
    }
    Ok(out)
}

/// One (dataset, split, seed) run of an experiment: meta-trains, then scores the best
/// checkpoint with the LLM baselines and on the few-shot curve where asked.
#[allow(clippy::too_many_arguments)]
fn one_run(
    cfg: &ExperimentConfig,
    out: &Path,
    d: &DatasetSpec,
    (split, seed, variant): (f64, u64, Variant),
    lm: &std::sync::Mutex<Option<lm::LmBaselines>>,
    bar: &ProgressBar,
) -> Result<(RunRecord, Vec<FewShotPoint>)> {
    let few_split = cfg.few_shot_split.unwrap_or(cfg.splits[0]);
    let (survey, features, desc) =
        load_dataset(d, seed).with_context(|| format!("dataset `{}`", d.name))?;
    let mut rc = cfg.train.clone();
    rc.seed = seed;
    rc.group_split = split;
    rc.model.dim_x = features.dim;
    rc.model.variant = variant;
    let features = gpo_coordinator::plan::run_features(&rc, &survey, features)?;
    let run_dir = out
        .join(&d.name)
        .join(format!("split{split}"))
        .join(match variant {
            Variant::Faithful => format!("seed{seed}"),
            v => format!("seed{seed}-{}", v.name()),
        });
    bar.suspend(|| {
        eprintln!(
            "{}: {desc}; split {split}, seed {seed}, {}",
            d.name,
            variant.method()
        )
    });
    let (survey, features) = (Arc::new(survey), Arc::new(features));
    let mut replica = Replica::new(
        rc.model.clone(),
        rc.adam,
        seed,
        survey.clone(),
        features.clone(),
        Device::Cpu,
    )?;
    replica.set_shard_groups(rc.shard_groups);
    let mut dispatch = InProcess::new(replica);
    let mut on_event = |e: RunEvent| {
        if let RunEvent::Step { .. } = e {
            bar.inc(1);
        }
    };
    let summary = train(
        &rc,
        survey.clone(),
        features.clone(),
        &mut dispatch,
        &run_dir,
        &mut on_event,
    )
    .with_context(|| format!("{} split {split} seed {seed}", d.name))?;
    let curve_seed = cfg
        .few_shot_seeds
        .as_ref()
        .is_none_or(|v| v.contains(&seed));
    let want_curve = (split - few_split).abs() < 1e-12 && !cfg.few_shot.is_empty() && curve_seed;
    // The LLM baselines of one dataset are one model, used by one run at a time, and by
    // the first variant's runs only (the others score GPO on the same subset).
    let subset = d.lm_model.is_some().then_some(d.lm_targets);
    let mut lm = if d.lm_model.is_some() && variant == cfg.variants()[0] {
        Some(lm.lock().unwrap_or_else(|p| p.into_inner()))
    } else {
        None
    };
    if let (Some(guard), Some(m)) = (lm.as_mut(), &d.lm_model) {
        if guard.is_none() {
            let t = std::time::Instant::now();
            let l = lm::LmBaselines::load(m).with_context(|| format!("dataset `{}`", d.name))?;
            bar.suspend(|| {
                eprintln!(
                    "{}: LLM baselines with {} (loaded in {:.1} s), {} target questions per group",
                    d.name,
                    l.id(),
                    t.elapsed().as_secs_f64(),
                    d.lm_targets
                )
            });
            **guard = Some(l);
        }
    }
    let mut lm = lm.as_mut().and_then(|g| g.as_mut());
    // The best checkpoint and the run's plan, once, for what re-scores it.
    let best = if subset.is_some() || want_curve {
        let c = checkpoint::load(&summary.checkpoint).map_err(anyhow::Error::msg)?;
        let model = crate::cmd::eval::model_from_checkpoint(&c, &rc.model)?;
        Some((model, RunPlan::new(&rc, &survey)?))
    } else {
        None
    };
    let mut lm_subset = BTreeMap::new();
    if let (Some(targets), Some((model, plan))) = (subset, best.as_ref()) {
        lm_subset = subset_scores(
            lm.as_deref_mut(),
            targets,
            model,
            &survey,
            &features,
            &plan.train,
            &plan.eval,
        )
        .with_context(|| format!("{} split {split} seed {seed}: LLM baselines", d.name))?;
    }
    let mut curve = Vec::new();
    if let (true, Some((model, plan))) = (want_curve, best.as_ref()) {
        curve = few_shot(
            &rc,
            (model, plan),
            &survey,
            &features,
            &cfg.few_shot,
            &d.name,
            subset,
            lm,
        )?;
    }
    Ok((
        RunRecord {
            dataset: d.name.clone(),
            split,
            seed,
            variant,
            summary,
            lm_subset,
        },
        curve,
    ))
}

/// Runs an experiment and writes its outputs to `out`. Its runs (datasets × splits ×
/// seeds) go through the sweep's gang scheduler, `concurrent` at a time in this process;
/// each run is seeded, so the results do not depend on `concurrent`. The first failure
/// stops new runs from starting and is returned once the running ones end.
pub fn run(cfg: &ExperimentConfig, out: &Path, concurrent: usize) -> Result<()> {
    use gpo_sweep::schedule::{Action, Event, Scheduler};
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Each store is completed once, before any run reads it (concurrent runs would
    // otherwise each rewrite it).
    for d in &cfg.datasets {
        ensure_embeddings(d)?;
    }
    let variants = cfg.variants();
    let grid: Vec<(usize, f64, u64, Variant)> = (0..cfg.datasets.len())
        .flat_map(|d| {
            let variants = &variants;
            cfg.splits.iter().flat_map(move |&s| {
                cfg.seeds
                    .iter()
                    .flat_map(move |&seed| variants.iter().map(move |&v| (d, s, seed, v)))
            })
        })
        .collect();
    let bar = ProgressBar::new(grid.len() as u64 * cfg.train.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {percent}% eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!(
        "{} runs, {} at a time",
        grid.len(),
        concurrent.max(1)
    ));
    let lms: Vec<std::sync::Mutex<Option<lm::LmBaselines>>> =
        cfg.datasets.iter().map(|_| Default::default()).collect();
    let conc = concurrent.max(1);
    let mut sched = Scheduler::new(
        grid.len(),
        conc,
        conc,
        1,
        0,
        gpo_sweep::spec::EarlyStopping::None,
    );
    let mut results: Vec<Option<(RunRecord, Vec<FewShotPoint>)>> = Vec::new();
    results.resize_with(grid.len(), || None);
    let mut failure: Option<anyhow::Error> = None;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| -> Result<()> {
        let mut actions = sched.schedule();
        loop {
            for a in std::mem::take(&mut actions) {
                let Action::Start { trial, .. } = a else {
                    continue;
                };
                if failure.is_some() {
                    // After a failure nothing new starts; the scheduler sees it end at once.
                    actions.extend(sched.handle(Event::Failed {
                        trial,
                        error: "not started after an earlier failure".into(),
                    }));
                    continue;
                }
                let (d, split, seed, variant) = grid[trial];
                let (tx, lms, bar) = (tx.clone(), &lms, &bar);
                scope.spawn(move || {
                    let r = one_run(
                        cfg,
                        out,
                        &cfg.datasets[d],
                        (split, seed, variant),
                        &lms[d],
                        bar,
                    );
                    let _ = tx.send((trial, r));
                });
            }
            if sched.finished() {
                return Ok(());
            }
            let (trial, r) = rx.recv().context("an experiment run hung up")?;
            actions = match r {
                Ok(v) => {
                    results[trial] = Some(v);
                    sched.handle(Event::Ended { trial })
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    failure.get_or_insert(e);
                    sched.handle(Event::Failed { trial, error: msg })
                }
            };
        }
    })?;
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    let (records, curves): (Vec<RunRecord>, Vec<Vec<FewShotPoint>>) =
        results.into_iter().flatten().unzip();
    let curve: Vec<FewShotPoint> = curves.into_iter().flatten().collect();
    let (records, curve) = variants::merge(records, curve);
    report::write(cfg, out, &records, &curve)
}
