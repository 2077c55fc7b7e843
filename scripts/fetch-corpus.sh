#!/usr/bin/env bash
# Fetch the real training corpus described in docs/specs/data.md:
#   C1  Debian `rust-src` (the Rust compiler and standard library sources, ~65 MB of .rs)
#   C3  the Debian Python 3.11 standard library (preinstalled, ~11 MB of .py)
# and copy the source files into one directory (default: data/corpus) that `mnemo train
# --data` reads. Files are copied, not linked: mnemo never follows symlinks out of a corpus.
#
# Usage: scripts/fetch-corpus.sh [DEST]      (needs root for apt-get, as on the dev machines)
set -euo pipefail
dest="${1:-data/corpus}"
if ! ls -d /usr/src/rustc-*/ >/dev/null 2>&1; then
    echo "installing Debian rust-src (18 MB download)…" >&2
    apt-get update -qq
    apt-get install -y -qq rust-src >/dev/null
fi
rust_src=$(ls -d /usr/src/rustc-*/ | head -n 1)
py_src=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])' 2>/dev/null || echo /usr/lib/python3.11)
[ -d /usr/lib/python3.11 ] && py_src=/usr/lib/python3.11
dest=$(realpath -m "$dest")
mkdir -p "$dest/rust" "$dest/python"
echo "copying .rs files from $rust_src (library/ and compiler/) …" >&2
( cd "$rust_src" && find library compiler -name '*.rs' -type f -print0 | tar --null -T - -cf - ) | tar -xf - -C "$dest/rust"
echo "copying .py files from $py_src (without site-packages and tests) …" >&2
( cd "$py_src" && find . -name '*.py' -type f -not -path './site-packages/*' -not -path './dist-packages/*' \
    -not -path './test/*' -not -path '*/tests/*' -print0 | tar --null -T - -cf - ) | tar -xf - -C "$dest/python"
echo "corpus in $dest: $(find "$dest" -type f | wc -l) files, $(du -sh "$dest" | cut -f1)" >&2
