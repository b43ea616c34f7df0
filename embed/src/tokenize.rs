//! Tokenizers: from a model folder's `tokenizer.json`, or rebuilt from GGUF metadata; and the
//! length check every text goes through before it reaches a model.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TruncationParams,
};

use crate::error::{invalid, preview, EmbedError, Result};

/// A text's token ids, and its length before truncation when it was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The ids the model sees (special tokens included).
    pub ids: Vec<u32>,
    /// `Some(n)` when the text had `n` tokens and was truncated to the model's context.
    pub truncated_from: Option<usize>,
}

/// A tokenizer with the model's context length: encodes one text, checking its length.
#[derive(Clone)]
pub struct TextEncoder {
    tok: Tokenizer,
    truncating: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl TextEncoder {
    /// Wraps `tok`, dropping any padding or truncation its file configures (gpo pads each
    /// batch to its longest text itself; MiniLM's tokenizer.json pads every text to 128).
    pub fn new(mut tok: Tokenizer, max_len: usize) -> Result<TextEncoder> {
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let mut truncating = tok.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(TextEncoder {
            tok,
            truncating,
            max_len,
        })
    }

    /// The model's context length in tokens.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The wrapped tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// Token ids of `text` with the model's special tokens. A text longer than the context is
    /// an error, or is truncated (keeping the special tokens) when `truncate` is set.
    pub fn encode(&self, text: &str, truncate: bool) -> Result<Tokens> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer(format!("{}: {e}", preview(text))))?;
        let n = enc.get_ids().len();
        if n == 0 {
            return Err(EmbedError::Empty {
                text: preview(text),
            });
        }
        if n <= self.max_len {
            return Ok(Tokens {
                ids: enc.get_ids().to_vec(),
                truncated_from: None,
            });
        }
        if !truncate {
            return Err(EmbedError::TooLong {
                text: preview(text),
                tokens: n,
                max: self.max_len,
            });
        }
        let enc = self
            .truncating
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer(format!("{}: {e}", preview(text))))?;
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            truncated_from: Some(n),
        })
    }
}

/// Loads `tokenizer.json` from a model folder.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(EmbedError::Missing {
            path: path.to_path_buf(),
            what: "tokenizer.json".into(),
            hint: "; the model folder needs the Hugging Face fast-tokenizer file".into(),
        });
    }
    Tokenizer::from_file(path)
        .map_err(|e| invalid(path, format!("not a valid tokenizer.json: {e}")))
}

/// Loads a model folder's `tokenizer.json` and checks that its tokens fit the model's
/// vocabulary of `vocab_size` (as `config.json` gives it).
pub fn from_folder(dir: &Path, vocab_size: usize) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let tok = from_file(&path)?;
    let tv = tok.get_vocab_size(true);
    if tv > vocab_size {
        return Err(invalid(
            path,
            format!(
                "tokenizer has {tv} tokens but config.json says vocab_size {vocab_size}: \
                 tokenizer and model do not match"
            ),
        ));
    }
    Ok(tok)
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    ct.metadata.get(key)
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    use gguf_file::Value::*;
    match meta(ct, key)? {
        U8(v) => Some(*v as u32),
        I8(v) => Some(*v as u32),
        U16(v) => Some(*v as u32),
        I16(v) => Some(*v as u32),
        U32(v) => Some(*v),
        I32(v) => Some(*v as u32),
        U64(v) => Some(*v as u32),
        I64(v) => Some(*v as u32),
        _ => None,
    }
}

fn meta_strings(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>> {
    let v = meta(ct, key).ok_or_else(|| EmbedError::Missing {
        path: path.to_path_buf(),
        what: format!("GGUF metadata `{key}`"),
        hint: "; the file carries no tokenizer".into(),
    })?;
    let arr = v
        .to_vec()
        .map_err(|_| invalid(path, format!("GGUF metadata `{key}` is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .map(|s| s.to_string())
                .map_err(|_| invalid(path, format!("GGUF metadata `{key}` holds a non-string")))
        })
        .collect()
}

/// Regexes of llama.cpp's pre-tokenizer types (the `tokenizer.ggml.pre` metadata), as the
/// models' own tokenizer.json files split text before byte-level BPE.
const SPLIT_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SPLIT_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_then_bytes(regex: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])
    .into())
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    Ok(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "dbrx" => {
            split_then_bytes(SPLIT_LLAMA3)?
        }
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(SPLIT_QWEN2)?,
        // SmolLM's tokenizer.json: single digits, then GPT-2 byte-level without a prefix space.
        "smollm" | "starcoder" | "refact" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        // GPT-2 itself and unknown values: GPT-2's byte-level split, no prefix space.
        _ => ByteLevel::new(false, true, true).into(),
    })
}

/// Rebuilds the tokenizer a GGUF file describes (`tokenizer.ggml.*`): byte-level BPE
/// (`tokenizer.ggml.model = gpt2`) with the pre-tokenizer of `tokenizer.ggml.pre`, the
/// control tokens as special tokens, and BOS/EOS added when the file says so.
pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    let model = meta(ct, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| EmbedError::Missing {
            path: path.to_path_buf(),
            what: "GGUF metadata `tokenizer.ggml.model`".into(),
            hint: "; the file carries no tokenizer".into(),
        })?;
    if model == "llama" {
        return sentencepiece_from_gguf(ct, path);
    }
    if model != "gpt2" {
        return Err(EmbedError::Unsupported(format!(
            "{}: GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` and \
             SentencePiece BPE `llama` are); use the model's Hugging Face folder with tokenizer.json",
            path.display()
        )));
    }
    let tokens = meta_strings(ct, "tokenizer.ggml.tokens", path)?;
    let merges: Vec<(String, String)> = meta_strings(ct, "tokenizer.ggml.merges", path)?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| invalid(path, format!("GGUF merge `{m}` is not two tokens")))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(path, format!("cannot build BPE from GGUF vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = meta(ct, "tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "gpt2".into());
    tok.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));

    // Control tokens (type 3) stay whole, as llama.cpp and transformers keep them.
    if let Some(Ok(types)) = meta(ct, "tokenizer.ggml.token_type").map(|v| v.to_vec()) {
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(t, gguf_file::Value::I32(3) | gguf_file::Value::U32(3)))
            .map(|(_, s)| AddedToken::from(s.clone(), true))
            .collect();
        tok.add_special_tokens(specials)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    }

    add_bos_eos(&mut tok, ct, &tokens, path, false)?;
    Ok(tok)
}

/// Adds the BOS/EOS template the GGUF asks for (`tokenizer.ggml.add_{bos,eos}_token`, with
/// `bos_default` when the flag is absent).
fn add_bos_eos(
    tok: &mut Tokenizer,
    ct: &gguf_file::Content,
    tokens: &[String],
    path: &Path,
    bos_default: bool,
) -> Result<()> {
    let flag = |k: &str, d: bool| meta(ct, k).and_then(|v| v.to_bool().ok()).unwrap_or(d);
    let bos = flag("tokenizer.ggml.add_bos_token", bos_default)
        .then(|| meta_u32(ct, "tokenizer.ggml.bos_token_id"))
        .flatten();
    let eos = flag("tokenizer.ggml.add_eos_token", false)
        .then(|| meta_u32(ct, "tokenizer.ggml.eos_token_id"))
        .flatten();
    if bos.is_some() || eos.is_some() {
        let name = |id: u32| {
            tokens.get(id as usize).cloned().ok_or_else(|| {
                invalid(
                    path,
                    format!("special token id {id} is out of the vocabulary"),
                )
            })
        };
        let mut single = Vec::new();
        let mut specials = Vec::new();
        if let Some(b) = bos {
            single.push(name(b)?);
            specials.push((name(b)?, b));
        }
        single.push("$0".to_string());
        if let Some(e) = eos {
            single.push(name(e)?);
            specials.push((name(e)?, e));
        }
        let proc = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?
            .special_tokens(specials)
            .build()
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tok.with_post_processor(Some(proc));
    }
    Ok(())
}

/// SentencePiece BPE (Llama 1/2, Mistral GGUFs), rebuilt as transformers does: merges derived
/// from the vocabulary and its scores (every split of a token into two vocabulary pieces,
/// best score first), byte fallback to the `<0xNN>` tokens, `▁` for spaces with one
/// prepended to the first word (Metaspace, `first`), BOS added unless the file says not.
fn sentencepiece_from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let tokens = meta_strings(ct, "tokenizer.ggml.tokens", path)?;
    let scores: Vec<f32> = match meta(ct, "tokenizer.ggml.scores").map(|v| v.to_vec()) {
        Some(Ok(v)) => v
            .iter()
            .map(|x| {
                x.to_f32()
                    .map_err(|_| invalid(path, "GGUF `tokenizer.ggml.scores` holds a non-float"))
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(EmbedError::Missing {
                path: path.to_path_buf(),
                what: "GGUF metadata `tokenizer.ggml.scores`".into(),
                hint: "; a SentencePiece vocabulary needs its scores".into(),
            })
        }
    };
    if scores.len() != tokens.len() {
        return Err(invalid(
            path,
            format!("{} tokens but {} scores", tokens.len(), scores.len()),
        ));
    }
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // (left, right, score) for every split of every token into two vocabulary pieces, in
    // vocabulary order, each token's splits ordered by the pieces' ids; then a stable sort by
    // (score, len(left), len(right)) descending, as transformers' generate_merges.
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (t, &score) in tokens.iter().zip(&scores) {
        let mut local: Vec<(String, String, f32)> = Vec::new();
        for (i, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(i);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push((l.to_string(), r.to_string(), score));
            }
        }
        local.sort_by_key(|(l, r, _)| (vocab[l.as_str()], vocab[r.as_str()]));
        merges.extend(local);
    }
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(b.0.chars().count().cmp(&a.0.chars().count()))
            .then(b.1.chars().count().cmp(&a.1.chars().count()))
    });
    let merges: Vec<(String, String)> = merges.into_iter().map(|(l, r, _)| (l, r)).collect();
    let unk = meta_u32(ct, "tokenizer.ggml.unknown_token_id")
        .or_else(|| meta_u32(ct, "tokenizer.ggml.unk_token_id"))
        .and_then(|i| tokens.get(i as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| invalid(path, format!("cannot build BPE from GGUF vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let prefix = meta(ct, "tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let scheme = if prefix {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    if let Some(Ok(types)) = meta(ct, "tokenizer.ggml.token_type").map(|v| v.to_vec()) {
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(t, gguf_file::Value::I32(3) | gguf_file::Value::U32(3)))
            .map(|(_, s)| AddedToken::from(s.clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(specials)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    }
    add_bos_eos(&mut tok, ct, &tokens, path, true)?;
    Ok(tok)
}
