#!/usr/bin/env bash
# Everything `npm test`, `npm run demo` and the benchmarks need, on a fresh machine of this kind, as root.
# Idempotent and fast the second time: each step keeps a stamp of what it was built from.
#   1. npm packages (npm ci when package-lock.json changed)
#   2. TypeScript build into dist/
#   3. native parts (thaw-pause, thaw-hook, thaw-fill, thaw-pack, the fake libcuda) with the machine's C compiler,
#      linked statically against Debian's zstd, unpacked under /opt/thaw/stack/native-deps
#   4. the private node stack (containerd, runc, CRIU, ... from Debian) under /opt/thaw/stack/<flavor>,
#      and Debian's docker-registry under /opt/thaw/stack/registry (tests and bench:registry)
#   5. the peer tools the interop tests run (cosign, oras, skopeo, kustomize, kubectl, notation from Debian sid)
#      under /opt/thaw/stack/peer-tools
# THAW_CONTAINERD selects the stack flavor: 1.7 (default, containerd 1.7.24) or 2.1 (containerd 2.1.9).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (containerd, runc and CRIU need it)"; exit 1
fi

lock_hash=$(sha256sum package-lock.json | cut -c1-64)
if [ ! -f node_modules/.thaw-lock-hash ] || [ "$(cat node_modules/.thaw-lock-hash)" != "$lock_hash" ]; then
  log "installing npm packages"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > node_modules/.thaw-lock-hash
fi

log "building TypeScript"
npx tsc -p tsconfig.build.json

# zstd's static library and headers (Debian 12's), which thaw-pack and thaw-fill link (native/Makefile).
node dist/src/node-stack/provision-main.js --native-deps
if [ -f native/Makefile ]; then
  log "building native parts"
  make -s -C native
fi

flavors=${THAW_CONTAINERD:-1.7}
for flavor in ${flavors//,/ }; do
  node dist/src/node-stack/provision-main.js --flavor "$flavor"
done
# The OCI registry the registry store's tests and bench:registry start on loopback (every flavor uses it).
node dist/src/node-stack/provision-main.js --registry
# The tools platform teams use on thaw's artifacts and manifests (the interop tests run them; absent, they fail).
node dist/src/node-stack/provision-main.js --peer-tools
