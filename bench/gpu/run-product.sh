#!/usr/bin/env bash
# bench:gpu on a GPU machine, one command. Two ways to have what it needs:
#   - a GPU node with Node.js 20 and network:  npm run bench:gpu   (setup.sh provisions the stack itself)
#   - a GPU node without them (the lent H100):  on a CPU machine `bash bench/gpu/pack-product.sh`, carry
#     .device/, then here:  OUT=<dir> bash bench/gpu/run-product.sh
# Needs root (containerd, CRIU and the CUDA checkpoint API), python3 with torch + transformers, the NVIDIA driver.
# THAW_THP=always|madvise|never: the host's transparent-huge-page mode for this run (put back at the end; CRIU
# restores anonymous memory faster in huge pages, see bench/gpu/criu-page-rate.sh); unset: the host's own.
# Writes to $OUT: environment.txt, bench-gpu.txt (table + JSON line), bench-gpu.json, stderr.log, logs.tgz
# (thaw's log and every worker pod's log). Exit status: the benchmark's.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d /tmp/thaw-bench-gpu.XXXXXX)}
export OUT
mkdir -p "$OUT"
if [ -f .device/unpack.sh ] && ! command -v node > /dev/null; then
  # shellcheck disable=SC1091
  source .device/unpack.sh
fi
THP=/sys/kernel/mm/transparent_hugepage/enabled
THP_BEFORE=$(sed -E 's/.*\[(.*)\].*/\1/' "$THP" 2> /dev/null || true)
if [ -n "${THAW_THP:-}" ]; then
  echo "$THAW_THP" > "$THP" || { echo "run-product: cannot set THP to $THAW_THP" >&2; exit 2; }
  trap 'echo "$THP_BEFORE" > "$THP"' EXIT
fi
{
  date -u +%FT%TZ
  echo "transparent_hugepage: $(cat "$THP" 2> /dev/null) (host's own: $THP_BEFORE)"
  uname -a
  nvidia-smi --query-gpu=name,uuid,driver_version,memory.total,memory.used --format=csv 2>&1
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1
  free -g; nproc; df -h /tmp
  node --version
} > "$OUT/environment.txt" 2>&1
if [ -f dist/bench/gpu/product.js ] && [ -f "/opt/thaw/stack/${THAW_CONTAINERD:-1.7}/.thaw-stack.json" ] && [ ! -f package-lock.json -o -d node_modules ]; then
  node dist/bench/gpu/product.js > "$OUT/bench-gpu.txt" 2> "$OUT/stderr.log"
else
  npm run bench:gpu > "$OUT/bench-gpu.txt" 2> "$OUT/stderr.log"
fi
rc=$?
# One archive instead of a file per pod: the device tool returns a limited number of files.
[ -d "$OUT/logs" ] && tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
tail -n 20 "$OUT/stderr.log"
cat "$OUT/bench-gpu.txt"
exit $rc
