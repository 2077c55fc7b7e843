"""Tiny random llama / qwen2 / qwen3 GGUFs, quantised by llama.cpp, with llama.cpp's logits.

Dev-time only. Needs llama.cpp's shared libraries and llama-cpp-python 0.3.36 (issue #21's build,
`GGML_NATIVE=OFF` with AVX2/AVX-512 flags) and the gguf-py of the llama.cpp source it vendors:

  V=/path/to/llama_cpp_python-0.3.36/vendor/llama.cpp
  LLAMA_CPP_LIB_PATH=/path/to/llama.cpp/build/bin PYTHONPATH=$V/gguf-py \\
      venv/bin/python reference/gguf_fixtures.py $V crates/mnemo/tests/fixtures/gguf_arch

For each architecture it writes an F32 GGUF of random weights (d = 256, two layers, FFN 384;
qwen2 with q/k/v biases, qwen3 with per-head q/k norms and head_dim 128 ≠ d / heads) carrying a real
tokenizer: llama.cpp's Qwen2 vocabulary (`models/ggml-vocab-qwen2.gguf`, pre-tokenizer
`qwen2`) cut to its first 512 tokens (the 256 bytes and the first 256 merges, whose results
are exactly those tokens) plus `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and its chat
template. `llama_model_quantize` (llama.cpp's own quantizer) turns it into each type of
`TYPES`. The FFN width 384 is not a multiple of 256, so `ffn_down` (rows of 384 values) gets
llama.cpp's fallback types (`Q4_K` → `Q5_0`, `Q5_K` → `Q5_1`, `Q6_K` → `Q8_0`, `Q2_K`/`Q3_K` →
`Q4_0`) and the fused gate|up / q|k|v mixes differ in type. Use a llama.cpp built without
AVX-VNNI (VEX `vpdpbusd`) on CPUs that have AVX512-VNNI only: such a build dies of SIGILL in
the `Q4_0`/`Q4_1`/`Q5_0`/`Q5_1`/`Q8_0` dot products that these fallback types use (this repo's
fixtures: `-DGGML_AVX_VNNI=OFF`). Written to OUT:
  - `{arch}-{type}.gguf` (the quantised models; the F32 ones are not kept);
  - `logits.json`: per model the token ids and llama.cpp's logits at every position
    (`logits_all`, n_threads = 1, one evaluation of the whole sequence), rounded to 1e-4;
  - `tokens.json`: llama.cpp's tokenisation (parse_special = true, no BOS) of texts with
    the tiny vocabulary, and the chat template.
"""
import json
import os
import sys

import numpy as np

V = sys.argv[1]
OUT = sys.argv[2]
sys.path.insert(0, os.path.join(V, "gguf-py"))
import gguf  # noqa: E402
import llama_cpp  # noqa: E402

K = 512  # kept vocabulary (bytes + merges)
TYPES = {
    "llama": ["Q4_K_M", "Q2_K"],
    "qwen2": ["Q4_K_M", "Q3_K_M"],
    "qwen3": ["Q5_K_M", "Q2_K"],
}
FTYPE = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
TEXTS = [
    "Hello world! It's 2024, isn't it?",
    "def add(a, b):\n    return a + b\n",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    "  spaces   and\ttabs\n\n\nnewlines",
]


def tiny_vocab():
    r = gguf.GGUFReader(os.path.join(V, "models", "ggml-vocab-qwen2.gguf"))
    f = r.fields
    toks = f["tokenizer.ggml.tokens"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    template = f["tokenizer.chat_template"].contents()
    keep = toks[:K]
    kept_merges = merges[: K - 256]
    for i, m in enumerate(kept_merges):
        assert m.replace(" ", "") == keep[256 + i], (i, m, keep[256 + i])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return keep + specials, [1] * K + [3] * 3, kept_merges, template


def write_f32(arch, path, rng):
    tokens, types, merges, template = tiny_vocab()
    nv = len(tokens)
    d, layers, ffn = 256, 2, 384
    heads, kv, hd = (2, 1, 128) if arch == "qwen3" else (4, 2, d // 4)
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if arch == "qwen3":
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(K)
    w.add_bos_token_id(K)
    w.add_add_bos_token(False)
    w.add_chat_template(template)

    def t(name, shape, std, mean=0.0):
        w.add_tensor(name, (mean + std * rng.standard_normal(shape)).astype(np.float32))

    # Scales chosen so that the residual stream and the logits are O(1).
    # Tied (qwen2): a small embedding, else every token predicts itself.
    t("token_embd.weight", (nv, d), 0.05 if arch == "qwen2" else 1.0)
    if arch != "qwen2":  # qwen2 ties the output to the embedding
        t("output.weight", (nv, d), 0.15)
    t("output_norm.weight", (d,), 0.1, 1.0)
    for i in range(layers):
        b = f"blk.{i}."
        t(b + "attn_norm.weight", (d,), 0.1, 1.0)
        t(b + "attn_q.weight", (heads * hd, d), 0.12)
        t(b + "attn_k.weight", (kv * hd, d), 0.12)
        t(b + "attn_v.weight", (kv * hd, d), 0.08)
        t(b + "attn_output.weight", (d, heads * hd), 0.06)
        if arch == "qwen2":
            t(b + "attn_q.bias", (heads * hd,), 0.5)
            t(b + "attn_k.bias", (kv * hd,), 0.5)
            t(b + "attn_v.bias", (kv * hd,), 0.2)
        if arch == "qwen3":
            t(b + "attn_q_norm.weight", (hd,), 0.2, 1.0)
            t(b + "attn_k_norm.weight", (hd,), 0.2, 1.0)
        t(b + "ffn_norm.weight", (d,), 0.1, 1.0)
        t(b + "ffn_gate.weight", (ffn, d), 0.1)
        t(b + "ffn_up.weight", (ffn, d), 0.1)
        t(b + "ffn_down.weight", (d, ffn), 0.06)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src, dst, ftype):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    assert rc == 0, (src, dst, rc)


def main():
    os.makedirs(OUT, exist_ok=True)
    tmp = os.path.join(OUT, "tmp")
    os.makedirs(tmp, exist_ok=True)
    logits = {}
    tok_out = None
    for ai, arch in enumerate(TYPES):
        rng = np.random.default_rng(100 + ai)
        f32 = os.path.join(tmp, f"{arch}-F32.gguf")
        write_f32(arch, f32, rng)
        for ty in TYPES[arch]:
            name = f"{arch}-{ty}.gguf"
            dst = os.path.join(OUT, name)
            quantize(f32, dst, FTYPE[ty])
            llm = llama_cpp.Llama(model_path=dst, n_ctx=128, n_threads=1, n_batch=128,
                                  logits_all=True, verbose=False)
            ids = llm.tokenize(TEXTS[1].encode(), add_bos=False, special=True)
            ids = ids[:10] + [int(x) for x in rng.integers(0, K + 3, 6)]
            llm.reset()
            llm.eval(ids)
            lg = np.array(llm.scores[: len(ids)], dtype=np.float64)
            logits[name] = {
                "ids": ids,
                "logits": [[round(float(x), 4) for x in row] for row in lg],
                "argmax": [int(i) for i in lg.argmax(1)],
            }
            types = sorted({t.tensor_type.name for t in gguf.GGUFReader(dst).tensors})
            print(name, os.path.getsize(dst), types, logits[name]["argmax"], file=sys.stderr)
            if tok_out is None:
                tok_out = {
                    "texts": TEXTS,
                    "ids": [llm.tokenize(s.encode(), add_bos=False, special=True) for s in TEXTS],
                    "chat_template": llm.metadata.get("tokenizer.chat_template"),
                }
            del llm
        os.remove(f32)
    os.rmdir(tmp)
    meta = {"engine": f"llama-cpp-python {llama_cpp.__version__} (vendored llama.cpp, GGML_AVX_VNNI=OFF), n_threads=1, "
                      "logits_all, one llm.eval of the whole sequence",
            "models": logits}
    with open(os.path.join(OUT, "logits.json"), "w") as f:
        json.dump(meta, f, separators=(",", ":"))
    with open(os.path.join(OUT, "tokens.json"), "w") as f:
        json.dump(tok_out, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
