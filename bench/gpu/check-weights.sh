#!/usr/bin/env bash
# The weights service on a real GPU (no containerd, no CRIU): bench/gpu/weights-check-worker.py loads
# seeded bf16 safetensors files (GIB, default 1) into a WeightsRegion and releases them; thaw's loader
# (dist/bench/gpu/weights-check.js, real libcuda) reads them into shareable GPU memory and hands the fds
# over weights.sock; the worker maps them at its VA and checks a CUDA graph's output and the checksums.
# Prints both JSON lines. Uses .device/ from pack-product.sh when node is absent.
set -euo pipefail
cd "$(dirname "$0")/../.."
GIB=${GIB:-1}
if ! command -v node > /dev/null; then
  mkdir -p /tmp/device-node/bin
  [ -x /tmp/device-node/bin/node ] || xz -dc .device/node.xz > /tmp/device-node/bin/node
  chmod +x /tmp/device-node/bin/node
  export PATH=/tmp/device-node/bin:$PATH
  [ -d dist ] || tar -xJf .device/payload.txz
fi
work=$(mktemp -d /tmp/thaw-weights-check.XXXXXX)
mkdir -p "$work/control"
mkfifo "$work/go"
python3 bench/gpu/weights-check-worker.py "$work/control" "${DATA_DIR:-/tmp/thaw-weights-data}" "$GIB" < "$work/go" > "$work/worker.out" &
wpid=$!
exec 3> "$work/go"
until grep -q '^released' "$work/worker.out" 2> /dev/null; do
  kill -0 "$wpid" 2> /dev/null || { cat "$work/worker.out"; exit 1; }
  sleep 0.2
done
node dist/bench/gpu/weights-check.js "$work/control" "$wpid" ${READERS:-} > "$work/thaw.out" &
tpid=$!
until grep -q '^listening' "$work/thaw.out" 2> /dev/null; do
  kill -0 "$tpid" 2> /dev/null || { cat "$work/thaw.out"; exit 1; }
  sleep 0.1
done
echo go >&3
wait "$tpid"
wait "$wpid"
grep -v "^listening$" "$work/thaw.out" || true
grep -v "^released [0-9]*$" "$work/worker.out" || true
