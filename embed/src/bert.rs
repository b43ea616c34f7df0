//! BERT-family encoders (MiniLM, BGE, E5) from a Hugging Face folder: `config.json`,
//! `tokenizer.json`, `model.safetensors`, and optionally the sentence-transformers files
//! (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`) that say how to pool,
//! whether to L2-normalize, and the maximum sequence length.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{invalid, io_err, EmbedError, Result};
use crate::tokenize::{self, TextEncoder};
use crate::{pad_batch, pool, Embedder, LoadOptions, Pooling};

/// The fields of a BERT `config.json` the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer (`gelu`, `gelu_new`, `relu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Number of position embeddings (the context length).
    pub max_position_embeddings: usize,
    /// Number of token types.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `absolute` is supported.
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos() -> String {
    "absolute".into()
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Gelu,
    GeluTanh,
    Relu,
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder with its tokenizer and pooling.
pub struct BertEmbedder {
    id: String,
    cfg: BertConfig,
    encoder: TextEncoder,
    word: Embedding,
    position: Tensor,
    token_type0: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    act: Act,
    pooling: Pooling,
    normalize: bool,
    dtype: DType,
    device: Device,
}

/// What the sentence-transformers files of a folder say.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    /// Pooling of the Pooling module (mean when absent).
    pub pooling: Pooling,
    /// Whether a Normalize module follows.
    pub normalize: bool,
    /// `max_seq_length` of sentence_bert_config.json.
    pub max_seq_length: Option<usize>,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| invalid(path, format!("not valid JSON: {e}")))
}

/// Reads a folder's sentence-transformers configuration; without one, mean pooling and no
/// normalization.
pub fn sentence_config(dir: &Path) -> Result<SentenceConfig> {
    let mut sc = SentenceConfig {
        pooling: Pooling::Mean,
        normalize: false,
        max_seq_length: None,
    };
    let mut pooling_dir: PathBuf = dir.join("1_Pooling");
    if let Some(modules) = read_json(&dir.join("modules.json"))? {
        let list = modules
            .as_array()
            .ok_or_else(|| invalid(dir.join("modules.json"), "expected a list of modules"))?;
        for m in list {
            let ty = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
            let p = m.get("path").and_then(|t| t.as_str()).unwrap_or("");
            if ty.ends_with(".Normalize") {
                sc.normalize = true;
            }
            if ty.ends_with(".Pooling") {
                pooling_dir = dir.join(p);
            }
        }
    }
    if let Some(p) = read_json(&pooling_dir.join("config.json"))? {
        let on = |k: &str| p.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        sc.pooling = if on("pooling_mode_cls_token") {
            Pooling::Cls
        } else if on("pooling_mode_lasttoken") {
            Pooling::LastToken
        } else if on("pooling_mode_mean_tokens") {
            Pooling::Mean
        } else {
            return Err(invalid(
                pooling_dir.join("config.json"),
                "only mean, cls and last-token pooling are supported",
            ));
        };
    }
    if let Some(s) = read_json(&dir.join("sentence_bert_config.json"))? {
        sc.max_seq_length = s
            .get("max_seq_length")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
    }
    Ok(sc)
}

fn fused_linear(parts: &[Linear]) -> Result<Linear> {
    let ws: Vec<Tensor> = parts.iter().map(|l| l.weight().clone()).collect();
    let w = Tensor::cat(&ws, 0)?;
    let b = match parts
        .iter()
        .map(|l| l.bias().cloned())
        .collect::<Option<Vec<_>>>()
    {
        Some(bs) => Some(Tensor::cat(&bs, 0)?),
        None => None,
    };
    Ok(Linear::new(w, b))
}

/// A BERT folder read up to its weights.
struct Prepared {
    cfg: BertConfig,
    act: Act,
    pooling: Pooling,
    normalize: bool,
    encoder: TextEncoder,
    id: String,
}

impl BertEmbedder {
    /// What a BERT-family folder would embed with (id, width, tokenizer), read from its
    /// config and tokenizer without loading the weights.
    pub fn describe(
        dir: &Path,
        cfg_json: &serde_json::Value,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<crate::Description> {
        let p = Self::prepare(dir, cfg_json, opts, id_base)?;
        Ok(crate::Description {
            id: p.id,
            dim: p.cfg.hidden_size,
            encoder: p.encoder,
        })
    }

    /// The config, tokenizer, pooling and id: everything but the weights.
    fn prepare(
        dir: &Path,
        cfg_json: &serde_json::Value,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<Prepared> {
        let cfg_path = dir.join("config.json");
        let cfg: BertConfig = serde_json::from_value(cfg_json.clone())
            .map_err(|e| invalid(&cfg_path, format!("not a BERT config: {e}")))?;
        if cfg.position_embedding_type != "absolute" {
            return Err(invalid(
                &cfg_path,
                format!(
                    "position_embedding_type `{}` is not supported (only absolute)",
                    cfg.position_embedding_type
                ),
            ));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(invalid(
                &cfg_path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        let act = match cfg.hidden_act.as_str() {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            a => {
                return Err(invalid(
                    &cfg_path,
                    format!("hidden_act `{a}` is not supported (gelu, gelu_new, relu)"),
                ))
            }
        };
        let sc = sentence_config(dir)?;
        let pooling = opts.pooling.unwrap_or(sc.pooling);
        let mut max_len = sc
            .max_seq_length
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        if let Some(m) = opts.max_len {
            max_len = max_len.min(m);
        }
        let tok = tokenize::from_folder(dir, cfg.vocab_size)?;
        let encoder = TextEncoder::new(tok, max_len)?;
        let id = format!(
            "{id_base}|{}{}|{}",
            pooling.name(),
            if sc.normalize { "+l2" } else { "" },
            opts.compute_dtype().as_str()
        );
        Ok(Prepared {
            cfg,
            act,
            pooling,
            normalize: sc.normalize,
            encoder,
            id,
        })
    }

    /// Loads a BERT-family model from a Hugging Face folder.
    pub fn load(
        dir: &Path,
        cfg_json: &serde_json::Value,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<BertEmbedder> {
        let Prepared {
            cfg,
            act,
            pooling,
            normalize,
            encoder,
            id,
        } = Self::prepare(dir, cfg_json, opts, id_base)?;
        let dtype = opts.compute_dtype();
        let files = crate::source::safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only while the weights are copied out.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &opts.device)? };
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            return Err(invalid(
                &files[0],
                "no tensor `embeddings.word_embeddings.weight` (or `bert.…`): not BERT weights",
            ));
        };
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let e = vb.pp("embeddings");
        let word = embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let position = e
            .pp("position_embeddings")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let token_type0 = e
            .pp("token_type_embeddings")
            .get((cfg.type_vocab_size, h), "weight")?
            .get(0)?;
        let emb_norm = layer_norm(h, eps, e.pp("LayerNorm"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let q = linear(h, h, a.pp("self.query"))?;
            let k = linear(h, h, a.pp("self.key"))?;
            let v = linear(h, h, a.pp("self.value"))?;
            layers.push(Layer {
                qkv: fused_linear(&[q, k, v])?,
                attn_out: linear(h, h, a.pp("output.dense"))?,
                attn_norm: layer_norm(h, eps, a.pp("output.LayerNorm"))?,
                inter: linear(h, cfg.intermediate_size, l.pp("intermediate.dense"))?,
                out: linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                out_norm: layer_norm(h, eps, l.pp("output.LayerNorm"))?,
            });
        }
        Ok(BertEmbedder {
            id,
            cfg,
            encoder,
            word,
            position,
            token_type0,
            emb_norm,
            layers,
            act,
            pooling,
            normalize,
            dtype,
            device: opts.device.clone(),
        })
    }

    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        let dh = h / heads;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.narrow(0, 0, t)?.unsqueeze(0)?)?
            .broadcast_add(&self.token_type0)?;
        let mut x = self.emb_norm.forward(&x)?;
        // Additive mask over keys: 0 for tokens, a large negative number for padding.
        let bias = ((mask.ones_like()? - mask)? * -1e9f64)?
            .reshape((b, 1, 1, t))?
            .to_dtype(DType::F32)?;
        let scale = 1.0 / (dh as f64).sqrt();
        for l in &self.layers {
            let qkv = l.qkv.forward(&x)?.reshape((b, t, 3, heads, dh))?;
            let q = (qkv
                .narrow(2, 0, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?
                * scale)?;
            let k = qkv
                .narrow(2, 1, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?;
            let v = qkv
                .narrow(2, 2, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?;
            let scores = q
                .matmul(&k.t()?)?
                .to_dtype(DType::F32)?
                .broadcast_add(&bias)?;
            let probs = crate::fast::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            let a = l.attn_out.forward(&ctx)?;
            x = l.attn_norm.forward(&(a + &x)?)?;
            let i = l.inter.forward(&x)?;
            let i = match self.act {
                Act::Gelu => crate::fast::gelu_erf(&i)?,
                Act::GeluTanh => i.gelu()?,
                Act::Relu => i.relu()?,
            };
            let o = l.out.forward(&i)?;
            x = l.out_norm.forward(&(o + &x)?)?;
        }
        Ok(x)
    }
}

impl Embedder for BertEmbedder {
    fn id(&self) -> &str {
        &self.id
    }
    fn dim(&self) -> usize {
        self.cfg.hidden_size
    }
    fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }
    fn embed_tokens(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for s in batch {
            if s.len() > self.cfg.max_position_embeddings {
                return Err(EmbedError::TooLong {
                    text: format!("<{} token ids>", s.len()),
                    tokens: s.len(),
                    max: self.cfg.max_position_embeddings,
                });
            }
        }
        let (ids, mask, lens) = pad_batch(batch, self.cfg.pad_token_id, &self.device)?;
        let hidden = self.forward(&ids, &mask.to_dtype(self.dtype)?)?;
        pool(&hidden, &mask, &lens, self.pooling, self.normalize)
    }
}
