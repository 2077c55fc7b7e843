"""Random DeepSeek-V4 configurations: mnemo against transformers 5.23.0 on configs no fixture has.

The committed fixtures (reference/v4_fixtures.py) pin a handful of configurations; issue #19
says mnemo "will also be checked on configs you have not seen". This sweep draws N random
configurations (layer mix of sliding / CSA 4 / HCA, head counts, odd head dims and rope
widths, o_groups splitting heads, window shorter than the sequence, index_topk below the
entry count, hash layers, hc_mult 1-4, Sinkhorn iterations, SwiGLU clamps, YaRN or plain
compress rope, legacy or modern keys), gives every parameter and buffer random values
(`v4_fixtures.randomize`), saves each with `save_pretrained`, and compares transformers' logits
(f32, eager) with `mnemo logits DIR` — the full forward against transformers' full forward,
and one-token cached decoding from the middle of the sequence (`--decode-from`, after a
cached prefill of the first half) against both transformers' full forward and its own cached
decoding (one token a step from the start).

Per configuration: the largest |Δlogit| over all positions relative to the largest |logit|,
and the routing / indexer / clamp margins of the draw (v4_fixtures' probe; parameter seeds
are searched, at most 20 per configuration, for margins above v4_fixtures' bars). A
configuration without margins may flip a discrete choice in float32 and is reported, not
failed; for those, transformers' own float32 logits are also compared with its float64 ones
(the same parameters): where even they differ beyond the tolerance, the configuration is
ill-conditioned, not mnemo wrong. Writes results/v4-config-sweep/sweep.json and prints a table.

Usage (from the repository root, after `cargo build --release`; a venv with torch and
transformers==5.23.0, see reference/README.md):
    /path/to/venv/bin/python reference/v4_config_sweep.py [N=24] [SEED=1]
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import v4_fixtures as fx  # noqa: E402  (pins transformers 5.23.0)

REPO = fx.REPO_ROOT
MNEMO = os.path.join(REPO, "target", "release", "mnemo")
TOL = 1e-4  # relative, as the committed fixtures' tests


def draw(r: random.Random):
    """One random configuration (a v4_fixtures spec)."""
    heads = r.randint(1, 6)
    hd = r.choice([8, 12, 16, 24, 32])
    rope = r.choice([x for x in (2, 4, 6, 8, 12, 16) if x <= hd])
    groups = r.choice([g for g in (1, 2, 3, 4, 6) if heads * hd % g == 0])
    layers = r.randint(2, 4)
    kinds = [r.choice(["sliding_attention", "compressed_sparse_attention",
                       "heavily_compressed_attention"]) for _ in range(layers)]
    hca = r.choice([8, 16, 32])
    n_exp = r.randint(2, 8)
    hash_layers = r.randint(0, min(2, layers))
    T = r.randint(12, 56)
    cfg = dict(
        vocab_size=r.choice([64, 96, 128, 200]), hidden_size=r.choice([16, 24, 32, 48]),
        moe_intermediate_size=r.choice([8, 12, 16, 24]), num_hidden_layers=layers,
        num_attention_heads=heads, head_dim=hd, q_lora_rank=r.choice([8, 16, 24, 40]),
        o_lora_rank=r.choice([4, 8, 12]), o_groups=groups, n_routed_experts=n_exp,
        num_experts_per_tok=r.randint(1, min(3, n_exp)), sliding_window=r.randint(2, 12),
        index_n_heads=r.randint(1, 8), index_head_dim=r.choice([x for x in (8, 16, 24, 32)
                                                                if x >= rope]),
        index_topk=r.randint(1, 6), hc_mult=r.randint(1, 4),
        hc_sinkhorn_iters=r.choice([1, 3, 5, 20]), routed_scaling_factor=r.choice([1.0, 1.5, 2.5]),
        swiglu_limit=r.choice([0.5, 1.0, 3.0, 10.0]), rms_norm_eps=r.choice([1e-6, 1e-5]),
    )
    if r.random() < 0.5:  # legacy official keys
        cfg.update(qk_rope_head_dim=rope, num_hash_layers=hash_layers,
                   compress_ratios=[{"sliding_attention": 0, "compressed_sparse_attention": 4,
                                     "heavily_compressed_attention": 128}[k] for k in kinds],
                   compress_rate_hca=hca)
        if r.random() < 0.5:
            cfg["rope_scaling"] = {"type": "yarn", "factor": r.choice([4, 16]),
                                   "original_max_position_embeddings": 4096,
                                   "beta_fast": 32, "beta_slow": 1}
    else:  # modern fields
        cfg.update(partial_rotary_factor=rope / hd, layer_types=kinds,
                   compress_rates={"compressed_sparse_attention": 4,
                                   "heavily_compressed_attention": hca},
                   mlp_layer_types=["hash_moe"] * hash_layers + ["moe"] * (layers - hash_layers),
                   rope_theta=r.choice([10000.0, 50000.0]),
                   compress_rope_theta=r.choice([40000.0, 160000.0]))
    return dict(name="sweep", T=T, seed=r.randint(1, 10**6), config=cfg)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_mnemo(d, ids_path, out, extra):
    p = subprocess.run([MNEMO, "logits", d, "--ids-file", ids_path, "--out", out, *extra],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"
    with safe_open(out, "pt") as f:
        return f.get_tensor("logits"), None


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    r = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    rows = []
    for i in range(n):
        spec = draw(r)
        try:  # seeds searched for float32 margins as v4_fixtures does (at most 20 tries)
            for k in range(20):
                ok, cfg, model, ids, logits, probe, info = fx.attempt(spec, spec["seed"])
                probe.close()
                if ok:
                    break
                spec["seed"] += 1000
        except Exception as e:  # a configuration transformers itself refuses
            rows.append(dict(i=i, config=spec["config"], T=spec["T"], refused=repr(e)[:200]))
            print(f"{i:3d} transformers refused: {e!r}"[:160])
            continue
        # transformers' own cached path, one token a step from the start (with ties at the
        # top-k boundary it may pick other entries than its full forward: its row then holds
        # only the entries cached so far). mnemo's cached drivers break ties this way
        # whatever the chunking (`Model::v4_topk`).
        half = spec["T"] // 2
        with torch.no_grad():
            out = model(ids[None, :1], past_key_values=fx.DynamicCache(config=cfg),
                        use_cache=True)
            parts = [out.logits[0]]
            for t in range(1, spec["T"]):
                out = model(ids[None, t:t + 1], past_key_values=out.past_key_values,
                            use_cache=True)
                parts.append(out.logits[0])
        tf_cached = torch.cat(parts)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            if not ok:  # is the configuration ill-conditioned? transformers f32 vs f64
                with torch.no_grad():
                    l64 = model.double()(ids[None], use_cache=False).logits[0]
                tf_f64 = rel_err(logits.double(), l64)
            ids_path = os.path.join(d, "ids.json")
            json.dump(ids.tolist(), open(ids_path, "w"))
            full, err_full = run_mnemo(d, ids_path, os.path.join(d, "full.safetensors"), [])
            dec, err_dec = run_mnemo(d, ids_path, os.path.join(d, "dec.safetensors"),
                                     ["--decode-from", str(half)])
        row = dict(i=i, config=spec["config"], T=spec["T"], seed=spec["seed"], margins_ok=ok,
                   moe_gap=info["moe_gap"], index_gap=info["index_gap"],
                   clamp_dist=info["clamp_dist"])
        if not ok:
            row["transformers_f32_vs_f64"] = tf_f64
        if full is None or dec is None:
            row["mnemo_error"] = err_full or err_dec
        else:
            row["full_rel"] = rel_err(full, logits)
            row["decode_rel"] = rel_err(dec, logits)
            row["decode_vs_transformers_cached_rel"] = rel_err(dec, tf_cached)
            row["transformers_cached_vs_full_rel"] = rel_err(tf_cached, logits)
            row["argmax_agree"] = (full.argmax(-1) == logits.argmax(-1)).float().mean().item()
        rows.append(row)
        c = spec["config"]
        kinds = c.get("layer_types") or c.get("compress_ratios")
        print(f"{i:3d} T={spec['T']:2d} heads={c['num_attention_heads']}x{c['head_dim']} "
              f"hc={c['hc_mult']} groups={c['o_groups']} layers={kinds} margins_ok={ok} "
              + (f"full {row['full_rel']:.2e} decode {row['decode_rel']:.2e} "
                 f"decode vs transformers cached {row['decode_vs_transformers_cached_rel']:.2e}"
                 if "full_rel" in row else f"mnemo error: {row['mnemo_error']}")
              + (f" (transformers f32 vs f64: {tf_f64:.2e})" if not ok else ""))
    ran = [x for x in rows if "full_rel" in x]
    good = [x for x in ran if x["margins_ok"]]
    summary = dict(
        drawn=len(rows), refused_by_transformers=sum("refused" in x for x in rows),
        mnemo_errors=sum("mnemo_error" in x for x in rows), compared=len(ran),
        with_margins=len(good),
        with_margins_within_tol=sum(x["full_rel"] <= TOL and x["decode_rel"] <= TOL for x in good),
        decode_vs_transformers_cached_within_tol=sum(
            x["decode_vs_transformers_cached_rel"] <= TOL for x in ran),
        full_within_tol=sum(x["full_rel"] <= TOL for x in ran),
        worst_with_margins=max((max(x["full_rel"], x["decode_rel"]) for x in good), default=None),
        without_margins_where_transformers_f32_vs_f64_also_differs=sum(
            x["transformers_f32_vs_f64"] > TOL for x in ran if not x["margins_ok"]),
        worst_any=max((max(x["full_rel"], x["decode_rel"]) for x in ran), default=None),
        tolerance=TOL, transformers=fx.transformers.__version__, torch=torch.__version__)
    out = os.path.join(REPO, "results", "v4-config-sweep", "sweep.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(dict(summary=summary, rows=rows), open(out, "w"), indent=1)
    print(json.dumps(summary, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [x["i"] for x in ran]
    ax.semilogy(xs, [x["full_rel"] for x in ran], "o", label="full forward vs transformers full")
    ax.semilogy(xs, [x["decode_vs_transformers_cached_rel"] for x in ran], "x",
                label="cached decoding vs transformers cached")
    ax.semilogy(xs, [x["decode_rel"] for x in ran], ".", alpha=0.5,
                label="cached decoding vs transformers full (ties differ)")
    ax.axhline(TOL, color="k", lw=0.8, ls="--", label="tolerance")
    ax.set_xlabel("random configuration")
    ax.set_ylabel("max |Δlogit| / max |logit|")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.replace(".json", ".png"), dpi=110)


if __name__ == "__main__":
    main()
