#!/usr/bin/env bash
# Run the numerics tests on emulated CPUs without AVX-512 (Haswell: AVX2/FMA; Nehalem: SSE4
# only), proving that the run-time-dispatched non-AVX-512 GEMM paths give the same answers.
# Needs qemu-user (`apt-get install -y qemu-user`). Emulation is slow: ~4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found: apt-get install -y qemu-user" >&2; exit 2; }
bins=$(cargo test --release --no-run --message-format=json -p mnemo 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
for cpu in Haswell Nehalem; do
  for b in $bins; do
    echo "== $cpu: $(basename "$b")"
    qemu-x86_64 -cpu "$cpu" "$b" --test-threads 2 2>&1 | grep -E "^test result|FAILED|panicked" | grep -v "TCG doesn't support"
  done
done
