#!/usr/bin/env python3
"""The PyTorch side of scripts/bench_embed.sh.

    bench_embed.py texts OUT [--n 512]        writes OUT: N fixed survey-like texts (~53 MiniLM tokens)
    bench_embed.py minilm DIR TEXTS           sentence-transformers, batch 32: prints embeddings/s
    bench_embed.py smollm GGUF TEXTS          transformers on the dequantized GGUF, f32, batch 32,
                                              mean pooling: prints tokens/s (non-padding tokens)

Both use 2 torch threads (the machine's cores), f32, CPU, one warm-up batch untimed.
"""
import json
import os
import random
import sys
import time

WORDS = (
    "government people country should would policy economy health care public school family "
    "future children local community worry about the following happening to you being victim "
    "attack great deal somewhat not at all important issue national security climate change "
    "jobs income taxes religion science technology social media news trust elections"
).split()


def make_texts(n):
    rng = random.Random(0)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(44, 50))]
        out.append(f"Question {i % 97}: " + " ".join(words).capitalize() + "?")
    return out


def read(path):
    with open(path) as f:
        return [l.rstrip("\n") for l in f if l.strip()]


def bench_minilm(model_dir, texts):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    st = SentenceTransformer(model_dir, device="cpu")
    ntok = sum(len(st.tokenizer(t)["input_ids"]) for t in texts)
    st.encode(texts[:32], batch_size=32)
    t0 = time.perf_counter()
    st.encode(texts, batch_size=32)
    s = time.perf_counter() - t0
    print(json.dumps({"impl": "sentence-transformers", "texts": len(texts), "mean_tokens": ntok / len(texts),
                      "seconds": s, "texts_per_s": len(texts) / s, "tokens_per_s": ntok / s}))


def bench_smollm(gguf, texts):
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    model = AutoModel.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()

    def run(batch):
        enc = tok(batch, padding=True, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            (h * m).sum(1) / m.sum(1)
        return int(enc["attention_mask"].sum())

    run(texts[:32])
    ntok = 0
    t0 = time.perf_counter()
    for i in range(0, len(texts), 32):
        ntok += run(texts[i:i + 32])
    s = time.perf_counter() - t0
    print(json.dumps({"impl": "transformers", "texts": len(texts), "mean_tokens": ntok / len(texts),
                      "seconds": s, "texts_per_s": len(texts) / s, "tokens_per_s": ntok / s}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "texts":
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 512
        with open(sys.argv[2], "w") as f:
            f.write("\n".join(make_texts(n)) + "\n")
    elif cmd == "minilm":
        bench_minilm(sys.argv[2], read(sys.argv[3]))
    elif cmd == "smollm":
        bench_smollm(sys.argv[2], read(sys.argv[3]))
    else:
        sys.exit(__doc__)
