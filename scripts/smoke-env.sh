# shellcheck shell=bash
# Sourced (never run) by the scripts in scripts/ when MNEMO_SMOKE=1: their cheap mode, which CI
# runs (crates/mnemo-cli/tests/scripts_smoke.rs; docs/scripts.md lists what each script needs).
# Sets
#   smoke_dir  where the smoke run writes everything: $MNEMO_SMOKE_DIR, or a fresh temporary
#              directory (kept, its path printed) — never results/ or runs/;
#   smoke_bin  the mnemo binary: $MNEMO_BIN, or target/release/mnemo (built when missing);
#   smoke_data a small corpus that needs no download (this repository's mnemo-pack sources);
# and exports MNEMO_CACHE (token cache inside smoke_dir) and PYTHON (default python3: the
# summaries need only the standard library; plots are skipped without matplotlib).
smoke_dir=${MNEMO_SMOKE_DIR:-$(mktemp -d -t mnemo-smoke.XXXXXX)}
mkdir -p "$smoke_dir"
echo "MNEMO_SMOKE=1: cheap mode, outputs in $smoke_dir" >&2
smoke_bin=${MNEMO_BIN:-target/release/mnemo}
if [ -z "${MNEMO_BIN:-}" ] && [ ! -x "$smoke_bin" ]; then
  cargo build --release -q -p mnemo-cli
fi
smoke_data=crates/mnemo-pack/src
export MNEMO_CACHE=${MNEMO_CACHE:-$smoke_dir/token-cache}
export PYTHON=${PYTHON:-python3}
# smoke_run DIR [TRAIN ARGS...]: a 2-step `tiny` run on smoke_data (a stand-in for
# runs/tiny-real, the pretrained run several experiments start from), unless DIR has one.
smoke_run() {
  local dir=$1; shift
  if [ ! -f "$dir/checkpoint/model.safetensors" ]; then
    "$smoke_bin" train --preset tiny --data "$smoke_data" --steps 2 --seq-len 64 --batch-size 2 \
      --out "$dir" --quiet "$@" >&2
  fi
}
