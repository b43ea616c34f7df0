//! The loading paths on tiny random-weight models the tests create: a BERT, a Llama in
//! safetensors (f32, f16, bf16), a Qwen2; and the errors for broken folders and inputs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use gpo_embed::{EmbedError, Embedder, LoadOptions, Pooling};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

const WORDS: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "do", "you", "agree", "?", "yes", "no", "a", "b", "c",
    "the", "question", "is", "long",
];

fn write_tokenizer(dir: &Path, bert: bool) {
    let vocab: HashMap<String, u32> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    if bert {
        let tp = TemplateProcessing::builder()
            .try_single("[CLS] $0 [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap();
        tok.with_post_processor(Some(tp));
    }
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A deterministic pseudo-random tensor (xorshift), scaled like a trained model's weights.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn save(dir: &Path, tensors: Vec<(String, Tensor)>, dtype: DType) {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
}

const H: usize = 16;
const V: usize = 20;

fn bert_folder(dir: &Path, prefix: &str, st: Option<(&str, bool)>) {
    let cfg = serde_json::json!({
        "model_type": "bert", "vocab_size": V, "hidden_size": H, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 32, "hidden_act": "gelu",
        "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_tokenizer(dir, true);
    let mut t = Vec::new();
    let mut seed = 1;
    let mut add = |name: &str, shape: &[usize]| {
        seed += 1;
        let v = if name.ends_with("LayerNorm.weight") {
            (randn(shape, seed) + 1.0).unwrap()
        } else {
            randn(shape, seed)
        };
        t.push((format!("{prefix}{name}"), v));
    };
    add("embeddings.word_embeddings.weight", &[V, H]);
    add("embeddings.position_embeddings.weight", &[12, H]);
    add("embeddings.token_type_embeddings.weight", &[2, H]);
    add("embeddings.LayerNorm.weight", &[H]);
    add("embeddings.LayerNorm.bias", &[H]);
    for l in 0..2 {
        let p = format!("encoder.layer.{l}.");
        for n in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            add(&format!("{p}{n}.weight"), &[H, H]);
            add(&format!("{p}{n}.bias"), &[H]);
        }
        add(&format!("{p}attention.output.LayerNorm.weight"), &[H]);
        add(&format!("{p}attention.output.LayerNorm.bias"), &[H]);
        add(&format!("{p}intermediate.dense.weight"), &[32, H]);
        add(&format!("{p}intermediate.dense.bias"), &[32]);
        add(&format!("{p}output.dense.weight"), &[H, 32]);
        add(&format!("{p}output.dense.bias"), &[H]);
        add(&format!("{p}output.LayerNorm.weight"), &[H]);
        add(&format!("{p}output.LayerNorm.bias"), &[H]);
    }
    save(dir, t, DType::F32);
    if let Some((pool, normalize)) = st {
        let mut modules = vec![
            serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
            serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
        ];
        if normalize {
            modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        }
        std::fs::write(
            dir.join("modules.json"),
            serde_json::to_string(&modules).unwrap(),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        let pc = serde_json::json!({
            "word_embedding_dimension": H,
            "pooling_mode_cls_token": pool == "cls",
            "pooling_mode_mean_tokens": pool == "mean",
        });
        std::fs::write(dir.join("1_Pooling/config.json"), pc.to_string()).unwrap();
        std::fs::write(
            dir.join("sentence_bert_config.json"),
            r#"{"max_seq_length": 10}"#,
        )
        .unwrap();
    }
}

fn decoder_folder(dir: &Path, model_type: &str, dtype: DType) {
    let (layers, heads, kv, inter) = (2, 4, 2, 24);
    let dh = H / heads;
    let cfg = serde_json::json!({
        "model_type": model_type, "vocab_size": V, "hidden_size": H, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 16,
        "pad_token_id": 0
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_tokenizer(dir, false);
    let mut t = Vec::new();
    let mut seed = 100;
    let mut add = |name: String, shape: &[usize]| {
        seed += 1;
        let v = if name.ends_with("norm.weight") {
            (randn(shape, seed) + 1.0).unwrap()
        } else {
            randn(shape, seed)
        };
        t.push((name, v));
    };
    add("model.embed_tokens.weight".into(), &[V, H]);
    add("model.norm.weight".into(), &[H]);
    add("lm_head.weight".into(), &[V, H]);
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        add(format!("{p}input_layernorm.weight"), &[H]);
        add(format!("{p}post_attention_layernorm.weight"), &[H]);
        add(format!("{p}self_attn.q_proj.weight"), &[heads * dh, H]);
        add(format!("{p}self_attn.k_proj.weight"), &[kv * dh, H]);
        add(format!("{p}self_attn.v_proj.weight"), &[kv * dh, H]);
        add(format!("{p}self_attn.o_proj.weight"), &[H, heads * dh]);
        if model_type == "qwen2" {
            add(format!("{p}self_attn.q_proj.bias"), &[heads * dh]);
            add(format!("{p}self_attn.k_proj.bias"), &[kv * dh]);
            add(format!("{p}self_attn.v_proj.bias"), &[kv * dh]);
        }
        add(format!("{p}mlp.gate_proj.weight"), &[inter, H]);
        add(format!("{p}mlp.up_proj.weight"), &[inter, H]);
        add(format!("{p}mlp.down_proj.weight"), &[H, inter]);
    }
    save(dir, t, dtype);
}

fn load(dir: &Path, pooling: Option<Pooling>) -> gpo_embed::Result<Box<dyn Embedder>> {
    gpo_embed::load(
        dir.to_str().unwrap(),
        &LoadOptions {
            pooling,
            ..Default::default()
        },
    )
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (n(a) * n(b))
}

const LONG: &str = "do you agree the question is long ?";
const SHORT: &str = "yes";

/// Batched (padded) embeddings equal one-at-a-time ones.
fn assert_padding_invariant(e: &dyn Embedder) {
    let both = e.embed(&[LONG, SHORT]).unwrap();
    let alone = e.embed(&[SHORT]).unwrap();
    let long_alone = e.embed(&[LONG]).unwrap();
    assert!(
        close(&both[1], &alone[0], 1e-5),
        "{:?} vs {:?}",
        both[1],
        alone[0]
    );
    assert!(close(&both[0], &long_alone[0], 1e-5));
    assert_ne!(both[0], both[1]);
    assert!(both.iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn tiny_bert_loads_pools_and_normalizes_as_configured() {
    let tmp = tempfile::tempdir().unwrap();
    // No sentence-transformers files: mean pooling, no normalization, the model's context.
    bert_folder(tmp.path(), "", None);
    let e = load(tmp.path(), None).unwrap();
    assert_eq!(e.dim(), H);
    assert_eq!(e.encoder().max_len(), 12);
    assert!(e.id().contains("|mean|f32"), "{}", e.id());
    assert_padding_invariant(e.as_ref());
    let v = e.embed(&[LONG]).unwrap();
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "unexpectedly normalized");

    // The `bert.` prefix, mean + Normalize, and the sentence-transformers max length.
    let tmp2 = tempfile::tempdir().unwrap();
    bert_folder(tmp2.path(), "bert.", Some(("mean", true)));
    let e2 = load(tmp2.path(), None).unwrap();
    assert!(e2.id().contains("|mean+l2|"), "{}", e2.id());
    assert_eq!(e2.encoder().max_len(), 10);
    let v2 = e2.embed(&[LONG]).unwrap();
    let n2: f32 = v2[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((n2 - 1.0).abs() < 1e-5);
    // Same weights (same seeds), so normalizing is the only difference.
    let scaled: Vec<f32> = v[0].iter().map(|x| x / norm).collect();
    assert!(close(&scaled, &v2[0], 1e-5));

    // CLS pooling from the Pooling config.
    let tmp3 = tempfile::tempdir().unwrap();
    bert_folder(tmp3.path(), "", Some(("cls", false)));
    let e3 = load(tmp3.path(), None).unwrap();
    assert!(e3.id().contains("|cls|"), "{}", e3.id());
    assert_padding_invariant(e3.as_ref());
    assert!(!close(&e3.embed(&[LONG]).unwrap()[0], &v[0], 1e-4));

    // Too long: 9 words + [CLS] + [SEP] = 11 > 10.
    let longer = format!("{LONG} yes");
    match e2.encoder().encode(&longer, false) {
        Err(EmbedError::TooLong {
            tokens: 11,
            max: 10,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let t = e2.encoder().encode(&longer, true).unwrap();
    assert_eq!(t.truncated_from, Some(11));
    assert_eq!(t.ids.len(), 10);
    assert_eq!(*t.ids.last().unwrap(), 3, "truncation keeps [SEP]");
}

#[test]
fn tiny_llama_in_f32_f16_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let e = load(tmp.path(), None).unwrap();
    assert_eq!(e.dim(), H);
    assert!(e.id().contains("|mean|f32"), "{}", e.id());
    assert_padding_invariant(e.as_ref());
    let last = load(tmp.path(), Some(Pooling::LastToken)).unwrap();
    assert_padding_invariant(last.as_ref());
    let m = e.embed(&[LONG]).unwrap();
    let l = last.embed(&[LONG]).unwrap();
    assert!(!close(&m[0], &l[0], 1e-4));
    assert_ne!(e.id(), last.id());
    // A one-token text: mean and last-token pooling agree.
    let one = last.embed(&["do"]).unwrap();
    let one_mean = e.embed(&["do"]).unwrap();
    assert!(close(&one[0], &one_mean[0], 1e-6));
    assert!(matches!(
        gpo_embed::load(
            tmp.path().to_str().unwrap(),
            &LoadOptions {
                pooling: Some(Pooling::Cls),
                ..Default::default()
            }
        ),
        Err(EmbedError::Unsupported(_))
    ));

    for dt in [DType::F16, DType::BF16] {
        let t2 = tempfile::tempdir().unwrap();
        decoder_folder(t2.path(), "llama", dt);
        let e2 = load(t2.path(), None).unwrap();
        let v = e2.embed(&[LONG]).unwrap();
        let c = cosine(&v[0], &m[0]);
        assert!(c > 0.999, "{dt:?}: cosine {c}");
        assert_ne!(e2.id(), e.id(), "weights differ, so must the fingerprint");
    }
}

#[test]
fn tiny_qwen2_uses_its_biases() {
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "qwen2", DType::F32);
    let e = load(tmp.path(), None).unwrap();
    assert_padding_invariant(e.as_ref());
    let with = e.embed(&[LONG]).unwrap();

    // Zero the biases: the output must change (they are loaded and used).
    let st =
        candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let zeroed: Vec<(String, Tensor)> = st
        .into_iter()
        .map(|(k, v)| {
            let v = if k.ends_with(".bias") {
                v.zeros_like().unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    save(tmp.path(), zeroed.clone(), DType::F32);
    let without = load(tmp.path(), None).unwrap().embed(&[LONG]).unwrap();
    assert!(!close(&with[0], &without[0], 1e-4));

    // A Qwen2 without its biases is an error naming the tensor.
    let missing: Vec<(String, Tensor)> = zeroed
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".bias"))
        .collect();
    save(tmp.path(), missing, DType::F32);
    let err = load(tmp.path(), None).err().unwrap().to_string();
    assert!(err.contains("q_proj.bias"), "{err}");
}

#[test]
fn broken_folders_and_outputs_give_clear_errors() {
    // Missing tokenizer.
    let tmp = tempfile::tempdir().unwrap();
    bert_folder(tmp.path(), "", None);
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = load(tmp.path(), None).err().unwrap();
    assert!(
        matches!(e, EmbedError::Missing { .. }) && e.to_string().contains("tokenizer.json"),
        "{e}"
    );

    // Missing config.
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let e = load(tmp.path(), None).err().unwrap().to_string();
    assert!(e.contains("config.json not found"), "{e}");

    // Unknown architecture.
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let p = tmp.path().join("config.json");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&p, s).unwrap();
    let e = load(tmp.path(), None).err().unwrap();
    assert!(
        matches!(&e, EmbedError::UnknownArchitecture { arch, .. } if arch == "gpt_neox"),
        "{e}"
    );

    // Tokenizer larger than the model's vocabulary: mismatched files.
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let p = tmp.path().join("config.json");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"vocab_size\":20", "\"vocab_size\":10");
    std::fs::write(&p, s).unwrap();
    let e = load(tmp.path(), None).err().unwrap().to_string();
    assert!(e.contains("do not match"), "{e}");

    // Config and weights disagree on a shape.
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let p = tmp.path().join("config.json");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"intermediate_size\":24", "\"intermediate_size\":32");
    std::fs::write(&p, s).unwrap();
    let e = load(tmp.path(), None).err().unwrap().to_string();
    assert!(e.contains("gate_proj") && e.contains("do not match"), "{e}");

    // No weights.
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load(tmp.path(), None).err().unwrap().to_string();
    assert!(e.contains("weights (*.safetensors) not found"), "{e}");

    // NaN weights give a NonFinite error, not NaN vectors.
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let st =
        candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let bad: Vec<(String, Tensor)> = st
        .into_iter()
        .map(|(k, v)| {
            let v = if k == "model.norm.weight" {
                (v * f64::NAN).unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    save(tmp.path(), bad, DType::F32);
    let e = load(tmp.path(), None).unwrap();
    let err = e.embed(&[LONG]).unwrap_err();
    assert!(matches!(err, EmbedError::NonFinite { row: 0, .. }), "{err}");

    // A text over the decoder's context (16).
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let e = load(tmp.path(), None).unwrap();
    let long = vec!["a"; 17].join(" ");
    assert!(matches!(
        e.embed(&[&long]),
        Err(EmbedError::TooLong {
            tokens: 17,
            max: 16,
            ..
        })
    ));
    assert_eq!(e.encoder().encode(&long, true).unwrap().ids.len(), 16);
}

/// A SentencePiece (Llama-1/2 style) GGUF vocabulary, rebuilt as transformers rebuilds it:
/// ids from `tools/reference/tiny_spm_gguf.py` (merges from scores, byte fallback, BOS).
#[test]
fn sentencepiece_gguf_tokenizer_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/embed");
    let path = dir.join("tiny-spm.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = gpo_embed::tokenize::from_gguf(&ct, &path).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tiny-spm.json")).unwrap()).unwrap();
    for item in want["items"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let ids: Vec<u32> = item["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(text, true).unwrap().get_ids(),
            ids.as_slice(),
            "{text:?}"
        );
    }
}

/// Next-token scoring (the LLM baselines): the logits are the last token's final hidden
/// state times the output rows; packing several sequences into one pass, and continuing a
/// cached prefix, change nothing; an untied head is loaded only when asked for.
#[test]
fn tiny_llama_scores_next_tokens_with_and_without_a_cached_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    decoder_folder(tmp.path(), "llama", DType::F32);
    let spec = tmp.path().to_str().unwrap();
    let no_head = gpo_embed::load_decoder(spec, &LoadOptions::default()).unwrap();
    assert!(!no_head.has_lm_head());
    assert!(matches!(
        no_head.next_token_logits(None, &[&[4, 5]], &[8]),
        Err(EmbedError::Unsupported(_))
    ));
    let m = gpo_embed::load_decoder(
        spec,
        &LoadOptions {
            lm_head: true,
            pooling: Some(Pooling::LastToken),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(m.has_lm_head());
    let cands = [8u32, 9, 10, 11];
    let (a, b, p): (&[u32], &[u32], &[u32]) = (&[4, 5, 6, 7], &[13, 14], &[15, 16, 4, 5, 6]);

    // Logits = last hidden · lm_head rows.
    let weights =
        candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let head = weights["lm_head.weight"].to_vec2::<f32>().unwrap();
    let h = m.embed_tokens(&[a]).unwrap();
    let want: Vec<f32> = cands
        .iter()
        .map(|&c| head[c as usize].iter().zip(&h[0]).map(|(x, y)| x * y).sum())
        .collect();
    let alone_a = m.next_token_logits(None, &[a], &cands).unwrap();
    assert!(
        close(&alone_a[0], &want, 1e-4),
        "{:?} vs {want:?}",
        alone_a[0]
    );

    // Packing two sequences into one pass.
    let alone_b = m.next_token_logits(None, &[b], &cands).unwrap();
    let packed = m.next_token_logits(None, &[a, b], &cands).unwrap();
    assert!(close(&packed[0], &alone_a[0], 1e-5));
    assert!(close(&packed[1], &alone_b[0], 1e-5));

    // A cached prefix continued by both sequences = the joined sequences from scratch.
    let cache = m.prefill(p).unwrap();
    assert_eq!(cache.len(), p.len());
    let cont = m.next_token_logits(Some(&cache), &[a, b], &cands).unwrap();
    let pa: Vec<u32> = p.iter().chain(a).copied().collect();
    let pb: Vec<u32> = p.iter().chain(b).copied().collect();
    let full = m.next_token_logits(None, &[&pa, &pb], &cands).unwrap();
    for (c, f) in cont.iter().zip(&full) {
        assert!(close(c, f, 1e-4), "{c:?} vs {f:?}");
    }
    // The renormalized distribution sums to one.
    let d = gpo_embed::decoder::lm::normalized(&cont[0]);
    assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-12);

    // Past the context (16 positions): a clear error, not a panic.
    let long = [4u32; 12];
    assert!(matches!(
        m.next_token_logits(Some(&cache), &[&long], &cands),
        Err(EmbedError::TooLong { .. })
    ));
    assert!(matches!(
        m.next_token_logits(None, &[a], &[999]),
        Err(EmbedError::Unsupported(_))
    ));
    // An encoder is not a decoder: named as such, not misread as a broken decoder config.
    let enc = tempfile::tempdir().unwrap();
    bert_folder(enc.path(), "", None);
    assert!(matches!(
        gpo_embed::load_decoder(enc.path().to_str().unwrap(), &LoadOptions::default()),
        Err(EmbedError::UnknownArchitecture { .. })
    ));
}
