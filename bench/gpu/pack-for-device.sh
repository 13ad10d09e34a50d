#!/usr/bin/env bash
# Packs what bench/gpu/check-real-driver.sh needs on the GPU machine, which has no Node.js, into
# .device/gpu-check/ (git-ignored; pass it in the run's `carry`, ~26 MB): the Node binary (xz), koffi
# (package files + the linux_x64 prebuilt only) and src/cuda + bench/gpu/check-real-driver.ts compiled to
# ESM JavaScript. Re-running rebuilds the JavaScript; node.xz is kept while it is newer than the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=.device/gpu-check
NODE_BIN=$(readlink -f "$(command -v node)")
mkdir -p "$BUNDLE"
rm -rf "$BUNDLE/dist" "$BUNDLE/node_modules"
npx tsc --outDir "$BUNDLE/dist" --rootDir . --module NodeNext --moduleResolution NodeNext --target ES2022 \
  --strict --skipLibCheck --types node --sourceMap false src/cuda/index.ts bench/gpu/check-real-driver.ts bench/gpu/cuda-cycle.ts
echo '{ "type": "module", "private": true }' > "$BUNDLE/package.json"
K=node_modules/koffi
mkdir -p "$BUNDLE/$K/build/koffi"
cp "$K/package.json" "$K/index.js" "$K/indirect.js" "$BUNDLE/$K/"
cp -r "$K/build/koffi/linux_x64" "$BUNDLE/$K/build/koffi/"
if [ ! -f "$BUNDLE/node.xz" ] || [ "$NODE_BIN" -nt "$BUNDLE/node.xz" ]; then
  xz -T2 -6 -c "$NODE_BIN" > "$BUNDLE/node.xz.tmp"
  mv "$BUNDLE/node.xz.tmp" "$BUNDLE/node.xz"
fi
du -sh "$BUNDLE"
