#!/usr/bin/env bash
# On the CPU machine: packs what `bench/gpu/run-product.sh` needs on a GPU machine that has Python, PyTorch
# and the driver but no Node.js, no npm registry and no Debian archive (the lent H100) into .device/
# (git-ignored; carry it: carry=[".device"]; limit 64 MiB):
#   node.xz      this machine's node binary
#   stack.txz    see below (node.xz and stack.txz are cached in .device-cache/ between packs)
#   payload.txz  dist/ (the whole build), production node_modules (koffi's linux_x64 build only),
#                native/build/thaw-pause, thaw-hook (the native createRuntime hook) and thaw-fill (the memory filler), and the private containerd stack (/opt/thaw/stack/1.7, or 2.1 with
#                THAW_CONTAINERD=2.1; without
#                what host-network pods never use: CNI plugins, the v1 shims, Go sources, docs), as
#                  .device-stack/, which unpack.sh puts back at /opt/thaw/stack/<flavor> — its binaries are
#                patched for that absolute path.
# xz with the x86 BCJ filter: Go and ELF binaries compress ~10% better with it, which keeps this under 64 MiB.
# Run `bash scripts/setup.sh` first (the build, thaw-pause and the stack).
set -euo pipefail
cd "$(dirname "$0")/../.."
FLAVOR=${THAW_CONTAINERD:-1.7}
FLAVOR=${FLAVOR%%,*}
STACK=/opt/thaw/stack/$FLAVOR
[ -f "$STACK/.thaw-stack.json" ] || { echo "pack-product: $STACK is not provisioned (run: bash scripts/setup.sh)" >&2; exit 2; }
for bin in thaw-pause thaw-hook thaw-fill thaw-pack; do
  [ -x "native/build/$bin" ] || { echo "pack-product: native/build/$bin missing (run: bash scripts/setup.sh)" >&2; exit 2; }
done
npx tsc -p tsconfig.build.json
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
stage=$(mktemp -d /tmp/thaw-pack-product.XXXXXX)
trap 'rm -rf "$stage"' EXIT
rm -rf .device && mkdir -p .device

# The stack, trimmed: host-network pods need no CNI plugin; nothing runs the v1 shims.
mkdir -p "$stage/.device-stack"
tar -C "$STACK" -cf - \
  --exclude='./usr/lib/cni/*' --exclude='./usr/bin/containerd-shim' --exclude='./usr/bin/containerd-shim-runc-v1' \
  --exclude='./usr/share/doc' --exclude='./usr/share/man' --exclude='./usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/*.go' \
  . | tar -C "$stage/.device-stack" -xf -

# Production dependencies only (the dev tools are of no use there); koffi's prebuilt for this platform only.
node -e '
  const lock = require("./package-lock.json");
  const keep = Object.entries(lock.packages).filter(([p, v]) => p.startsWith("node_modules/") && !v.dev).map(([p]) => p);
  process.stdout.write(keep.join("\n") + "\n");
' > "$stage/prod-modules.txt"
# One tar over the list (each package recursively): koffi's prebuilt builds, sources and docs stay behind.
tar -cf - --exclude='node_modules/koffi/build/koffi/*' --exclude='node_modules/koffi/src' --exclude='node_modules/koffi/vendor' \
  --exclude='node_modules/koffi/doc' -T <(while read -r p; do [ -e "$p" ] && echo "$p"; done < "$stage/prod-modules.txt") \
  | tar -C "$stage" -xf -
mkdir -p "$stage/node_modules/koffi/build/koffi"
cp -r node_modules/koffi/build/koffi/linux_x64 "$stage/node_modules/koffi/build/koffi/"
mkdir -p "$stage/native/build"
# All three: without thaw-hook (thaw-fill) beside thaw-pause the agent falls back to the Node.js hook (to CRIU's
# own memory fill), and the GPU run would measure a restore path no node runs.
cp native/build/thaw-pause native/build/thaw-hook native/build/thaw-fill native/build/thaw-pack "$stage/native/build/"
cp -r dist "$stage/dist"

# node and the stack change rarely: kept between packs (in .device-cache/) while their sources are unchanged.
cache=.device-cache/$FLAVOR
grep -qx '/.device-cache/' .git/info/exclude 2>/dev/null || echo '/.device-cache/' >> .git/info/exclude
mkdir -p "$cache"
echo "$FLAVOR" > .device/flavor
node_bin=$(readlink -f "$(command -v node)")
# The compression settings are part of the key: changing them repacks.
key="$( { echo 'node:x86,9e stack:x86,7'; stat -c '%n %s %Y' "$node_bin" "$STACK/.thaw-stack.json"; } | sha256sum | cut -c1-16)"
if [ "$(cat "$cache/key" 2>/dev/null)" != "$key" ]; then
  # Node's ~100 MB binary is most of the carry: x86 BCJ and the extreme preset take ~1 MB more off than -6.
  xz -T0 --x86 --lzma2=preset=9e -c "$node_bin" > "$cache/node.xz"
  tar -C "$stage" -cf - .device-stack | xz -T0 --x86 --lzma2=preset=7 > "$cache/stack.txz"
  echo "$key" > "$cache/key"
fi
cp "$cache/node.xz" "$cache/stack.txz" .device/
tar -C "$stage" -cf - node_modules native dist | xz -T0 --x86 --lzma2=preset=7 > .device/payload.txz
cat > .device/unpack.sh <<'EOS'
# Sourced on the GPU machine from the project root: node on PATH, the build in place, the stack at its path.
mkdir -p /tmp/device-node/bin
[ -x /tmp/device-node/bin/node ] || { xz -dc .device/node.xz > /tmp/device-node/bin/node.tmp && chmod +x /tmp/device-node/bin/node.tmp && mv /tmp/device-node/bin/node.tmp /tmp/device-node/bin/node; }
export PATH=/tmp/device-node/bin:$PATH
tar -xJf .device/payload.txz
flavor=$(cat .device/flavor)
export THAW_CONTAINERD=$flavor
if [ ! -f /opt/thaw/stack/$flavor/.thaw-stack.json ]; then
  tar -xJf .device/stack.txz
  mkdir -p /opt/thaw/stack && rm -rf /opt/thaw/stack/$flavor && mv .device-stack /opt/thaw/stack/$flavor
fi
echo "unpack: node $(node --version); stack at /opt/thaw/stack/$flavor (THAW_CONTAINERD=$flavor)"
EOS
du -b .device/* | awk '{printf "%s %.1f MiB\n", $2, $1/1048576}'
# The device tool's 64 MiB is for everything that travels: the working tree's files as well as .device/.
size=$(du -sb .device | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "pack-product: .device/ is $((size / 1048576)) MiB, with the tree $(((size + tree) / 1048576)) MiB (limit 64)"
[ $((size + tree)) -lt $((64 * 1048576)) ] || { echo "pack-product: too large to carry" >&2; exit 1; }
