/**
 * Where the target container's mounts are in the host's mount namespace, so that CRIU can restore into the
 * target while it runs in the host's mount namespace (the way `runc restore` places CRIU: CRIU in runc's own
 * mount namespace, `root` the container's rootfs as a host path, each external mount mapped to its host source).
 *
 * Why: a process that enters the container's mount namespace takes the container's root as its own, so its
 * dynamic loader reads the container's `/etc/ld.so.preload`, CRIU's plugin dir and every PATH lookup resolve
 * inside the container (security-audit.md C1). CRIU started in the host's mount namespace loads only host files;
 * it needs the target's mounts as host paths instead.
 *
 * How: a mount of the target is found in the host's mountinfo by its device and the path of its root inside that
 * filesystem (a bind mount of a host directory, the overlay of the container's rootfs, a cgroup controller's
 * directory): the host path is that host mount's mountpoint joined with the rest of the target's root. Both
 * mountinfo files are the kernel's (the target's is read while only the placeholder runs in it). A mount that
 * exists only inside the target (runc's tmpfs at /sys/fs/cgroup, which holds the controllers' mountpoints) has no
 * host path: CRIU gets a stand-in, an empty directory thaw makes in its own work dir with the mountpoints of the
 * external mounts nested in it (CRIU binds those over it as in the source).
 *
 * Pure functions; `readHostMountTable` is the one reader.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join, posix } from 'node:path';

import { parseMountInfo, type MountInfo } from './container-inspect.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';

export interface MountTables {
  /** The target container's mounts (/proc/<pid>/mountinfo, paths as the container sees them). */
  target: readonly MountInfo[];
  /** The mounts of the namespace CRIU runs in (our own: /proc/self/mountinfo). */
  host: readonly MountInfo[];
}

/** Reads both tables. Throws RESTORE_TARGET_GONE when the target's mountinfo cannot be read. */
export async function readHostMountTable(targetPid: number): Promise<MountTables> {
  const step = 'read the target\'s and the host\'s mount tables';
  const read = async (path: string): Promise<MountInfo[]> => {
    try {
      return parseMountInfo(await readFile(path, 'utf8'));
    } catch (err) {
      throw new RestoreError(RestoreErrorCode.TARGET_GONE, `cannot read ${path}`, { step, cause: err });
    }
  };
  const [target, host] = await Promise.all([read(`/proc/${targetPid}/mountinfo`), read('/proc/self/mountinfo')]);
  return { target, host };
}

/** True when `root` lies at or under `dir` (both absolute, normalised, as mountinfo writes them). */
function within(root: string, dir: string): boolean {
  return dir === '/' || root === dir || root.startsWith(`${dir}/`);
}

/**
 * The host path of the target's mount at `mountpoint` (as the container sees it), or undefined when no host
 * mount shows that filesystem's directory. The last mount at a mountpoint is the one visible, in both tables.
 * A root that mountinfo marks deleted (`//deleted`) has no host path.
 */
export function hostPathOf(tables: MountTables, mountpoint: string): string | undefined {
  const t = [...tables.target].reverse().find((m) => m.mountPoint === mountpoint);
  if (t === undefined || t.root.endsWith('//deleted') || !t.root.startsWith('/')) return undefined;
  let best: MountInfo | undefined;
  for (const h of tables.host) {
    if (h.device !== t.device || !within(t.root, h.root)) continue;
    if (h.mountPoint.endsWith('//deleted')) continue;
    // The host mount whose root is the deepest prefix needs the least path below it; among equals the last
    // one listed (visible when several are stacked at one mountpoint).
    if (best === undefined || h.root.length >= best.root.length) best = h;
  }
  if (best === undefined) return undefined;
  const rest = best.root === '/' ? t.root : t.root.slice(best.root.length);
  const path = posix.normalize(posix.join(best.mountPoint, rest));
  return path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path;
}

export interface HostRestorePaths {
  /** CRIU's `root`: the target's root filesystem as a host path. */
  root: string;
  /** Each external mount of the checkpoint: its key and the host path CRIU binds there. */
  externalMounts: Array<{ key: string; mountpoint: string; standIn: boolean }>;
}

/**
 * The host paths for a restore of `externalMounts` (the manifest's: key and mountpoint in the source) into the
 * target. A mount without a host path gets a stand-in under `standInDir` (created here, mode 0700, with the
 * mountpoints of the external mounts directly under it). Throws RESTORE_TARGET_MOUNTS when the root has no host
 * path (a restore into a root thaw cannot name from the host is not attempted).
 */
export function planHostRestorePaths(
  tables: MountTables,
  externalMounts: ReadonlyArray<{ key: string; path: string }>,
  standInDir: string,
  kindOf: (mountpoint: string) => 'file' | 'dir',
): HostRestorePaths {
  const step = 'find the target\'s mounts from the host';
  const root = hostPathOf(tables, '/');
  if (root === undefined) {
    throw new RestoreError(RestoreErrorCode.TARGET_MOUNTS, 'the target container\'s root filesystem is not mounted in the host\'s mount namespace', {
      step,
      evidence: { rootMount: [...tables.target].reverse().find((m) => m.mountPoint === '/') },
    });
  }
  const out: HostRestorePaths['externalMounts'] = [];
  externalMounts.forEach((m, i) => {
    const hostPath = hostPathOf(tables, m.path);
    if (hostPath !== undefined) {
      out.push({ key: m.key, mountpoint: hostPath, standIn: false });
      return;
    }
    const dir = join(standInDir, String(i));
    mkdirSync(standInDir, { recursive: true, mode: 0o700 });
    if (kindOf(m.path) === 'file') {
      // CRIU binds a file mount only over a file ("detected as file-mount").
      writeFileSync(dir, '', { mode: 0o600, flag: 'wx' });
      out.push({ key: m.key, mountpoint: dir, standIn: true });
      return;
    }
    mkdirSync(dir, { mode: 0o700 });
    for (const child of externalMounts) {
      const rel = posix.relative(m.path, child.path);
      if (rel === '' || rel.startsWith('..') || rel.includes('/')) continue;
      mkdirSync(join(dir, rel), { mode: 0o700 });
    }
    out.push({ key: m.key, mountpoint: dir, standIn: true });
  });
  return { root, externalMounts: out };
}
