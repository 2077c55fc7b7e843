"""Oracle for mnemo's GGUF block dequantisation (`crates/mnemo/src/kernels/kquant.rs`).

For each ggml type below, draws a few blocks of random but valid bytes (f16/f32 block
scales finite and moderate, everything else uniformly random, sub-block scale bytes
included), dequantises them with the `gguf` Python package's numpy reference
(`gguf.quants.dequantize`, which mirrors ggml's `dequantize_row_*`), and writes raw bytes
and expected f32 values to `crates/mnemo/tests/fixtures/kquant/blocks.safetensors`
(read by `crates/mnemo/tests/kquant_fixtures.rs`, which requires bitwise equality).

`Q8_K` has no dequantiser in `gguf.quants` (llama.cpp never stores it in model files); its
expected values are computed here as `d * q` in float32, ggml's `dequantize_row_q8_K`; `I32`
(not a quantisation) as the int32 values rounded to float32. `MXFP4` needs a gguf-py that
knows it: the one vendored in llama-cpp-python 0.3.36 (PYTHONPATH=…/llama.cpp/gguf-py).

Pinned: gguf==0.19.0 (numpy 2.4.6). Run from the repository root:

    python3 -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install -r reference/requirements-kquant.txt
    /tmp/ggufvenv/bin/python reference/kquant_fixture.py

Output is deterministic (seeded numpy Generator, sorted header keys).
"""

import json
import os
import struct

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = "crates/mnemo/tests/fixtures/kquant/blocks.safetensors"

# type: (number of blocks, byte offsets of f16 scales within a block)
TYPES = {
    T.Q5_0: (8, [0]),
    T.Q5_1: (8, [0, 2]),
    T.Q2_K: (4, [80, 82]),
    T.Q3_K: (4, [108]),
    T.Q4_K: (4, [0, 2]),
    T.Q5_K: (4, [0, 2]),
    T.Q6_K: (4, [208]),
    T.Q8_K: (4, []),  # f32 scale at 0, set below
    T.IQ4_NL: (8, [0]),
    T.BF16: (64, []),  # values set below
    T.MXFP4: (8, []),  # E8M0 byte set below
    T.I32: (16, []),  # hash-routing tables of deepseek4 GGUFs: int32 as f32
}


def f16_scales(rng, n):
    """Finite f16 values of both signs, magnitudes 2^-12 .. 2^2."""
    mag = np.exp2(rng.uniform(-12.0, 2.0, n))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return (sign * mag).astype(np.float16)


def blocks_for(rng, qtype, n_blocks, scale_offsets):
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in scale_offsets:
        raw[:, off : off + 2] = f16_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.Q8_K:
        d = (rng.standard_normal(n_blocks) * 0.01).astype(np.float32)
        raw[:, 0:4] = d.view(np.uint8).reshape(n_blocks, 4)
    if qtype == T.MXFP4:
        raw[:, 0] = rng.integers(100, 150, size=n_blocks, dtype=np.uint8)  # finite scales
        raw[:2, 0] = [0, 1]  # the subnormal halved scales 2^-128, 2^-127
    if qtype == T.BF16:
        vals = (rng.standard_normal(n_blocks) * np.exp2(rng.uniform(-20, 20, n_blocks))).astype(np.float32)
        vals[:4] = [0.0, -0.0, 1.0, -3.5]
        raw = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def expected(qtype, raw):
    if qtype == T.I32:
        return raw.reshape(-1).copy().view("<i4").astype(np.float32)
    if qtype == T.Q8_K:
        d = raw[:, 0:4].copy().view(np.float32)
        q = raw[:, 4:260].copy().view(np.int8).astype(np.float32)
        return (d * q).astype(np.float32).reshape(-1)
    return np.asarray(gguf.quants.dequantize(raw.reshape(-1), qtype), dtype=np.float32).reshape(-1)


def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer (tensors: name -> (dtype string, shape, bytes))."""
    header, offset, data = {"__metadata__": metadata}, 0, b""
    for name in sorted(tensors):
        dtype, shape, buf = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(buf)]}
        offset += len(buf)
        data += buf
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def main():
    rng = np.random.default_rng(20261207)
    tensors, types = {}, {}
    for qtype, (n_blocks, offs) in TYPES.items():
        raw = blocks_for(rng, qtype, n_blocks, offs)
        want = expected(qtype, raw)
        block_size, _ = GGML_QUANT_SIZES[qtype]
        assert want.shape == (n_blocks * block_size,), (qtype.name, want.shape)
        assert np.isfinite(want).all(), qtype.name
        tensors[f"{qtype.name}.bytes"] = ("U8", raw.shape, raw.tobytes())
        tensors[f"{qtype.name}.expected"] = ("F32", want.shape, want.astype("<f4").tobytes())
        types[qtype.name] = int(qtype)
    meta = {"types": json.dumps(types, sort_keys=True), "gguf_version": "0.19.0 (MXFP4: gguf-py vendored in llama-cpp-python 0.3.36)"}
    write_safetensors(OUT, tensors, meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes): {', '.join(types)}")


if __name__ == "__main__":
    main()
