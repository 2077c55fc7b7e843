"""DeepSeek-V4 as llama.cpp's `deepseek4` GGUF: tiny random models converted by llama.cpp's own
`convert_hf_to_gguf.py`, with llama.cpp's and transformers 5.23.0's logits for each file.

Writes crates/mnemo/tests/fixtures/deepseek4_gguf/:

  ds4-{f32,f16,q8_0,q2_k}.gguf   the converter's output with --outtype f32 / f16 / q8_0, and
                                 `llama-quantize --allow-requantize f16.gguf Q2_K` (the 2-bit mix)
  logits-{variant}.safetensors   input_ids I64 [T]; transformers F32 [T, V] on the GGUF's own
                                 dequantised weights (gguf-py's dequantiser); llamacpp F32 [T, V]
                                 (K cache f16, llama.cpp's default); llamacpp_kv32 (K cache f32)
  meta.json                      versions, config, per-variant tensor types and agreement numbers

The model: a random transformers `DeepseekV4ForCausalLM` (v4_fixtures.randomize) with what
llama.cpp accepts: hc_mult 4 (`GGML_ASSERT(hc == 4)`), compress ratios 0 / 4 / 128 only, one of
each (an all-HCA model dies with SIGFPE, see results/ds4-gguf/REPORT.md), index_head_dim 64 (its
Hadamard rotation needs a multiple of 64), one hash layer, the release's flat YaRN. It is written
in the official layout the converter reads: routed experts FP4 (e2m1 + E8M0 per 32, packed I8,
as released: the converter repacks them losslessly to MXFP4), the release's FP8/BF16 matrices
as F16 (so that --outtype decides their GGUF type; an FP8 source would be forced to Q8_0), F32
where the release keeps F32, tid2eid I32.

The converter needs a tokenizer; these models have none, so its `set_vocab` is replaced by one
that writes `tokenizer.ggml.model = "none"` and the vocabulary size (llama.cpp's no-vocab mode):
the tensors and the architecture metadata are the converter's own.

Usage (from the repository root):
    LLAMA=/work/llama/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \\
    /work/v4venv/bin/python reference/v4_gguf_fixture.py [--out DIR]
(runs reference/v4_gguf_llamacpp.py under /work/llama/venv with LLAMA_CPP_LIB_PATH=/work/llama/build/bin)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import v4_fixtures as V  # noqa: E402  (asserts transformers == 5.23.0)
import v4_official_fixture as O  # noqa: E402

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

LLAMA = os.environ.get("LLAMA", "/work/llama/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
LLAMA_BIN = os.environ.get("LLAMA_BIN", "/work/llama/build/bin")
LLAMA_PY = os.environ.get("LLAMA_PY", "/work/llama/venv/bin/python")
sys.path.insert(0, os.path.join(LLAMA, "gguf-py"))
sys.path.insert(0, LLAMA)
import gguf  # noqa: E402

REPO_ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "mnemo", "tests", "fixtures", "deepseek4_gguf")
T = 160          # > 128: the HCA layer gets one compressed entry; 40 CSA entries, top-4 chosen
SEED = 4242

CONFIG = dict(
    vocab_size=128, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, qk_rope_head_dim=16,
    q_lora_rank=32, o_lora_rank=32, o_groups=2,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, swiglu_limit=10.0,
    sliding_window=16, compress_ratios=[0, 4, 128], compress_rope_theta=160000.0,
    rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=4096,
    index_n_heads=8, index_head_dim=64, index_topk=4,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    num_hash_layers=1, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, hidden_act="silu",
)
VARIANTS = ["f32", "f16", "q8_0", "q2_k"]


def storage_of(name):
    kind = O.storage_of(name)
    return {"fp8": "f16", "bf16": "f16"}.get(kind, kind)


def official_dir(d, tensors):
    disk, deq = {}, {}
    for name, t in sorted(tensors.items()):
        kind = storage_of(name)
        if kind == "fp4":
            p, e = O.fp4_quant(t.float())
            disk[name] = p.view(torch.int8)
            disk[name[: -len(".weight")] + ".scale"] = e.view(torch.float8_e8m0fnu)
            deq[name] = O.fp4_dequant(p, e)
        elif kind == "f16":
            disk[name] = t.to(torch.float16)
            deq[name] = disk[name].float()
        elif kind == "i32":
            disk[name] = t.to(torch.int32)
            deq[name] = t
        else:
            disk[name] = t.float()
            deq[name] = disk[name]
    save_file({k: v.contiguous() for k, v in disk.items()}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **CONFIG,
           "expert_dtype": "fp4", "torch_dtype": "float16"}
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    return deq


def convert(src, out, outtype):
    """convert_hf_to_gguf.py in a subprocess, its set_vocab replaced (module doc)."""
    code = f"""
import sys
sys.path.insert(0, {os.path.join(LLAMA, 'gguf-py')!r}); sys.path.insert(0, {LLAMA!r})
import convert_hf_to_gguf as c
import conversion.deepseek as d
def set_vocab(self):
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
d.DeepseekV4Model.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
c.main()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"converter failed ({outtype}):\n{r.stderr[-4000:]}")


def quantize(src, out, qtype):
    r = subprocess.run([os.path.join(LLAMA_BIN, "llama-quantize"), "--allow-requantize", src, out, qtype],
                       capture_output=True, text=True,
                       env={**os.environ, "LD_LIBRARY_PATH": LLAMA_BIN})
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def llamacpp_logits(path, ids, kv):
    with tempfile.TemporaryDirectory() as d:
        idf, outf = os.path.join(d, "ids.json"), os.path.join(d, "out.npy")
        json.dump([int(i) for i in ids], open(idf, "w"))
        r = subprocess.run([LLAMA_PY, os.path.join(HERE, "v4_gguf_llamacpp.py"), path, idf, outf, "--kv", kv],
                           capture_output=True, text=True,
                           env={**os.environ, "LLAMA_CPP_LIB_PATH": LLAMA_BIN})
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {path} (rc {r.returncode}):\n{r.stderr[-4000:]}")
        return torch.from_numpy(np.load(outf)), r.stdout.strip()


def gguf_name_of(name):
    """The converter's own GGUF name for an official tensor (its `_map_dsv4_tensor_name`)."""
    import conversion.deepseek as d
    bid = int(name.split(".")[1]) if name.startswith("layers.") else None
    key, suffix = d.DeepseekV4Model._map_dsv4_tensor_name(None, name, bid)
    if ".ffn.experts." in name:
        key = {"w1": gguf.MODEL_TENSOR.FFN_GATE_EXP, "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
               "w3": gguf.MODEL_TENSOR.FFN_UP_EXP}[name.split(".")[-2]]
    return gguf.TENSOR_NAMES[key].format(bid=bid) + suffix


def gguf_weights(path, names):
    """{official name: f32 tensor} read back from a GGUF (gguf-py's dequantiser), and the types."""
    r = gguf.GGUFReader(path)
    by = {t.name: t for t in r.tensors}
    out, types, used = {}, {}, set()
    for name in names:
        gname = gguf_name_of(name)
        t = by[gname]
        used.add(gname)
        types[gname] = t.tensor_type.name
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ".ffn.experts." in name:
            w = w[int(name.split(".")[4])]
        out[name] = w.reshape(-1)
    for name in [n for n in by if n.endswith("ffn_gate_tid2eid.weight")]:
        used.add(name)
        types[name] = by[name].tensor_type.name
    extra = set(by) - used
    assert not extra, f"tensors not mapped back: {sorted(extra)}"
    return out, types


def stats(a, b):
    """Per-position relative error ||a − b|| / ||b|| (median, max) and argmax agreement."""
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).double()
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return {"median_rel": rel.median().item(), "max_rel": rel.max().item(),
            "p90_rel": rel.quantile(0.9).item(), "argmax_agree": agree,
            "max_abs": (a - b).abs().max().item()}


def attempt(cfg, seed):
    """A random model whose top-k choices (MoE, indexer) have margins > V.MIN_GAP and no SwiGLU
    input within V.MIN_CLAMP_DIST of the clamp, measured with the F16 / FP4 weights (the indexer's
    ReLU scores tie at 0 easily; torch.topk and mnemo break ties differently)."""
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(seed)
    V.randomize(model, cfg, g)
    tensors, src = O.official_tensors(model, cfg)
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=g, dtype=torch.int64)
    model.eval()
    deq = {}
    for name, t in tensors.items():
        kind = storage_of(name)
        if kind == "fp4":
            deq[name] = O.fp4_dequant(*O.fp4_quant(t.float()))
        elif kind == "f16":
            deq[name] = t.to(torch.float16).float()
    O.load_dequantised(model, deq, src)
    probe = V.Probe(model, cfg)
    with torch.no_grad():
        model(ids[None], use_cache=False)
    info = dict(moe_gap=probe.moe_gap, index_gap=probe.index_gap, clamp_dist=probe.clamp_dist,
                index_rows_selecting=probe.index_rows_selecting)
    probe.close()
    ok = info["moe_gap"] > V.MIN_GAP and info["index_gap"] > V.MIN_GAP and info["clamp_dist"] > V.MIN_CLAMP_DIST
    return ok, model, tensors, src, ids, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    c = dict(CONFIG)
    cfg = DeepseekV4Config(**c, attn_implementation="eager", experts_implementation="eager")
    assert cfg.layer_types == ["sliding_attention", "compressed_sparse_attention",
                               "heavily_compressed_attention"], cfg.layer_types
    for i in range(V.SEED_TRIES):
        seed = SEED + 1000 * i
        ok, model, tensors, src, ids, info = attempt(cfg, seed)
        if ok:
            break
        print(f"  seed {seed}: margins too small {info}")
    else:
        raise RuntimeError("no seed with margins")
    print(f"seed {seed}: {info}")

    d = args.out
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    meta = {"generator": "reference/v4_gguf_fixture.py", "seed": seed, "T": T, "config": CONFIG,
            "margins_f16_weights": info,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "llama.cpp": "vendored in llama-cpp-python 0.3.36"},
            "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        off = os.path.join(tmp, "official")
        os.makedirs(off)
        official_dir(off, tensors)
        for v in VARIANTS:
            path = os.path.join(d, f"ds4-{v}.gguf")
            if v == "q2_k":
                quantize(os.path.join(d, "ds4-f16.gguf"), path, "Q2_K")
            else:
                convert(off, path, v)
            w, types = gguf_weights(path, [n for n in tensors if not n.endswith("tid2eid")])
            O.load_dequantised(model, {n: t.reshape(tensors[n].shape) for n, t in w.items()}, src)
            with torch.no_grad():
                tf = model(ids[None], use_cache=False).logits[0].float()
            hist = {}
            for ty in types.values():
                hist[ty] = hist.get(ty, 0) + 1
            s = {"types": hist, "bytes": os.path.getsize(path)}
            out = {"input_ids": ids.clone(), "transformers": tf.contiguous()}
            try:
                lc, who = llamacpp_logits(path, ids, "f16")
                lc32, _ = llamacpp_logits(path, ids, "f32")
                out["llamacpp"], out["llamacpp_kv32"] = lc.contiguous(), lc32.contiguous()
                s.update({"llamacpp_vs_transformers": stats(lc, tf),
                          "llamacpp_kv32_vs_transformers": stats(lc32, tf),
                          "llamacpp_kv16_vs_kv32": stats(lc, lc32)})
            except RuntimeError as e:  # the shared build's SIGILL on Q8_0 / k-quant products
                who = str(e).splitlines()[0]
                s["llamacpp_failed"] = who
            save_file(out, os.path.join(d, f"logits-{v}.safetensors"),
                      metadata={"generator": "reference/v4_gguf_fixture.py", "llamacpp": who})
            meta["variants"][v] = s
            print(v, json.dumps(s))
    with open(os.path.join(d, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.write("\n")
    for f in sorted(os.listdir(d)):
        print(f, os.path.getsize(os.path.join(d, f)))


if __name__ == "__main__":
    main()
