#!/usr/bin/env bash
# `npm test`: set up (scripts/setup.sh), then the whole suite against both containerd generations the project
# supports here — 1.7.24 and 2.1.9 — unless THAW_CONTAINERD names others (e.g. THAW_CONTAINERD=1.7).
set -euo pipefail
cd "$(dirname "$0")/.."
export THAW_CONTAINERD="${THAW_CONTAINERD:-1.7,2.1}"
bash scripts/setup.sh
exec npx vitest run "$@"
