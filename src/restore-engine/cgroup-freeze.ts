/**
 * Freezing a source container's cgroup while thaw captures its rootfs diff: a frozen container cannot swap a
 * directory for a symlink, grow a file or add entries under the walk (audit C4). The walk's own rules
 * (rootfs-diff/capture.ts) hold without the freeze; the freeze makes the capture a consistent snapshot.
 *
 * The cgroup is the one the kernel lists for the container's init in /proc/<pid>/cgroup, found through the
 * host's own mountinfo: the v1 freezer hierarchy when the host has one (runc freezes there), else cgroup v2's
 * `cgroup.freeze`. Freezing a cgroup freezes its descendants too. The root cgroup is never frozen.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseCgroupMounts, parseProcCgroup } from './restore-cgroups.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';

/** How long a freeze may take to settle before the capture gives up (a task in uninterruptible sleep delays it). */
export const DEFAULT_FREEZE_TIMEOUT_MS = 10_000;
const POLL_MS = 5;

export interface FrozenCgroup {
  /** The cgroup directory (host path). */
  dir: string;
  version: 1 | 2;
  /** Thaws the cgroup; safe to call more than once. */
  thaw(): Promise<void>;
}

/** Freezes the cgroup of `pid` and waits until the kernel reports it frozen. Error: RESTORE_CGROUP. */
export async function freezeCgroupOf(
  pid: number,
  options: { procRoot?: string; timeoutMs?: number; signal?: AbortSignal } = {},
): Promise<FrozenCgroup> {
  const step = 'freeze the container cgroup';
  const procRoot = options.procRoot ?? '/proc';
  const lines = parseProcCgroup(await readFile(join(procRoot, String(pid), 'cgroup'), 'utf8'));
  const mounts = parseCgroupMounts(await readFile(join(procRoot, 'self', 'mountinfo'), 'utf8'));
  const v1Line = lines.find((l) => l.controllers.includes('freezer'));
  const v1Mount = mounts.find((m) => m.version === 1 && m.controllers.includes('freezer'));
  const v2Line = lines.find((l) => l.hierarchyId === 0 && l.controllers.length === 0);
  const v2Mount = mounts.find((m) => m.version === 2);
  const pick = v1Line && v1Mount ? { line: v1Line, mount: v1Mount, version: 1 as const } : v2Line && v2Mount ? { line: v2Line, mount: v2Mount, version: 2 as const } : undefined;
  if (!pick) throw new RestoreError(RestoreErrorCode.CGROUP, `no freezer for pid ${pid} (no v1 freezer hierarchy, no cgroup v2 mount)`, { step, evidence: { lines } });
  let rel = pick.line.path;
  if (pick.mount.root !== '/' && rel.startsWith(pick.mount.root)) rel = rel.slice(pick.mount.root.length);
  if (rel === '/' || rel === '' || rel.split('/').includes('..')) {
    throw new RestoreError(RestoreErrorCode.CGROUP, `pid ${pid} is in the root cgroup (${pick.line.path}); thaw never freezes it`, { step, evidence: { path: pick.line.path } });
  }
  const dir = join(pick.mount.mountpoint, rel);
  const [file, freeze, unfreeze] = pick.version === 1 ? ['freezer.state', 'FROZEN', 'THAWED'] : ['cgroup.freeze', '1', '0'];
  const frozen = async (): Promise<boolean> =>
    pick.version === 1
      ? (await readFile(join(dir, 'freezer.state'), 'utf8')).trim() === 'FROZEN'
      : /^frozen 1$/m.test(await readFile(join(dir, 'cgroup.events'), 'utf8'));
  let thawed = false;
  const thaw = async (): Promise<void> => {
    if (thawed) return;
    thawed = true;
    await writeFile(join(dir, file), unfreeze, { flag: 'r+' });
  };
  await writeFile(join(dir, file), freeze, { flag: 'r+' });
  const deadline = Date.now() + (options.timeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS);
  try {
    while (!(await frozen())) {
      if (options.signal?.aborted) throw new RestoreError(RestoreErrorCode.CGROUP, 'aborted while freezing', { step, cause: options.signal.reason });
      if (Date.now() > deadline) throw new RestoreError(RestoreErrorCode.CGROUP, `${dir} did not freeze within ${options.timeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS} ms`, { step, evidence: { dir } });
      await sleep(POLL_MS);
    }
  } catch (err) {
    await thaw();
    throw err;
  }
  return { dir, version: pick.version, thaw };
}
