"""Tiny random `deepseek2` GGUFs (MLA + DeepSeekMoE), quantised by llama.cpp, with llama.cpp's logits.

Dev-time only (the sibling of `gguf_fixtures.py`, same tiny Qwen2 vocabulary and setup):

  V=/path/to/llama_cpp_python-0.3.36/vendor/llama.cpp
  LLAMA_CPP_LIB_PATH=/path/to/llama.cpp/build/bin PYTHONPATH=$V/gguf-py \\
      venv/bin/python reference/gguf_deepseek2.py $V crates/mnemo/tests/fixtures/gguf_deepseek2

Two variants of the architecture, each as llama.cpp's converter writes it:
  - `lite` (DeepSeek-V2-Lite / Coder-V2-Lite): `attn_q` (q_lora_rank = 0), the split
    `attn_k_b` / `attn_v_b` of the current converter (`key_length_mla` set: llama.cpp's MLA
    path, latent KV cache), softmax gating without renormalisation, one leading dense block,
    two shared experts, YaRN (factor 4 over an original context of 16, `yarn_log_multiplier`
    0.0707 as the converter writes 0.1·mscale_all_dim).
  - `v2` (DeepSeek-V2 / V2.5 layout): `attn_q_a` / `attn_q_a_norm` / `attn_q_b`
    (q_lora_rank > 0), the legacy unsplit `attn_kv_b` (no `key_length_mla`: llama.cpp's
    non-absorbed MHA path), sigmoid gating with `exp_probs_b`, `expert_weights_norm`,
    `expert_weights_scale` 2.5, group-limited routing (2 groups of 2 experts, 1 used, top 2), no RoPE scaling.
Each is written in F32 at d = 64 (`{v}-F32.gguf`, kept; llama.cpp evaluated with an F32 KV
cache, so the comparison is of the architectures alone) and at d = 256, quantised by
`llama_model_quantize` (`{v}-{type}.gguf`; the F32 source is not kept; llama.cpp's default f16
KV cache). `{v}-{type}.json`: the ids and llama.cpp's logits at every position (one evaluation
of the whole sequence, n_threads = 1, logits_all), rounded to 1e-4; for a quantised model also
`logits_dequantized_f32_kv`, llama.cpp's logits of the same model with every weight dequantised
by gguf-py and written in F32 (f32 KV cache): the quantised model without llama.cpp's
activation quantisation, which is what mnemo's f32 paths compute.
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

K = 512
TYPES = {"lite": ["Q4_K_M"], "v2": ["Q2_K"]}
FTYPE = {"Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
N_IDS = 40


def tiny_vocab():
    r = gguf.GGUFReader(os.path.join(V, "models", "ggml-vocab-qwen2.gguf"))
    f = r.fields
    toks = f["tokenizer.ggml.tokens"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    template = f["tokenizer.chat_template"].contents()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return toks[:K] + specials, [1] * K + [3] * 3, merges[: K - 256], template


def write_f32(variant, d, path, rng, override=None):
    tokens, types, merges, template = tiny_vocab()
    nv = len(tokens)
    lite = variant == "lite"
    # d = 64: heads 4, nope 16, rope 8, v 16, latent 64, experts of 32; d = 256 (k-quants:
    # rows of 256 where it matters): heads 2, nope 64, rope 32, v 64, latent 256, experts of 128.
    heads = 4 if d == 64 else 2
    nope, rope, vhd, kv_lora = d // 4, d // 8, d // 4, d
    q_lora = 0 if lite else d
    ffn, ff_exp = d // 2, d // 2
    n_exp, n_used, n_shared = (4, 2, 2) if lite else (4, 2, 1)
    layers, dense_lead = 2, 1
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    # The MLA converter writes 1 (MQA over the latent); the legacy unsplit files had n_head.
    w.add_head_count_kv(1 if lite else heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_leading_dense_block_count(dense_lead)
    w.add_vocab_size(nv)
    w.add_q_lora_rank(q_lora)
    w.add_kv_lora_rank(kv_lora)
    if lite:
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(vhd)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(vhd)
    w.add_expert_feed_forward_length(ff_exp)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(n_used)
    w.add_expert_shared_count(n_shared)
    if lite:
        w.add_expert_weights_scale(1.0)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(16)
        w.add_rope_scaling_yarn_log_mul(0.1 * 0.707)
    else:
        w.add_expert_weights_scale(2.5)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(2)
        w.add_expert_group_used_count(1)
    w.add_rope_dimension_count(rope)
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

    def add(name, x):
        w.add_tensor(name, override[name] if override is not None else x)

    def t(name, shape, std, mean=0.0):
        add(name, (mean + std * rng.standard_normal(shape)).astype(np.float32))

    s = (256 / d) ** 0.5  # keep activations O(1) at either width
    t("token_embd.weight", (nv, d), 1.0)
    t("output.weight", (nv, d), 0.15 * s)
    t("output_norm.weight", (d,), 0.1, 1.0)
    for i in range(layers):
        b = f"blk.{i}."
        t(b + "attn_norm.weight", (d,), 0.1, 1.0)
        if lite:
            t(b + "attn_q.weight", (heads * (nope + rope), d), 0.12 * s)
        else:
            t(b + "attn_q_a.weight", (q_lora, d), 0.1 * s)
            t(b + "attn_q_a_norm.weight", (q_lora,), 0.1, 1.0)
            t(b + "attn_q_b.weight", (heads * (nope + rope), q_lora), 0.12 * s)
        t(b + "attn_kv_a_mqa.weight", (kv_lora + rope, d), 0.12 * s)
        t(b + "attn_kv_a_norm.weight", (kv_lora,), 0.1, 1.0)
        kvb = (0.12 * s * rng.standard_normal((heads, nope + vhd, kv_lora))).astype(np.float32)
        if lite:
            # The converter's split: k_b[h] = kv_b[h, :nope].T ([kv_lora, nope]), v_b[h] = kv_b[h, nope:].
            add(b + "attn_k_b.weight", np.ascontiguousarray(kvb[:, :nope, :].transpose(0, 2, 1)))
            add(b + "attn_v_b.weight", np.ascontiguousarray(kvb[:, nope:, :]))
        else:
            add(b + "attn_kv_b.weight", kvb.reshape(heads * (nope + vhd), kv_lora))
        t(b + "attn_output.weight", (d, heads * vhd), 0.08 * s)
        t(b + "ffn_norm.weight", (d,), 0.1, 1.0)
        if i < dense_lead:
            t(b + "ffn_gate.weight", (ffn, d), 0.1 * s)
            t(b + "ffn_up.weight", (ffn, d), 0.1 * s)
            t(b + "ffn_down.weight", (d, ffn), 0.06 * s)
        else:
            t(b + "ffn_gate_inp.weight", (n_exp, d), 0.15 * s)
            if not lite:
                t(b + "exp_probs_b.bias", (n_exp,), 0.3)
            t(b + "ffn_gate_exps.weight", (n_exp, ff_exp, d), 0.1 * s)
            t(b + "ffn_up_exps.weight", (n_exp, ff_exp, d), 0.1 * s)
            t(b + "ffn_down_exps.weight", (n_exp, d, ff_exp), 0.06 * s)
            t(b + "ffn_gate_shexp.weight", (n_shared * ff_exp, d), 0.1 * s)
            t(b + "ffn_up_shexp.weight", (n_shared * ff_exp, d), 0.1 * s)
            t(b + "ffn_down_shexp.weight", (d, n_shared * ff_exp), 0.06 * s)
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


def dequantized(path):
    """Every tensor of `path` dequantised by gguf-py (ggml's dequantisation), float32."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    return out


def run(path, ids, f32_cache):
    kw = dict(type_k=0, type_v=0) if f32_cache else {}
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, n_batch=64, logits_all=True,
                          verbose=False, **kw)
    llm.reset()
    llm.eval(ids)
    lg = np.array(llm.scores[: len(ids)], dtype=np.float64)
    del llm
    return lg


def main():
    os.makedirs(OUT, exist_ok=True)
    tmp = os.path.join(OUT, "tmp")
    os.makedirs(tmp, exist_ok=True)
    rnd = lambda lg: [[round(float(x), 4) for x in row] for row in lg]  # noqa: E731
    for vi, variant in enumerate(TYPES):
        ids = [int(x) for x in np.random.default_rng(7 + vi).integers(0, K + 3, N_IDS)]
        jobs = [(f"{variant}-F32.gguf", 64, None)] + [(f"{variant}-{ty}.gguf", 256, ty) for ty in TYPES[variant]]
        for name, d, ty in jobs:
            rng = np.random.default_rng(200 + vi)
            dst = os.path.join(OUT, name)
            rec = {"engine": f"llama-cpp-python {llama_cpp.__version__} (vendored llama.cpp), n_threads=1, "
                             "logits_all, one llm.eval of the whole sequence", "ids": ids}
            if ty is None:
                write_f32(variant, d, dst, rng)
            else:
                src = os.path.join(tmp, f"{variant}-F32-{d}.gguf")
                write_f32(variant, d, src, rng)
                quantize(src, dst, FTYPE[ty])
                os.remove(src)
                # The same model with the quantised weights dequantised, in F32: llama.cpp's
                # logits without its activation quantisation (f32 KV cache).
                deq = os.path.join(tmp, f"{variant}-deq.gguf")
                write_f32(variant, d, deq, np.random.default_rng(0), override=dequantized(dst))
                rec["logits_dequantized_f32_kv"] = rnd(run(deq, ids, True))
                os.remove(deq)
            lg = run(dst, ids, ty is None)
            rec["kv_cache"] = "f32" if ty is None else "f16"
            rec["logits"] = rnd(lg)
            rec["argmax"] = [int(i) for i in lg.argmax(1)]
            with open(os.path.join(OUT, name.replace(".gguf", ".json")), "w") as f:
                json.dump(rec, f, separators=(",", ":"))
            print(name, os.path.getsize(dst), rec["argmax"][:12], float(np.abs(lg).max()), file=sys.stderr)
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
