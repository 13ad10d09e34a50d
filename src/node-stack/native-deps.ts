/**
 * The C libraries thaw's native parts link statically (native/Makefile), from Debian's packages of the machine's
 * own release into `<root>/native-deps`: zstd's static library and headers (thaw-pack compresses a checkpoint's
 * lazy pages with it, thaw-fill decompresses them), and Debian's `zstd` tool, which the tests run to read what
 * thaw-pack writes (a peer reading our frames). Bookworm's: the archive is linked into static binaries with the
 * machine's own libc.a, so it must not need a newer glibc than Debian 12's; the tool is patched onto the prefix's
 * libc6 like every other component.
 */
import path from 'node:path';
import { componentBinary, isComponentProvisioned, provisionComponent, type ComponentSpec, type ComponentStamp } from './component.js';
import { DEFAULT_STACK_ROOT } from './paths.js';
import type { ProvisionCommonOptions } from './provision-options.js';

export const NATIVE_DEPS_COMPONENT = 'native-deps';

export const NATIVE_DEPS_SPEC: ComponentSpec = {
  component: NATIVE_DEPS_COMPONENT,
  suite: 'bookworm',
  pins: {
    'libzstd-dev': '1.5.4+dfsg2-5',
    libzstd1: '1.5.4+dfsg2-5',
    zstd: '1.5.4+dfsg2-5',
    // the zstd tool's libraries, and the libc it is patched onto
    'liblz4-1': '1.9.4-1',
    liblzma5: '5.4.1-1+deb12u1',
    zlib1g: '1:1.2.13.dfsg-1',
    libc6: '2.36-9+deb12u14',
  },
  binaries: { zstd: { file: 'usr/bin/zstd', checkArgs: ['--version'] } },
  link: false,
};

export interface NativeDepsPaths {
  prefix: string;
  /** What the Makefile's ZSTD_PREFIX names: include/zstd.h and lib/x86_64-linux-gnu/libzstd.a under it. */
  usr: string;
  zstd: string;
}

export function nativeDepsPaths(root: string = DEFAULT_STACK_ROOT): NativeDepsPaths {
  const prefix = path.join(path.resolve(root), NATIVE_DEPS_COMPONENT);
  return { prefix, usr: path.join(prefix, 'usr'), zstd: componentBinary(NATIVE_DEPS_SPEC, 'zstd', root) };
}

export async function isNativeDepsProvisioned(root: string = DEFAULT_STACK_ROOT): Promise<ComponentStamp | undefined> {
  return isComponentProvisioned(NATIVE_DEPS_SPEC, root);
}

/** Provisions `<root>/native-deps` (see NATIVE_DEPS_SPEC); returns at once when its stamp matches. */
export async function provisionNativeDeps(options: ProvisionCommonOptions): Promise<{ paths: NativeDepsPaths; built: boolean; stamp: ComponentStamp }> {
  const r = await provisionComponent(NATIVE_DEPS_SPEC, options);
  return { paths: nativeDepsPaths(options.root ?? DEFAULT_STACK_ROOT), built: r.built, stamp: r.stamp };
}
