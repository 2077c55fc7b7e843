"""Oracle for `mnemo quantize IN.gguf OUT.gguf --type MIX` (`crates/mnemo/src/io/gguf/quantize.rs`,
`mix.rs`): what llama.cpp's own `llama-quantize` writes for the same F32 models.

Sources are the committed tiny GGUFs: `gguf_arch/{llama,qwen2,qwen3}-*.gguf` (quantised; the F32
input is made from each by `llama-quantize --allow-requantize IN F32`, which dequantises with
ggml's `dequantize_row_*`, so mnemo can rebuild the same F32 file in the test; for llama also
F16 and BF16 inputs made from that F32 by `llama-quantize … F16|BF16`) and the F32
`gguf_deepseek2/{lite,v2}-F32.gguf` as they are (not `deepseek4_gguf/ds4-f32.gguf`: its
experts are MXFP4, which llama-quantize will not requantise). Each F32
model is quantised by `llama-quantize` (1 thread, no imatrix) into every mix of `MIXES`. For
every output file it records the FNV-1a 64 hash of the whole file and, per tensor (in file
order), its name, ggml type name and the FNV-1a 64 hash of its data; and the hash of each
F32 file made here. Written to `crates/mnemo/tests/fixtures/gguf_quantize/llamacpp.json`, read
by `crates/mnemo/tests/gguf_quantize.rs` (which requires identical types, bytes and files).

Dev-time only. Run from the repository root:

    BIN=/work/llama/build2/bin /work/ggufvenv/bin/python reference/gguf_quantize_fixture.py

(`BIN`: llama.cpp's `llama-quantize` built from the source vendored by llama-cpp-python
0.3.36; its `libllama.so` beside it.)
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import gguf

BIN = os.environ.get("BIN", "/work/llama/build2/bin")
FIX = "crates/mnemo/tests/fixtures"
OUT = f"{FIX}/gguf_quantize/llamacpp.json"
MIXES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
# the other mixes, on llama only (fixture size)
MORE_MIXES = ["Q3_K_S", "Q3_K_L", "Q4_K_S", "Q5_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# name: (source file, types to convert it to first (the last one is the input of the mixes),
# mixes). The quantised fixtures are made F32 with --allow-requantize.
SOURCES = {
    "llama": ("gguf_arch/llama-Q4_K_M.gguf", ["F32"], MIXES + MORE_MIXES),
    "qwen2": ("gguf_arch/qwen2-Q4_K_M.gguf", ["F32"], MIXES),
    "qwen3": ("gguf_arch/qwen3-Q5_K_M.gguf", ["F32"], MIXES),
    "deepseek2-lite": ("gguf_deepseek2/lite-F32.gguf", [], MIXES),
    "deepseek2-v2": ("gguf_deepseek2/v2-F32.gguf", [], MIXES),
    "llama-f16": ("gguf_arch/llama-Q4_K_M.gguf", ["F32", "F16"], ["Q4_K_M", "Q8_0"]),
    "llama-bf16": ("gguf_arch/llama-Q4_K_M.gguf", ["F32", "BF16"], ["Q4_K_M", "Q6_K"]),
}

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1


def fnv1a64(b):
    """FNV-1a 64 of bytes, as a 16-digit hex string."""
    h = FNV_OFFSET
    for c in b:
        h = ((h ^ c) * FNV_PRIME) & MASK
    return f"{h:016x}"


def quantize(src, dst, mix, allow_requantize=False):
    cmd = [f"{BIN}/llama-quantize"]
    if allow_requantize:
        cmd.append("--allow-requantize")
    cmd += [src, dst, mix, "1"]
    env = dict(os.environ, LD_LIBRARY_PATH=BIN)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")


def describe(path):
    r = gguf.GGUFReader(path)
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "fnv": fnv1a64(bytes(np.asarray(t.data).tobytes()))}
        for t in r.tensors
    ]
    with open(path, "rb") as f:
        whole = fnv1a64(f.read())
    return {"file_fnv": whole, "bytes": os.path.getsize(path), "tensors": tensors}


def main():
    out = {"mixes": MIXES, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (src, chain, mixes) in SOURCES.items():
            src = os.path.join(FIX, src)
            inp = src
            for i, ty in enumerate(chain):
                nxt = os.path.join(tmp, f"{name}-{ty}.gguf")
                quantize(inp, nxt, ty, allow_requantize=i == 0)
                inp = nxt
            with open(inp, "rb") as f:
                entry = {"source": os.path.relpath(src, FIX), "chain": chain,
                         "input_fnv": fnv1a64(f.read()), "mixes": {}}
            for mix in mixes:
                dst = os.path.join(tmp, f"{name}-{mix}.gguf")
                quantize(inp, dst, mix)
                entry["mixes"][mix] = describe(dst)
                print(name, mix, entry["mixes"][mix]["bytes"], flush=True)
            out["models"][name] = entry
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
