"""YaRN RoPE reference: DeepSeek's `precompute_freqs_cis` and `yarn_get_mscale`.

Copied from DeepSeek's official `inference/model.py` (DeepSeek-V3 / V3.2; V4 uses the same
functions with `compress_rope_theta`), reduced to the arguments they read, and run in PyTorch
float32 exactly as there. Writes `crates/mnemo/tests/fixtures/yarn_freqs.json`, which
`kernels::rope::tests::yarn_matches_deepseek_reference` compares against.

Usage (from the repo root): /work/venv/bin/python reference/yarn.py
"""
import json
import math
import os

import torch


def yarn_get_mscale(scale=1, mscale=1):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def precompute_freqs_cis(dim, seqlen, beta_fast, beta_slow, base, factor, original_seq_len):
    def find_correction_dim(num_rotations, dim, base, max_seq_len):
        return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_seq_len):
        low = math.floor(find_correction_dim(low_rot, dim, base, max_seq_len))
        high = math.ceil(find_correction_dim(high_rot, dim, base, max_seq_len))
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):
        if min == max:
            max += 0.001
        linear_func = (torch.arange(dim, dtype=torch.float32) - min) / (max - min)
        ramp_func = torch.clamp(linear_func, 0, 1)
        return ramp_func

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if seqlen > original_seq_len:
        low, high = find_correction_range(beta_fast, beta_slow, dim, base, original_seq_len)
        smooth = 1 - linear_ramp_factor(low, high, dim // 2)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth

    t = torch.arange(seqlen)
    freqs_t = torch.outer(t, freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs_t), freqs_t)
    return freqs, freqs_cis


CASES = [
    # (dim, base, factor, original, beta_fast, beta_slow, mscale_coef, pos); positions stay
    # small so that the float32 angles of the reference are accurate to ~1e-4
    (64, 10000.0, 4.0, 256, 32.0, 1.0, 1.0, 1000),  # the tiny preset, 4x
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 3000),  # DeepSeek-V3 / V3.2
    (64, 160000.0, 16.0, 65536, 32.0, 1.0, 1.0, 2000),  # V4 compressed layers
    (16, 10000.0, 8.0, 64, 32.0, 1.0, 0.707, 500),  # small dims, another mscale
]

out = []
for dim, base, factor, orig, bf, bs, mc, pos in CASES:
    # seqlen > original, so that YaRN is on (DeepSeek's switch).
    freqs, cis = precompute_freqs_cis(dim, max(pos, orig) + 1, bf, bs, base, factor, orig)
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert not torch.equal(freqs, plain) or factor == 1
    out.append(
        dict(
            dim=dim, base=base, factor=factor, original=orig, beta_fast=bf, beta_slow=bs,
            mscale_coef=mc, mscale=yarn_get_mscale(factor, mc), pos=pos,
            freqs=[float(x) for x in freqs],
            cos_at_pos=[float(x) for x in cis[pos].real],
        )
    )
root = os.path.join(os.path.dirname(__file__), "..", "crates/mnemo/tests/fixtures")
path = os.path.join(root, "yarn_freqs.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", path, [round(c["mscale"], 6) for c in out])
