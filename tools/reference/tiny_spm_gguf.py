#!/usr/bin/env python3
"""A tiny GGUF with a SentencePiece (`tokenizer.ggml.model = llama`) vocabulary, and the token
ids transformers' GGUF tokenizer gives for a few texts: the reference for gpo-embed's rebuild
of Llama-1/2-style GGUF tokenizers (merges from scores, byte fallback, Metaspace, BOS).

    python tools/reference/tiny_spm_gguf.py tests/fixtures/embed
writes tiny-spm.gguf and tiny-spm.json there. Needs gguf and transformers (>= 4.45).
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFWriter, TokenType

TEXTS = ["the cat", "The cat sat on the mat.", "a  cat\n", "café the", "hat, that"]


def main(out):
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(TokenType.BYTE)
    pieces = ["▁", "t", "h", "e", "a", "c", "s", "m", "o", "n", ".", ",", "▁t", "he", "▁the", "at", "▁c", "▁cat",
              "▁s", "▁sat", "▁o", "▁on", "▁m", "▁mat", "▁a", "ha", "hat", "▁h", "▁hat", "th", "▁th", "▁that", "ca", "▁ca"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        scores.append(-float(i))
        types.append(TokenType.NORMAL)
    path = os.path.join(out, "tiny-spm.gguf")
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, gguf_file="tiny-spm.gguf")
    items = [{"text": t, "ids": tok(t)["input_ids"]} for t in TEXTS]
    with open(os.path.join(out, "tiny-spm.json"), "w") as f:
        json.dump({"generator": "tools/reference/tiny_spm_gguf.py", "items": items}, f, indent=1)
        f.write("\n")
    for i in items:
        print(i)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/embed")
