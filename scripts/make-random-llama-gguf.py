#!/usr/bin/env python3
"""A random-weight Llama-shaped GGUF of ~1.5B parameters, for decode-speed benchmarks where
decoding is memory-bound (issue #21 item 6; scripts/bench-gguf-bandwidth.sh runs it).

Usage (needs the `gguf` package, e.g. the venv of docs/scripts.md; numpy):
  python3 scripts/make-random-llama-gguf.py TOKENIZER.gguf OUT-F16.gguf [LAYERS=22]
then quantise with llama.cpp's own quantizer:
  llama-quantize OUT-F16.gguf OUT-Q4_K_M.gguf Q4_K_M

Shapes: hidden 2048, 16 heads x 128 (4 KV heads), FFN 8192, untied output head, vocabulary
and tokenizer copied from TOKENIZER.gguf (a llama-architecture GGUF such as SmolLM2's,
vocabulary 49152): 22 layers give 1.54B parameters (1.34B in the blocks, 2 x 0.10B in the
embedding and the head). Weights N(0, 0.02), norms 1: the text is noise, the speed is real.
F16 on disk (~3.1 GB), written tensor by tensor from a fixed seed.
"""
import sys

import numpy as np
import gguf

src, out = sys.argv[1], sys.argv[2]
layers = int(sys.argv[3]) if len(sys.argv) > 3 else 22
D, HEADS, KV, HD, FFN = 2048, 16, 4, 128, 8192

r = gguf.GGUFReader(src)
f = r.fields
tokens = f["tokenizer.ggml.tokens"].contents()
nv = len(tokens)
w = gguf.GGUFWriter(out, "llama")
w.add_name("random-llama-1.5b")
w.add_context_length(4096)
w.add_embedding_length(D)
w.add_block_count(layers)
w.add_feed_forward_length(FFN)
w.add_head_count(HEADS)
w.add_head_count_kv(KV)
w.add_rope_dimension_count(HD)
w.add_rope_freq_base(100000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(nv)
w.add_file_type(1)  # MOSTLY_F16
w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
w.add_token_list(tokens)
w.add_token_types(f["tokenizer.ggml.token_type"].contents())
w.add_token_merges(f["tokenizer.ggml.merges"].contents())
w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
w.add_add_bos_token(False)

rng = np.random.default_rng(1234)


def t(name, shape, std=0.02, mean=0.0):
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= std
    a += mean
    w.add_tensor(name, a.astype(np.float16 if len(shape) == 2 else np.float32))


t("token_embd.weight", (nv, D))
t("output.weight", (nv, D))
t("output_norm.weight", (D,), 0.0, 1.0)
for i in range(layers):
    b = f"blk.{i}."
    t(b + "attn_norm.weight", (D,), 0.0, 1.0)
    t(b + "attn_q.weight", (HEADS * HD, D))
    t(b + "attn_k.weight", (KV * HD, D))
    t(b + "attn_v.weight", (KV * HD, D))
    t(b + "attn_output.weight", (D, HEADS * HD))
    t(b + "ffn_norm.weight", (D,), 0.0, 1.0)
    t(b + "ffn_gate.weight", (FFN, D))
    t(b + "ffn_up.weight", (FFN, D))
    t(b + "ffn_down.weight", (D, FFN))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
n = sum(int(np.prod(s)) for s in [(nv, D)] * 2) + layers * (
    2 * HEADS * HD * D + 2 * KV * HD * D + 3 * FFN * D)
print(f"wrote {out}: {layers} layers, vocabulary {nv}, {n / 1e9:.2f}B parameters")
