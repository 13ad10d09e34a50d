import path from 'node:path';
import { StackError, StackErrorCode } from './errors.js';

/** The stack flavors: which containerd generation a prefix holds. */
export type StackFlavor = '1.7' | '2.1';
export const STACK_FLAVORS: readonly StackFlavor[] = ['1.7', '2.1'];

/**
 * Where provisioned stacks live. A fixed absolute path on purpose: the binaries' ELF interpreter
 * (PT_INTERP) is patched to an absolute path inside the prefix, and a restore target bind-mounts the
 * toolkit at the same path, so the prefix cannot move without patching again.
 */
export const DEFAULT_STACK_ROOT = '/opt/thaw/stack';

/** Multiarch library directories of a prefix (Debian amd64). */
export const LIB_SUBDIRS = ['usr/lib/x86_64-linux-gnu', 'lib/x86_64-linux-gnu'] as const;
export const INTERPRETER_SUBPATH = 'usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2';
/** Where a libc6 that predates Debian's merged /usr (Debian 12's) has it. */
export const LEGACY_INTERPRETER_SUBPATH = 'lib/x86_64-linux-gnu/ld-linux-x86-64.so.2';
export const CRI_PROTO_SUBPATH = 'usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto';
/** Our stripped copy of the CRI proto (gogoproto import and options removed), written at provisioning. */
export const CRI_PROTO_STRIPPED_SUBPATH = 'share/thaw/cri-api-v1.proto';
export const STAMP_FILE = '.thaw-stack.json';

/** Binaries exposed in `<prefix>/bin/` and the prefix-relative file each points to. */
export const BIN_LINKS: Readonly<Record<string, string>> = {
  containerd: 'usr/bin/containerd',
  'containerd-shim-runc-v2': 'usr/bin/containerd-shim-runc-v2',
  ctr: 'usr/bin/ctr',
  runc: 'usr/sbin/runc',
  criu: 'usr/sbin/criu',
  tar: 'usr/bin/tar',
  gzip: 'usr/bin/gzip',
  gunzip: 'usr/bin/gunzip',
  zcat: 'usr/bin/zcat',
  busybox: 'usr/bin/busybox',
};

export interface StackPaths {
  flavor: StackFlavor;
  /** The stacks' root (default /opt/thaw/stack). */
  root: string;
  /** This flavor's prefix, e.g. /opt/thaw/stack/1.7. */
  prefix: string;
  /** One PATH entry that gives containerd its shim and runc, and runc/CRIU their tar and gzip. */
  binDir: string;
  containerd: string;
  containerdShim: string;
  ctr: string;
  runc: string;
  criu: string;
  tar: string;
  gzip: string;
  busybox: string;
  /** The prefix's own dynamic loader, the PT_INTERP of every patched binary. */
  interpreter: string;
  libDirs: string[];
  /** The CRI api.proto as Debian ships it. */
  criProto: string;
  /** The stripped copy the CRI client loads. */
  criProtoStripped: string;
  /** CNI plugins (bridge, host-local, loopback, ...). */
  cniBinDir: string;
  stampFile: string;
  /** Cache of built OCI image layouts, shared by the flavors. */
  imageCacheDir: string;
  /** Tools run on the host while provisioning (patchelf from the host distribution). */
  toolsDir: string;
  patchelf: string;
}

export function parseFlavor(value: string | undefined, fallback: StackFlavor = '1.7'): StackFlavor {
  if (value === undefined || value === '') return fallback;
  if ((STACK_FLAVORS as readonly string[]).includes(value)) return value as StackFlavor;
  throw new StackError(StackErrorCode.INVALID_OPTION, `unknown stack flavor "${value}" (use one of ${STACK_FLAVORS.join(', ')})`, {
    step: 'parse flavor',
    evidence: { value },
  });
}

/**
 * Absolute paths of everything a provisioned stack holds. Pure: it does not check that the files exist
 * (`provisionStack` makes them; `isProvisioned` checks).
 */
export function stackPaths(flavor: StackFlavor, root: string = DEFAULT_STACK_ROOT): StackPaths {
  const r = path.resolve(root);
  const prefix = path.join(r, flavor);
  const binDir = path.join(prefix, 'bin');
  const bin = (name: string): string => path.join(binDir, name);
  return {
    flavor,
    root: r,
    prefix,
    binDir,
    containerd: bin('containerd'),
    containerdShim: bin('containerd-shim-runc-v2'),
    ctr: bin('ctr'),
    runc: bin('runc'),
    criu: bin('criu'),
    tar: bin('tar'),
    gzip: bin('gzip'),
    busybox: bin('busybox'),
    interpreter: path.join(prefix, INTERPRETER_SUBPATH),
    libDirs: LIB_SUBDIRS.map((d) => path.join(prefix, d)),
    criProto: path.join(prefix, CRI_PROTO_SUBPATH),
    criProtoStripped: path.join(prefix, CRI_PROTO_STRIPPED_SUBPATH),
    cniBinDir: path.join(prefix, 'usr/lib/cni'),
    stampFile: path.join(prefix, STAMP_FILE),
    imageCacheDir: path.join(r, 'images'),
    toolsDir: path.join(r, 'tools'),
    patchelf: path.join(r, 'tools', 'usr/bin/patchelf'),
  };
}
