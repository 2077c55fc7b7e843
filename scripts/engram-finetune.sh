#!/usr/bin/env bash
# Memory-only fine-tuning vs full fine-tuning of an Engram model on a held-out codebase.
#   BASE: an Engram run trained on the corpus (default: trains tiny-engram, 300 steps, on data/corpus)
#   NEW:  a codebase not in the corpus (default: the `syn` crate from ~/.cargo/registry), val split 20 %
# Same steps, seed, lr and data order for both; writes results/engram-finetune/{finetune.json,finetune.png}.
# MNEMO_SMOKE=1: 2-step BASE on crates/mnemo-pack/src, NEW = crates/mnemo/src, 2 steps per
# run, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MNEMO=${MNEMO:-target/release/mnemo}
WORK=${WORK:-runs/exp/engramft}
BASE=${BASE:-$WORK/base}
NEW=${NEW:-$WORK/newcode}
STEPS=${STEPS:-100}
LR=${LR:-1e-3}
VALF=${VALF:-0.2}
OUT=results/engram-finetune
CORPUS=data/corpus; TOK=runs/tiny-real/tokenizer.json; BASE_STEPS=300; NEW_SRC=; BASE_ARGS=
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # BASE: 2 steps on crates/mnemo-pack/src (the tokenizer of a 2-step stand-in for tiny-real);
  # NEW: crates/mnemo/src instead of `syn`; 2 fine-tuning steps.
  MNEMO=$smoke_bin; WORK=$smoke_dir/work; BASE=$WORK/base; NEW=$WORK/newcode; STEPS=2
  OUT=$smoke_dir/engram-finetune; CORPUS=$smoke_data; BASE_STEPS=2; NEW_SRC=$PWD/crates/mnemo/src
  BASE_ARGS="--batch-size 2 --seq-len 128"
  smoke_run "$smoke_dir/init"; TOK=$smoke_dir/init/tokenizer.json
fi
mkdir -p "$OUT" "$WORK"
if [ ! -d "$BASE/checkpoint" ]; then
  $MNEMO train --preset tiny-engram --data "$CORPUS" --tokenizer "$TOK" \
    --steps "$BASE_STEPS" --out "$BASE" --quiet ${BASE_ARGS:+$BASE_ARGS}
fi
if [ ! -d "$NEW" ]; then
  SRC=${NEW_SRC:-$(ls -d ~/.cargo/registry/src/*/syn-2.* | head -1)}
  mkdir -p "$NEW" && (cd "$SRC" && find . -name '*.rs' -exec cp --parents {} "$NEW" \;)
fi
COMMON=(--data "$NEW" --steps "$STEPS" --lr "$LR" --set train.warmup_steps=10 --set data.val_fraction=$VALF
        --set train.eval_interval=25 --set train.save_interval=1000 --quiet)
[ "$smoke" != 1 ] || COMMON+=(--batch-size 2 --seq-len 128)
ev() { local run=$1 data=$2; shift 2; $MNEMO eval "$run" --data "$data" --val-fraction "$VALF" --batches 8 --json - "$@"; }
# tr NAME ARGS...: one fine-tuning run (kept and reused with REUSE=1); wall seconds in NAME.wall.
tr() {
  local name=$1; shift
  if [ "${REUSE:-0}" = 1 ] && [ -f "$WORK/$name.wall" ]; then return; fi
  rm -rf "$WORK/$name"
  local t0; t0=$(date +%s.%N)
  $MNEMO train --init "$BASE" --out "$WORK/$name" "${COMMON[@]}" "$@" 2> "$WORK/$name.log"
  awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.3f\n", a - b }' > "$WORK/$name.wall"
}
tr ft-mem --train-only engram
tr ft-memgates --train-only engram+gates
tr ft-full
# The delta alone (base + delta) must reproduce the fine-tuned run.
rm -rf "$WORK/ft-delta-only"; mkdir -p "$WORK/ft-delta-only"
cp "$WORK/ft-mem/engram_delta.safetensors" "$WORK/ft-delta-only/"
before=$(ev "$BASE" "$NEW")
mem=$(ev "$WORK/ft-mem" "$NEW"); memg=$(ev "$WORK/ft-memgates" "$NEW"); full=$(ev "$WORK/ft-full" "$NEW")
# A delta-only directory has no training state, so eval uses its default windows (256 tokens, 8
# rows): compare it with the fine-tuned checkpoint evaluated the same way (state.json removed).
rm -rf "$WORK/ft-mem-nostate"; cp -r "$WORK/ft-mem/checkpoint" "$WORK/ft-mem-nostate"; rm "$WORK/ft-mem-nostate/state.json"
donly=$(ev "$WORK/ft-delta-only" "$NEW"); dmem=$(ev "$WORK/ft-mem-nostate" "$NEW")
# The base on its own corpus, with Engram off (ablation at inference).
base_corpus=$(VALF=0.05 ev "$BASE" "$CORPUS"); base_off=$(VALF=0.05 ev "$BASE" "$CORPUS" --no-engram)
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", a + b }'; }
t0=0; t1=$(cat "$WORK/ft-mem.wall"); t2=$(add "$t1" "$(cat "$WORK/ft-memgates.wall")")
t3=$(add "$t2" "$(cat "$WORK/ft-full.wall")")
${PYTHON:-python3} - "$OUT" "$WORK" "$before" "$mem" "$memg" "$full" "$donly" "$base_corpus" "$base_off" \
  "$t0" "$t1" "$t2" "$t3" "$STEPS" "$dmem" <<'PY'
import json, sys, os, glob
out, work = sys.argv[1], sys.argv[2]
before, mem, memg, full, donly, bc, boff = (json.loads(x) for x in sys.argv[3:10])
t0, t1, t2, t3 = map(float, sys.argv[10:14]); steps = int(sys.argv[14]); dmem = json.loads(sys.argv[15])
def size(p): return sum(os.path.getsize(f) for f in glob.glob(p))
def step_ms(run):
    xs = [json.loads(l)["step_ms"] for l in open(f"{work}/{run}/timing.jsonl")]
    xs = sorted(xs[1:] or xs); return xs[len(xs)//2]
def curve(run):
    return [(j["step"], j["val_loss"]) for j in map(json.loads, open(f"{work}/{run}/metrics.jsonl")) if "val_loss" in j]
base_ckpt = f"{work}/base/checkpoint"
res = {
  "base_run": f"{work}/base", "new_codebase": f"{work}/newcode", "steps": steps,
  "val_loss_new_before": before["val_loss"],
  "memory_only": {"val_loss": mem["val_loss"], "val_bpb": mem["val_bpb"], "wall_s": t1 - t0, "step_ms_median": step_ms("ft-mem"),
                  "delta_bytes": os.path.getsize(f"{work}/ft-mem/engram_delta.safetensors"), "curve": curve("ft-mem")},
  "memory_and_gates": {"val_loss": memg["val_loss"], "val_bpb": memg["val_bpb"], "wall_s": t2 - t1, "step_ms_median": step_ms("ft-memgates"),
                  "delta_bytes": os.path.getsize(f"{work}/ft-memgates/engram_delta.safetensors"), "curve": curve("ft-memgates")},
  "full": {"val_loss": full["val_loss"], "val_bpb": full["val_bpb"], "wall_s": t3 - t2, "step_ms_median": step_ms("ft-full"),
           "changed_bytes": size(f"{work}/ft-full/checkpoint/model.safetensors") + size(f"{work}/ft-full/checkpoint/engram_table.*.f32"), "curve": curve("ft-full")},
  "full_table_bytes": size(f"{base_ckpt}/engram_table.*.f32"),
  "model_bytes": size(f"{base_ckpt}/model.safetensors"),
  "delta_only_val_loss": donly["val_loss"],
  "finetuned_same_windows_val_loss": dmem["val_loss"],
  "delta_only_equals_finetuned": donly["val_loss"] == dmem["val_loss"],
  "ablation_on_corpus": {"val_loss_engram_on": bc["val_loss"], "val_loss_engram_off": boff["val_loss"],
                         "delta": boff["val_loss"] - bc["val_loss"]},
}
json.dump(res, open(f"{out}/finetune.json", "w"), indent=1)
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib missing: no finetune.png (finetune.json written)", file=sys.stderr)
def plot():
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for k, lab in [("memory_only", "Engram tables only"), ("memory_and_gates", "tables + gates"), ("full", "full fine-tuning")]:
        c = [(0, before["val_loss"])] + res[k]["curve"]
        ax[0].plot([x for x, _ in c], [y for _, y in c], marker="o", label=f"{lab} ({res[k]['step_ms_median']:.0f} ms/step)")
    ax[0].set_xlabel("fine-tuning step"); ax[0].set_ylabel("val loss on held-out codebase (nats/token)"); ax[0].legend(); ax[0].grid(alpha=.3)
    names = ["tables only\n(delta)", "tables+gates\n(delta)", "full\n(weights+tables)"]
    vals = [res["memory_only"]["delta_bytes"], res["memory_and_gates"]["delta_bytes"], res["full"]["changed_bytes"]]
    ax[1].bar(names, [v / 1e6 for v in vals]); ax[1].set_ylabel("bytes to ship (MB)")
    for i, v in enumerate(vals): ax[1].text(i, v / 1e6, f"{v/1e6:.2f} MB", ha="center", va="bottom")
    fig.suptitle("Memory-only fine-tuning (tiny-engram, held-out crate `syn`)"); fig.tight_layout()
    fig.savefig(f"{out}/finetune.png", dpi=110)
if plt:
    plot()
print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
for k in ["memory_only", "memory_and_gates", "full", "ablation_on_corpus"]:
    print(k, {a: b for a, b in res[k].items() if a != "curve"})
PY
