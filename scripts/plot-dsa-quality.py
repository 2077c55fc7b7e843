#!/usr/bin/env python3
"""Plot and summarise scripts/dsa-quality.sh: val loss of the dense and the sparse (DSA) arm
against the step, and the indexer recall / KL over training.
Usage: plot-dsa-quality.py RESULTS_DIR STEPS WARM SEQ TOPK"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

r, steps, warm, seq, topk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


def rows(name):
    return [json.loads(l) for l in open(f"{r}/{name}_metrics.jsonl") if l.strip()]


dense, sparse = rows("dense"), rows("sparse")
dv = {x["step"]: x["val_loss"] for x in dense if "val_loss" in x}
sv = {x["step"]: x for x in sparse if "val_loss" in x}
train_recall = [(x["step"], x["dsa_recall"], x["dsa_stage"]) for x in sparse if "dsa_recall" in x]
train_kl = [(x["step"], x["dsa_kl"]) for x in sparse if "dsa_kl" in x]
summary = {
    "context": seq,
    "top_k": topk,
    "steps": steps,
    "warmup_steps": warm,
    "sparse_steps": steps - warm,
    "val_loss_dense": dv.get(steps),
    "val_loss_sparse": sv[steps]["val_loss"] if steps in sv else None,
    "val_bpb_dense": next((x["val_bpb"] for x in dense if x.get("step") == steps and "val_bpb" in x), None),
    "val_bpb_sparse": sv[steps]["val_bpb"] if steps in sv else None,
    "val_recall_end_of_warmup": sv[warm]["val_dsa_recall"] if warm in sv else None,
    "val_recall_final": sv[steps]["val_dsa_recall"] if steps in sv else None,
    "val_curve": [{"step": s, "dense": dv.get(s), "sparse": sv[s]["val_loss"] if s in sv else None,
                   "val_recall": sv[s].get("val_dsa_recall") if s in sv else None,
                   "val_kl": sv[s].get("val_dsa_kl") if s in sv else None} for s in sorted(set(dv) | set(sv))],
}
if summary["val_loss_dense"] is not None and summary["val_loss_sparse"] is not None:
    summary["sparse_minus_dense_nats"] = summary["val_loss_sparse"] - summary["val_loss_dense"]
json.dump(summary, open(f"{r}/summary.json", "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "val_curve"}, indent=1))

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
a.plot(sorted(dv), [dv[s] for s in sorted(dv)], marker="o", label="dense attention")
ss = sorted(s for s in sv if s >= warm)
a.plot(ss, [sv[s]["val_loss"] for s in ss], marker="s", label=f"DSA top-{topk} (after {warm} warm-up steps)")
a.axvline(warm, color="gray", ls=":", lw=1)
a.set_xlabel("step"); a.set_ylabel("val loss (nats/token)"); a.grid(alpha=.3); a.legend()
a.set_title(f"tiny model continued at {seq} tokens: dense vs sparse")
b.plot([x[0] for x in train_recall], [x[1] for x in train_recall], ".", alpha=.6, label="recall, training batch")
vs = sorted(s for s in sv if sv[s].get("val_dsa_recall") is not None)
b.plot(vs, [sv[s]["val_dsa_recall"] for s in vs], "o-", label="recall, validation")
b.axvline(warm, color="gray", ls=":", lw=1)
b.set_xlabel("step"); b.set_ylabel(f"dense attention mass in top-{topk}"); b.set_ylim(0, 1)
b2 = b.twinx(); b2.plot([x[0] for x in train_kl], [x[1] for x in train_kl], color="tab:red", alpha=.4, lw=1, label="indexer KL")
b2.set_ylabel("indexer KL", color="tab:red")
b.grid(alpha=.3); b.legend(loc="lower right"); b.set_title("lightning indexer over training")
fig.tight_layout(); fig.savefig(f"{r}/quality.png", dpi=110)
