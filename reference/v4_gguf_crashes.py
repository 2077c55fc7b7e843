"""Minimal reproductions of llama.cpp's failures on `deepseek4` GGUFs, and where its numerics
differ from transformers'. Writes results/ds4-gguf/crashes.json and numerics.json (the report,
results/ds4-gguf/REPORT.md, quotes them).

Each case: the tiny model of v4_gguf_fixture.py with ONE config change, written in the official
layout, converted by convert_hf_to_gguf.py (--outtype f16), then run by llama-cpp-python (a
4-token eval, n_threads 1) in a subprocess; the return code, the end of stderr and, under gdb,
the backtrace are recorded.

  hc_mult_2   hc_mult = 2 (the converter accepts it; llama.cpp asserts `hc == 4`)
  all_hca     compress_ratios = [0, 128, 128] (compressed layers, none of them CSA)
  baseline    the fixture's config (runs)

Numerics: the f32 fixture GGUF rewritten with its MXFP4 experts dequantised to F32 (gguf-py),
so every weight is F32; llama.cpp's logits then against transformers' (same weights), with the
K cache f32 and f16: what is left is llama.cpp's own arithmetic.

Usage: /work/v4venv/bin/python reference/v4_gguf_crashes.py
"""

from __future__ import annotations

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
import v4_gguf_fixture as F  # noqa: E402
import v4_fixtures as V  # noqa: E402
import v4_official_fixture as O  # noqa: E402
import gguf  # noqa: E402  (the vendored gguf-py, put on the path by v4_gguf_fixture)

from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

OUT = os.path.join(F.REPO_ROOT, "results", "ds4-gguf")
CASES = {"baseline": {}, "hc_mult_2": {"hc_mult": 2}, "all_hca": {"compress_ratios": [0, 128, 128]}}


def official_model(over, d, seed=1):
    c = {**F.CONFIG, **over}
    cfg = DeepseekV4Config(**c, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float()
    V.randomize(model, cfg, torch.Generator().manual_seed(seed))
    tensors, _ = O.official_tensors(model, cfg)
    saved = F.CONFIG
    F.CONFIG = c
    try:
        F.official_dir(d, tensors)
    finally:
        F.CONFIG = saved


def run_llamacpp(path, ids, gdb):
    with tempfile.TemporaryDirectory() as t:
        idf = os.path.join(t, "ids.json")
        json.dump(ids, open(idf, "w"))
        cmd = [F.LLAMA_PY, os.path.join(HERE, "v4_gguf_llamacpp.py"), path, idf, os.path.join(t, "o.npy")]
        if gdb:
            cmd = ["gdb", "-batch", "-ex", "run", "-ex", "bt 12", "--args"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "LLAMA_CPP_LIB_PATH": F.LLAMA_BIN})
        return r


def crashes():
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in CASES.items():
            d = os.path.join(tmp, name)
            os.makedirs(d)
            official_model(over, d)
            path = os.path.join(tmp, f"{name}.gguf")
            F.convert(d, path, "f16")
            r = run_llamacpp(path, [5, 6, 7, 8], gdb=False)
            rec = {"config_change": over, "returncode": r.returncode,
                   "stderr_tail": r.stderr.strip().splitlines()[-6:], "stdout": r.stdout.strip()}
            if r.returncode != 0 and shutil.which("gdb"):
                g = run_llamacpp(path, [5, 6, 7, 8], gdb=True)
                lines = (g.stdout + g.stderr).splitlines()
                keep = [x for x in lines if x.startswith("#") or "signal" in x or "GGML_ASSERT" in x
                        or "error" in x.lower()]
                rec["gdb"] = keep[:24]
            out[name] = rec
            print(name, r.returncode, rec["stderr_tail"][-2:])
    return out


def all_f32(src, dst):
    """`src` with every MXFP4 tensor dequantised to F32 (metadata and the rest copied)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch="deepseek4")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), vt)
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.MXFP4:
            w.add_tensor(t.name, np.ascontiguousarray(
                gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)))
        else:
            w.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def numerics():
    fx = os.path.join(F.DEFAULT_OUT, "logits-f32.safetensors")
    from safetensors.torch import load_file
    d = load_file(fx)
    ids, tf = d["input_ids"], d["transformers"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "all-f32.gguf")
        all_f32(os.path.join(F.DEFAULT_OUT, "ds4-f32.gguf"), p)
        for kv in ("f32", "f16"):
            lc, _ = F.llamacpp_logits(p, ids, kv)
            out[f"all_f32_weights_kv_{kv}_vs_transformers"] = F.stats(lc, tf)
    for kv, key in (("f16", "llamacpp"), ("f32", "llamacpp_kv32")):
        out[f"mxfp4_experts_kv_{kv}_vs_transformers"] = F.stats(d[key], tf)
    for k, v in out.items():
        print(k, json.dumps(v))
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    n = numerics()
    with open(os.path.join(OUT, "numerics.json"), "w") as fh:
        json.dump(n, fh, indent=1, sort_keys=True)
        fh.write("\n")
    c = crashes()
    with open(os.path.join(OUT, "crashes.json"), "w") as fh:
        json.dump(c, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
