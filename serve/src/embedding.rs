//! Embeddings of request texts: the memory LRU first, then the embedding store, then the
//! embedder through its batcher. Every vector is keyed as the embedding store keys it,
//! `text_key(embedder id, template, text)`, so a store written by `gpo embed` for the
//! served embedder answers directly, and every computed vector is cached. The embedder and
//! the store are behind the small traits [`TextEmbedder`] and [`VectorStore`].

use crate::batcher::{Batcher, Stopped};
use crate::cache::Lru;
use crate::metrics::{Metrics, Stage, Tier};
use gpo_core::store::text_key;
use std::sync::{Arc, Mutex};

/// What turns texts into vectors (a real model: [`gpo_embed::Embedder`]).
pub trait TextEmbedder: Send + Sync {
    /// The id that keys its vectors.
    fn id(&self) -> &str;
    /// Vector width.
    fn dim(&self) -> usize;
    /// The token ids of `text`, or why it cannot be embedded (too long for the context).
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, String>;
    /// Vectors of a batch of token sequences, in order.
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, String>;
}

/// A model from `gpo-embed`; batches are split over rayon's threads.
pub struct ModelEmbedder(pub Box<dyn gpo_embed::Embedder>);

impl TextEmbedder for ModelEmbedder {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
        self.0
            .encoder()
            .encode(text, false)
            .map(|t| t.ids)
            .map_err(|e| e.to_string())
    }
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        gpo_embed::embed_sharded(self.0.as_ref(), batch, rayon_threads()).map_err(|e| e.to_string())
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Vectors by key (the memory-mapped embedding store).
pub trait VectorStore: Send + Sync {
    /// The vector of `key`, if stored.
    fn get(&self, key: &str) -> Option<Vec<f32>>;
}

impl VectorStore for gpo_core::io::store::EmbeddingStore {
    fn get(&self, key: &str) -> Option<Vec<f32>> {
        gpo_core::io::store::EmbeddingStore::get(self, key).map(<[f32]>::to_vec)
    }
}

/// One request's texts to embed (already tokenized).
pub type EmbedJob = Vec<Vec<u32>>;
/// Their vectors, or the embedder's error.
pub type EmbedResult = Result<Vec<Vec<f32>>, String>;

/// Why a text has no vector.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedFailure {
    /// The text at `index` of the request cannot be embedded (e.g. too many tokens).
    Text {
        /// Index into the request's texts.
        index: usize,
        /// Why.
        message: String,
    },
    /// The embedder failed or stopped.
    Embedder(String),
}

/// The lookup chain: LRU, store, embedder.
pub struct Vectors {
    embedder_id: String,
    template: String,
    lru: Mutex<Lru<String, Arc<[f32]>>>,
    store: Option<Box<dyn VectorStore>>,
    embedder: Arc<dyn TextEmbedder>,
    batcher: Batcher<EmbedJob, EmbedResult>,
    metrics: Metrics,
}

impl Vectors {
    /// The chain for `embedder` under `template`, with an LRU of `capacity` vectors and a
    /// batcher embedding at most `max_batch_tokens` (padded) tokens at once.
    pub fn new(
        embedder: Arc<dyn TextEmbedder>,
        template: &str,
        store: Option<Box<dyn VectorStore>>,
        capacity: usize,
        max_batch_tokens: usize,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let e = embedder.clone();
        let m = metrics.clone();
        let batcher = Batcher::spawn(
            "gpo-serve-embed",
            max_batch_tokens,
            |j: &EmbedJob| j.iter().map(Vec::len).sum(),
            move |jobs: Vec<EmbedJob>| embed_batch(e.as_ref(), &m, jobs, max_batch_tokens),
        )?;
        Ok(Vectors {
            embedder_id: embedder.id().to_string(),
            template: template.to_string(),
            lru: Mutex::new(Lru::new(capacity)),
            store,
            embedder,
            batcher,
            metrics,
        })
    }

    /// The embedder's id.
    pub fn embedder_id(&self) -> &str {
        &self.embedder_id
    }

    /// Vectors of `texts`, in order.
    pub async fn get(&self, texts: &[String]) -> Result<Vec<Arc<[f32]>>, EmbedFailure> {
        let keys: Vec<String> = texts
            .iter()
            .map(|t| text_key(&self.embedder_id, &self.template, t))
            .collect();
        let mut out: Vec<Option<Arc<[f32]>>> = vec![None; texts.len()];
        {
            let mut lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
            for (o, k) in out.iter_mut().zip(&keys) {
                *o = lru.get(k);
            }
        }
        let memory = out.iter().filter(|o| o.is_some()).count();
        self.hit("memory", memory);
        let mut stored = Vec::new();
        if let Some(store) = &self.store {
            for (i, k) in keys.iter().enumerate() {
                if out[i].is_none() {
                    if let Some(v) = store.get(k) {
                        let v: Arc<[f32]> = v.into();
                        out[i] = Some(v.clone());
                        stored.push((k.clone(), v));
                    }
                }
            }
        }
        self.hit("store", stored.len());
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        let mut fresh = Vec::new();
        if !missing.is_empty() {
            self.metrics.cache_misses.inc_by(missing.len() as u64);
            let mut tokens = Vec::with_capacity(missing.len());
            for &i in &missing {
                tokens.push(
                    self.embedder
                        .tokenize(&texts[i])
                        .map_err(|message| EmbedFailure::Text { index: i, message })?,
                );
            }
            let vs = self
                .batcher
                .call(tokens)
                .await
                .map_err(|Stopped| EmbedFailure::Embedder("the embedder stopped".into()))?
                .map_err(EmbedFailure::Embedder)?;
            for (&i, v) in missing.iter().zip(vs) {
                let v: Arc<[f32]> = v.into();
                out[i] = Some(v.clone());
                fresh.push((keys[i].clone(), v));
            }
        }
        {
            let mut lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
            for (k, v) in stored.into_iter().chain(fresh) {
                lru.insert(k, v);
            }
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| EmbedFailure::Embedder("a vector is missing".into())))
            .collect()
    }

    fn hit(&self, tier: &'static str, n: usize) {
        if n > 0 {
            self.metrics
                .cache_hits
                .get_or_create(&Tier { tier })
                .inc_by(n as u64);
        }
    }
}

/// Embeds the texts of several requests together, in length-sorted batches under the token
/// budget, and hands each request its vectors.
fn embed_batch(
    e: &dyn TextEmbedder,
    m: &Metrics,
    jobs: Vec<EmbedJob>,
    max_batch_tokens: usize,
) -> Vec<EmbedResult> {
    let all: Vec<&[u32]> = jobs.iter().flatten().map(Vec::as_slice).collect();
    m.batch_requests
        .get_or_create(&Stage { stage: "embed" })
        .observe(jobs.len() as f64);
    m.batch_items
        .get_or_create(&Stage { stage: "embed" })
        .observe(all.len() as f64);
    let lens: Vec<usize> = all.iter().map(|t| t.len()).collect();
    let mut vecs: Vec<Option<Vec<f32>>> = vec![None; all.len()];
    for b in gpo_embed::plan_batches(&lens, max_batch_tokens, 256) {
        let seqs: Vec<&[u32]> = b.iter().map(|&i| all[i]).collect();
        match e.embed(&seqs) {
            Ok(vs) => {
                for (&i, v) in b.iter().zip(vs) {
                    vecs[i] = Some(v);
                }
            }
            Err(err) => return jobs.iter().map(|_| Err(err.clone())).collect(),
        }
    }
    let mut it = vecs.into_iter();
    jobs.iter()
        .map(|j| {
            it.by_ref()
                .take(j.len())
                .map(|v| v.ok_or_else(|| "a vector is missing".to_string()))
                .collect()
        })
        .collect()
}
