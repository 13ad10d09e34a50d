#!/usr/bin/env bash
# How fast CRIU puts anonymous memory back on this host, by transparent-huge-page mode: a probe for the GPU
# machine (CRIU's page restore is most of thaw's restore time there), not part of the product.
#   bash bench/gpu/criu-page-rate.sh [GiB] [rounds] [modes...]     (root; CRIU from the private stack)
# A python process fills GiB of anonymous memory with incompressible bytes; CRIU dumps it once; then for each
# THP mode (default: the host's own, then always) the image is restored `rounds` times with the page cache
# warm, printing the wall time, the restore rate and how much of the restored memory is in huge pages. The
# host's THP mode is put back at the end.
set -eu
GIB=${1:-3}; ROUNDS=${2:-3}; shift $(( $# > 2 ? 2 : $# )) || true
THP=/sys/kernel/mm/transparent_hugepage/enabled
ORIG=$(sed -E 's/.*\[(.*)\].*/\1/' "$THP")
MODES=${*:-"$ORIG always"}
CRIU=${CRIU:-/opt/thaw/stack/${THAW_CONTAINERD:-1.7}/bin/criu}
DIR=$(mktemp -d /tmp/thaw-criu-rate.XXXXXX)
trap 'echo "$ORIG" > "$THP"; pkill -9 -f "$DIR/mem.py" 2>/dev/null; rm -rf "$DIR"' EXIT
cat > "$DIR/mem.py" <<'PY'
import mmap, os, sys, time
n = int(sys.argv[1]) << 30
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = os.urandom(1 << 20)
for off in range(0, n, 1 << 20):
    m[off:off + (1 << 20)] = chunk
open(sys.argv[2], "w").write(str(os.getpid()))
while True:
    time.sleep(1)
PY
setsid python3 "$DIR/mem.py" "$GIB" "$DIR/ready" < /dev/null > /dev/null 2>&1 &
for _ in $(seq 120); do [ -s "$DIR/ready" ] && break; sleep 0.5; done
PID=$(cat "$DIR/ready")
mkdir "$DIR/img"
"$CRIU" dump -t "$PID" -D "$DIR/img" --shell-job -o dump.log
echo "criu $("$CRIU" --version | head -1 | awk '{print $2}'), $GIB GiB, pages image $(du -m "$DIR/img" | cut -f1) MiB, host THP: $ORIG, defrag: $(sed -E 's/.*\[(.*)\].*/\1/' /sys/kernel/mm/transparent_hugepage/defrag)"
for mode in $MODES; do
  echo "$mode" > "$THP"
  for r in $(seq "$ROUNDS"); do
    t0=$(date +%s.%N)
    "$CRIU" restore -D "$DIR/img" --shell-job -d -o restore.log
    t1=$(date +%s.%N)
    P=$(pgrep -f "$DIR/mem.py" | head -1)
    huge=$(awk '/AnonHugePages/ {print $2}' "/proc/$P/smaps_rollup")
    kill -9 "$P"; while kill -0 "$P" 2> /dev/null; do sleep 0.05; done
    awk -v m="$mode" -v r="$r" -v a="$t0" -v b="$t1" -v g="$GIB" -v h="$huge" 'BEGIN {
      printf "{\"probe\":\"criu-page-rate\",\"thp\":\"%s\",\"round\":%d,\"restoreMs\":%d,\"GBps\":%.2f,\"hugeShare\":%.2f}\n",
        m, r, (b - a) * 1000, g * 1.073741824 / (b - a), h / (g * 1048576) }'
  done
done
