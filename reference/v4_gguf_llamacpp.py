"""llama.cpp's logits at every position for a token sequence (run by v4_gguf_fixture.py).

Runs in the llama-cpp-python venv (not the torch one):
    LLAMA_CPP_LIB_PATH=/work/llama/build/bin /work/llama/venv/bin/python \
        reference/v4_gguf_llamacpp.py MODEL.gguf IDS.json OUT.npy [--kv f16|f32] [--flash on|off]

One `eval` of the whole sequence (n_batch = n_ubatch = its length, or `--ubatch` tokens a call), n_threads = 1,
logits_all; `--kv` is the K-cache type (llama.cpp's default f16; the DeepSeek-V4 caches keep
K only), `--flash` flash attention (default off). Prints llama-cpp-python's version.

Weight repacking (`use_extra_bufts`, llama.cpp's `--no-repack`) is turned off: the shared build
(GGML_AVX_VNNI=ON) runs the VEX `vpdpbusd` of AVX-VNNI in its repacked MXFP4 GEMV
(`ggml_gemv_mxfp4_8x8_q8_0`), which this CPU (AVX512-VNNI only, no `avx_vnni`) lacks: SIGILL.
The plain kernels quantise the activations to Q8_0 for MXFP4 weights just the same.
"""
import argparse
import json

import llama_cpp
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("ids")
ap.add_argument("out")
ap.add_argument("--kv", default="f16", choices=["f16", "f32"])
ap.add_argument("--flash", default="off", choices=["on", "off"])
ap.add_argument("--ubatch", type=int, default=0, help="tokens per decode call (0: all at once)")
a = ap.parse_args()
_default_params = llama_cpp.llama_cpp.llama_model_default_params


def _no_repack():
    p = _default_params()
    p.use_extra_bufts = False
    return p


llama_cpp.llama_cpp.llama_model_default_params = _no_repack
ids = json.load(open(a.ids))
kv = {"f16": 1, "f32": 0}[a.kv]
llm = llama_cpp.Llama(
    model_path=a.gguf, n_ctx=max(256, len(ids)), n_batch=a.ubatch or len(ids),
    n_ubatch=a.ubatch or len(ids),
    n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, type_k=kv, type_v=kv,
    flash_attn=a.flash == "on",
)
llm.eval(ids)
logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
np.save(a.out, logits)
print(f"llama-cpp-python {llama_cpp.__version__}: {a.gguf} kv={a.kv} flash={a.flash} "
      f"ubatch={a.ubatch or len(ids)} logits {logits.shape}")
