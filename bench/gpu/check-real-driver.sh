#!/usr/bin/env bash
# On the GPU machine: checks src/cuda against the real driver, then runs the GPU worker's selftest.
# Results go to $OUT, seven files: bindings.json (check-real-driver: every binding on a live PyTorch process,
# which must stall while locked and go on with the same checksum after restore + unlock), victim.log,
# worker-selftest.json (load → graph → generate → release the KV pool → remap → same tokens and logits),
# cycle.log (the serving worker through one CUDA lock/checkpoint/restore/unlock with its pool released:
# timings, GPU memory per state, tokens before and after), environment.txt, stderr.log, summary.json.
# Exit status 0 only when all three passed.
#
# Needs: python3 with torch + transformers, the NVIDIA driver, root (or CAP_SYS_PTRACE) for the
# checkpoint API, and Node.js: $NODE, or the bundle made by bench/gpu/pack-for-device.sh on the CPU
# machine (.device/gpu-check, carried to the GPU machine), or a node on PATH.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d /tmp/thaw-gpu-check.XXXXXX)}
mkdir -p "$OUT"
BUNDLE=${THAW_GPU_BUNDLE:-.device/gpu-check}
VICTIM_BYTES_ELEMS=${VICTIM_ELEMS:-268435456} # 1 GiB of fp32
SELFTEST_ARGS=${SELFTEST_ARGS:-}

{
  date -u +%FT%TZ
  uname -a
  nvidia-smi --query-gpu=name,uuid,driver_version,memory.total,persistence_mode --format=csv 2>&1
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1
  id
} > "$OUT/environment.txt"

NODE=${NODE:-}
if [ -z "$NODE" ]; then
  if [ -f "$BUNDLE/node.xz" ]; then
    NODE=/tmp/thaw-node
    [ -x "$NODE" ] || { xz -dc "$BUNDLE/node.xz" > "$NODE.tmp" && chmod +x "$NODE.tmp" && mv "$NODE.tmp" "$NODE"; }
  elif command -v node > /dev/null; then
    NODE=node
  fi
fi
CHECK_JS=$BUNDLE/dist/bench/gpu/check-real-driver.js
[ -f "$CHECK_JS" ] || CHECK_JS=dist/bench/gpu/check-real-driver.js

bindings_rc=skipped
if [ -z "$NODE" ] || [ ! -f "$CHECK_JS" ]; then
  echo "no Node.js or no compiled check (run bench/gpu/pack-for-device.sh and carry $BUNDLE)" | tee -a "$OUT/stderr.log"
else
  python3 bench/gpu/cuda-victim.py "$VICTIM_BYTES_ELEMS" > "$OUT/victim.log" 2>&1 &
  victim=$!
  for _ in $(seq 1 1200); do
    grep -q '"event": "ready"' "$OUT/victim.log" 2> /dev/null && break
    kill -0 "$victim" 2> /dev/null || break
    sleep 0.1
  done
  if grep -q '"event": "ready"' "$OUT/victim.log"; then
    "$NODE" "$CHECK_JS" --pid "$victim" --victim-log "$OUT/victim.log" --out "$OUT/bindings.json" > /dev/null 2>> "$OUT/stderr.log"
    bindings_rc=$?
  else
    echo "the victim did not start (see victim.log)" >> "$OUT/stderr.log"
    bindings_rc=victim-failed
  fi
  kill "$victim" 2> /dev/null
  wait "$victim" 2> /dev/null
fi

# shellcheck disable=SC2086 # SELFTEST_ARGS is a list of flags
python3 bench/gpu/worker.py --selftest --json "$OUT/worker-selftest.json" $SELFTEST_ARGS > /dev/null 2>> "$OUT/stderr.log"
selftest_rc=$?

# The serving worker through one CUDA cycle (no CRIU): it releases its KV pool and says ready; Node locks,
# checkpoints, restores and unlocks it; told checkpoint-complete, it remaps and must print the same tokens.
cycle_rc=skipped
CYCLE_JS=$(dirname "$CHECK_JS")/cuda-cycle.js
if [ -n "$NODE" ] && [ -f "$CYCLE_JS" ]; then
  control=$(mktemp -d /tmp/thaw-control.XXXXXX)
  : > "$OUT/cycle.log" # both the worker and Node append to it (O_APPEND: neither overwrites the other)
  # shellcheck disable=SC2086
  SNAPSHOT_CONTROL_DIR=$control python3 bench/gpu/worker.py --print-tokens --port 18000 $SELFTEST_ARGS >> "$OUT/cycle.log" 2>> "$OUT/stderr.log" &
  worker=$!
  for _ in $(seq 1 1800); do
    [ -e "$control/ready-for-checkpoint" ] && break
    kill -0 "$worker" 2> /dev/null || break
    sleep 0.1
  done
  if [ -e "$control/ready-for-checkpoint" ]; then
    "$NODE" "$CYCLE_JS" --pid "$worker" >> "$OUT/cycle.log" 2>> "$OUT/stderr.log"
    cycle_rc=$?
    : > "$control/checkpoint-complete"
    for _ in $(seq 1 300); do
      [ "$(grep -c '"event": "tokens"' "$OUT/cycle.log")" -ge 2 ] && break
      sleep 0.1
    done
    python3 - "$OUT/cycle.log" >> "$OUT/cycle.log" << 'PY' || cycle_rc=tokens-differ
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
tokens = [l["tokens"] for l in lines if l.get("event") == "tokens"]
ok = len(tokens) == 2 and tokens[0] == tokens[1]
print(json.dumps({"event": "compare", "tokensEqual": ok}))
sys.exit(0 if ok else 1)
PY
  else
    cycle_rc=worker-not-ready
  fi
  kill "$worker" 2> /dev/null
  wait "$worker" 2> /dev/null
  rm -rf "$control"
fi

printf '{"bindings": "%s", "workerSelftest": "%s", "servingCycle": "%s", "out": "%s"}\n' "$bindings_rc" "$selftest_rc" "$cycle_rc" "$OUT" | tee "$OUT/summary.json"
[ "$bindings_rc" = 0 ] && [ "$selftest_rc" = 0 ] && [ "$cycle_rc" = 0 ]
