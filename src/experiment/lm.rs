//! The LLM baselines of `gpo experiment`, scored with a decoder LLM (SmolLM2 here):
//!
//! - `lm_base`: next-token probabilities of the option letters after the multiple-choice
//!   prompt, renormalized over the options (the paper's LM baseline);
//! - `lm_steered`: the same after a persona line for the group;
//! - `few_shot`: the same after the group's context questions with their answer
//!   distributions in percentages.
//!
//! Prompts come from [`gpo_core::lm_prompt`]. `lm_base` depends on the question only and
//! `lm_steered` on (group, question), so both are cached across the experiment's splits and
//! seeds; `few_shot` runs its prefix once per episode into a K/V cache and scores every
//! target after it. Work runs on rayon's pool: chunks of prompts, or episodes.

use anyhow::{bail, Context, Result};
use gpo_core::data::Survey;
use gpo_core::lm_prompt;
use gpo_core::metrics::{pair_score, ScoreAccumulator};
use gpo_core::sampler::EpisodeSpec;
use gpo_embed::decoder::lm::normalized;
use gpo_embed::decoder::DecoderEmbedder;
use gpo_embed::{Embedder, LoadOptions};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Letters scored (questions with more non-refusal options than this are an error).
const MAX_OPTIONS: usize = 26;
/// Prompts per parallel work item of the prefix-free baselines.
const PROMPTS_PER_ITEM: usize = 16;

/// A loaded LLM with the baselines' caches.
pub struct LmBaselines {
    model: DecoderEmbedder,
    /// Token ids of `" A"`, `" B"`, … after `"Answer:"`.
    letters: Vec<u32>,
    base: HashMap<usize, Vec<f64>>,
    steered: HashMap<(usize, usize), Vec<f64>>,
    /// `few_shot` by (group, context questions), then target question.
    few: HashMap<(usize, Vec<usize>), HashMap<usize, Vec<f64>>>,
    /// Shots dropped (oldest first) to fit the model's context, over all episodes.
    pub dropped_shots: usize,
}

impl LmBaselines {
    /// Loads `spec` (a GGUF file, an HF folder, or a hub id) with its output layer.
    pub fn load(spec: &str) -> Result<Self> {
        let opts = LoadOptions {
            lm_head: true,
            ..Default::default()
        };
        let model = gpo_embed::load_decoder(spec, &opts)
            .with_context(|| format!("loading the baselines' LLM `{spec}`"))?;
        if !model.has_lm_head() {
            bail!("`{spec}` has no output layer to score next tokens with");
        }
        let tok = model.encoder().tokenizer();
        let ids = |t: &str| -> Result<Vec<u32>> {
            Ok(tok
                .encode(t, false)
                .map_err(|e| anyhow::anyhow!("tokenizing {t:?}: {e}"))?
                .get_ids()
                .to_vec())
        };
        let cue = ids("Answer:")?;
        let mut letters = Vec::with_capacity(MAX_OPTIONS);
        for l in lm_prompt::answer_letters(MAX_OPTIONS) {
            let full = ids(&format!("Answer:{l}"))?;
            match full.strip_prefix(cue.as_slice()) {
                Some([one]) => letters.push(*one),
                _ => bail!(
                    "`{spec}`: the answer {l:?} after \"Answer:\" is not one token ({full:?}); \
                     this tokenizer cannot score option letters"
                ),
            }
        }
        Ok(LmBaselines {
            model,
            letters,
            base: HashMap::new(),
            steered: HashMap::new(),
            few: HashMap::new(),
            dropped_shots: 0,
        })
    }

    /// The model's identifier.
    pub fn id(&self) -> &str {
        self.model.id()
    }

    fn options(s: &Survey, q: usize) -> Result<usize> {
        let n = s.questions[q].n_answerable();
        if n > MAX_OPTIONS {
            bail!(
                "question `{}` has {n} options; the LLM baselines score at most {MAX_OPTIONS}",
                s.questions[q].id
            );
        }
        Ok(n)
    }

    /// Scores whole prompts (no cached prefix): one distribution over `n` options each.
    fn score_prompts(&self, prompts: &[(String, usize)]) -> Result<Vec<Vec<f64>>> {
        let enc = self.model.encoder();
        let toks: Vec<Vec<u32>> = prompts
            .iter()
            .map(|(p, _)| Ok(enc.encode(p, false)?.ids))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| toks[i].len());
        type Scored = Vec<(usize, Vec<f32>)>;
        let parts: Vec<Result<Scored>> = order
            .par_chunks(PROMPTS_PER_ITEM)
            .map(|idx| {
                let seqs: Vec<&[u32]> = idx.iter().map(|&i| toks[i].as_slice()).collect();
                let rows = self.model.next_token_logits(None, &seqs, &self.letters)?;
                Ok(idx.iter().copied().zip(rows).collect())
            })
            .collect();
        let mut out = vec![Vec::new(); prompts.len()];
        for p in parts {
            for (i, row) in p? {
                out[i] = normalized(&row[..prompts[i].1]);
            }
        }
        Ok(out)
    }

    /// Fills the `lm_base` and `lm_steered` caches for the targets of `eps`.
    fn fill(&mut self, s: &Survey, eps: &[EpisodeSpec]) -> Result<()> {
        let mut base_q: Vec<usize> = Vec::new();
        let mut steer: Vec<(usize, usize)> = Vec::new();
        for e in eps {
            for &q in &e.target {
                if !self.base.contains_key(&q) && !base_q.contains(&q) {
                    base_q.push(q);
                }
                if !self.steered.contains_key(&(e.group, q)) {
                    steer.push((e.group, q));
                }
            }
        }
        let mut prompts = Vec::with_capacity(base_q.len() + steer.len());
        for &q in &base_q {
            prompts.push((lm_prompt::question(&s.questions[q]), Self::options(s, q)?));
        }
        for &(g, q) in &steer {
            prompts.push((
                format!(
                    "{}{}{}",
                    lm_prompt::persona(&s.groups[g].name),
                    lm_prompt::SEP,
                    lm_prompt::question(&s.questions[q])
                ),
                Self::options(s, q)?,
            ));
        }
        let mut scored = self.score_prompts(&prompts)?.into_iter();
        for q in base_q {
            self.base.insert(q, scored.next().unwrap_or_default());
        }
        for k in steer {
            self.steered.insert(k, scored.next().unwrap_or_default());
        }
        Ok(())
    }

    /// `few_shot` predictions for one episode's targets, in order.
    fn few_shot_episode(&self, s: &Survey, e: &EpisodeSpec) -> Result<(Vec<Vec<f64>>, usize)> {
        let enc = self.model.encoder();
        let g = e.group;
        let shots: Vec<(usize, &[f32])> = e
            .context
            .iter()
            .filter_map(|&q| s.answers[g][q].as_deref().map(|d| (q, d)))
            .collect();
        let longest_target = e
            .target
            .iter()
            .map(|&q| {
                Ok(enc
                    .encode(&lm_prompt::question(&s.questions[q]), false)?
                    .ids
                    .len())
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        // Drop the oldest shots until the prefix and any target fit the context.
        let mut first = 0;
        let prefix = loop {
            if first == shots.len() {
                break None;
            }
            let text = lm_prompt::few_shot_prefix(
                shots[first..].iter().map(|&(q, d)| (&s.questions[q], d)),
            );
            let ids = enc.encode(&text, true)?.ids;
            if ids.len() + longest_target + 4 <= enc.max_len() {
                break Some((text, ids));
            }
            first += 1;
        };
        let Some((prefix_text, prefix_ids)) = prefix else {
            // No shot fits (or none given): the plain prompt, i.e. `lm_base`.
            let prompts: Vec<(String, usize)> = e
                .target
                .iter()
                .map(|&q| Ok((lm_prompt::question(&s.questions[q]), Self::options(s, q)?)))
                .collect::<Result<_>>()?;
            return Ok((self.score_prompts(&prompts)?, first));
        };
        let cache = self.model.prefill(&prefix_ids)?;
        let mut conts: Vec<Vec<u32>> = Vec::with_capacity(e.target.len());
        for &q in &e.target {
            let full = format!(
                "{prefix_text}{}{}",
                lm_prompt::SEP,
                lm_prompt::question(&s.questions[q])
            );
            let ids = enc.encode(&full, true)?.ids;
            match ids.strip_prefix(prefix_ids.as_slice()) {
                Some(rest) if !rest.is_empty() => conts.push(rest.to_vec()),
                _ => bail!(
                    "question `{}`: the few-shot prefix does not tokenize as a prefix of the full \
                     prompt",
                    s.questions[q].id
                ),
            }
        }
        let seqs: Vec<&[u32]> = conts.iter().map(Vec::as_slice).collect();
        let rows = self
            .model
            .next_token_logits(Some(&cache), &seqs, &self.letters)?;
        let out = rows
            .iter()
            .zip(&e.target)
            .map(|(r, &q)| Ok(normalized(&r[..Self::options(s, q)?])))
            .collect::<Result<_>>()?;
        Ok((out, first))
    }

    /// Scores `lm_base`, `lm_steered` and `few_shot` on `eps` with the survey's metric.
    /// Without context questions `few_shot`'s prompt is `lm_base`'s; (group, context, target)
    /// triples already scored (the few-shot curve's k = 20 is the main evaluation) are reused.
    pub fn evaluate(&mut self, s: &Survey, eps: &[EpisodeSpec]) -> Result<BTreeMap<String, f64>> {
        self.fill(s, eps)?;
        let todo: Vec<EpisodeSpec> = eps
            .iter()
            .filter(|e| !e.context.is_empty())
            .filter_map(|e| {
                let done = self.few.get(&(e.group, e.context.clone()));
                let target: Vec<usize> = e
                    .target
                    .iter()
                    .copied()
                    .filter(|q| done.is_none_or(|d| !d.contains_key(q)))
                    .collect();
                (!target.is_empty()).then(|| EpisodeSpec {
                    group: e.group,
                    context: e.context.clone(),
                    target,
                })
            })
            .collect();
        let scored: Vec<Result<(Vec<Vec<f64>>, usize)>> = todo
            .par_iter()
            .map(|e| self.few_shot_episode(s, e))
            .collect();
        for (e, r) in todo.iter().zip(scored) {
            let (preds, dropped) = r.with_context(|| {
                format!("few-shot prompts for group `{}`", s.groups[e.group].name)
            })?;
            self.dropped_shots += dropped;
            self.few
                .entry((e.group, e.context.clone()))
                .or_default()
                .extend(e.target.iter().copied().zip(preds));
        }
        let mut acc: BTreeMap<&str, ScoreAccumulator> = BTreeMap::new();
        for e in eps {
            let few = self.few.get(&(e.group, e.context.clone()));
            for &q in &e.target {
                let Some(truth) = &s.answers[e.group][q] else {
                    continue;
                };
                let truth: Vec<f64> = truth.iter().map(|&p| p as f64).collect();
                let ord = s.questions[q].ordinals();
                let base = &self.base[&q];
                let preds = [
                    ("lm_base", base),
                    ("lm_steered", &self.steered[&(e.group, q)]),
                    ("few_shot", few.and_then(|f| f.get(&q)).unwrap_or(base)),
                ];
                for (m, p) in preds {
                    if let Some(v) = pair_score(s.metric, ord.as_deref(), p, &truth) {
                        acc.entry(m).or_default().add(e.group, v);
                    }
                }
            }
        }
        Ok(acc
            .into_iter()
            .map(|(m, a)| (m.to_string(), a.mean()))
            .collect())
    }
}
