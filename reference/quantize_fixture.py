"""Oracle for mnemo's GGUF quantisers (`crates/mnemo/src/kernels/quant_{b32,kq,fit}.rs`):
the bytes that ggml itself writes for the same f32 rows.

Calls `ggml_quantize_chunk` (ggml's entry point for model quantisation, what
`llama-quantize` runs per tensor) in llama.cpp's `libggml-base.so` through ctypes, without an
importance matrix, so ggml runs its deterministic reference quantisers
(`quantize_row_*_ref`). The rows mix the cases the algorithms branch on: Gaussian rows of
different scales, heavy-tailed (Student-t) rows, rows with an offset (positive minimum), a
row with an all-zero super-block and a constant block, tiny values (subnormal f16 scales)
and large ones. Written to `crates/mnemo/tests/fixtures/quantize/rows.safetensors`:
`x` (f32 `[rows, 512]`) and `{TYPE}.bytes` (u8, ggml's output for all rows), read by
`crates/mnemo/tests/quantize_fixtures.rs`, which requires mnemo's bytes to be identical.

Dev-time only (CI reads the committed fixture). numpy from any venv; run from the repo root:

    LIB=/work/llama/build2/bin/libggml-base.so /work/ggufvenv/bin/python reference/quantize_fixture.py

(`LIB`: a libggml-base.so of the llama.cpp vendored by llama-cpp-python 0.3.36.)
Output is deterministic (seeded numpy Generator, sorted header keys).
"""

import ctypes
import json
import os
import struct

import numpy as np

LIB = os.environ.get("LIB", "/work/llama/build2/bin/libggml-base.so")
OUT = "crates/mnemo/tests/fixtures/quantize/rows.safetensors"
COLS = 512

# ggml type ids and bytes per block / values per block
TYPES = {
    "F16": (1, 2, 1),
    "BF16": (30, 2, 1),
    "Q4_0": (2, 18, 32),
    "Q4_1": (3, 20, 32),
    "Q5_0": (6, 22, 32),
    "Q5_1": (7, 24, 32),
    "Q8_0": (8, 34, 32),
    "Q2_K": (10, 84, 256),
    "Q3_K": (11, 110, 256),
    "Q4_K": (12, 144, 256),
    "Q5_K": (13, 176, 256),
    "Q6_K": (14, 210, 256),
}


def rows(rng):
    r = []
    for s in [1.0, 0.02, 3e-3]:
        r.append(rng.standard_normal(COLS) * s)
    r.append(rng.standard_t(3, COLS) * 0.05)  # heavy tails: one large value per block
    r.append(rng.standard_normal(COLS) * 0.01 + 0.03)  # positive minimum
    z = rng.standard_normal(COLS) * 0.1
    z[:256] = 0.0  # an all-zero super-block
    z[256:288] = 0.25  # a constant block
    r.append(z)
    r.append(rng.standard_normal(COLS) * 1e-6)  # f16 scales go subnormal
    r.append(rng.uniform(-40.0, 40.0, COLS))  # large values
    q = np.round(rng.standard_normal(COLS) * 4) * 0.125  # values on a grid: ties in rounding
    r.append(q)
    return np.stack(r).astype(np.float32)


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
    lib = ctypes.CDLL(LIB)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(rows(np.random.default_rng(20261208)))
    n_rows = x.shape[0]
    tensors = {"x": ("F32", x.shape, x.astype("<f4").tobytes())}
    types = {}
    for name, (ty, bb, be) in TYPES.items():
        size = n_rows * COLS // be * bb
        dst = np.zeros(size, dtype=np.uint8)
        got = f(ty, x.ctypes.data, dst.ctypes.data, 0, n_rows, COLS, None)
        assert got == size, (name, got, size)
        tensors[f"{name}.bytes"] = ("U8", (n_rows, size // n_rows), dst.tobytes())
        types[name] = ty
    write_safetensors(OUT, tensors, {"types": json.dumps(types, sort_keys=True),
                                     "ggml": "libggml-base of llama.cpp vendored by llama-cpp-python 0.3.36"})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes): {', '.join(types)}")


if __name__ == "__main__":
    main()
