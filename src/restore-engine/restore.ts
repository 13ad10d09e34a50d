/**
 * CRIU restore of a checkpoint into a running placeholder container (design.md, Restore step 3;
 * restore-recipe.md shows the same steps with CRIU's command line).
 *
 * CRIU runs in the host's mount namespace, the way `runc restore` places it (docs/security.md, "Helpers and CRIU
 * run on the host"): only its PID namespace must be the target's (CRIU cannot join one: the restored tree's root
 * must be forked inside it to be reparented to the placeholder), so a host shell joins the target's cgroups
 * (restore-cgroups.ts) and execs the host's nsenter into the target's PID, IPC and UTS namespaces, which forks
 * CRIU's swrk there. setns() into a PID namespace changes no root and no mount: the loader, CRIU's plugins and
 * its PATH lookups all resolve in the host's filesystem. CRIU then recreates the tree with `root` the target's
 * root filesystem as a host path, a new mount namespace, its own nested PID namespace under the placeholder, the
 * source's external mounts bound from the host paths of the target's mounts at the same mountpoints
 * (host-mounts.ts), and the source's stdout/stderr pipes replaced by the placeholder's (so the worker writes to
 * the new container's log). When CRIU exits, the tree's root is reparented to the placeholder (the PID
 * namespace's init), which is what thaw-pause adopts on SIGUSR1; restoreIntoContainer waits for that.
 */
import { closeSync, constants as fsConstants, openSync, readlinkSync, statSync } from 'node:fs';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage, isThawError } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import type { Manifest } from '../store/index.js';
import { CriuClient, nsenterWrapper } from './criu/client.js';
import { CriuErrorCode } from './criu/errors.js';
import type { RestoreOptions } from './criu/options.js';
import { assertCredentialsWithinSpec, readRecordedCredentials, readTargetSpec, specCredentialsOf, type ThreadCredentials } from './credentials.js';
import { CriuImageCodec } from './criu/images.js';
import { planHostRestorePaths, readHostMountTable } from './host-mounts.js';
import { cgroupJoinWrapper, sameCgroups, targetCgroupProcsFiles } from './restore-cgroups.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';
import { DEFAULT_NSENTER_PATH, DEFAULT_POD_CRIU_RESTORE_TIMEOUT_MS } from '../defaults.js';

/** CRIU exits right after its answer; the reparenting to the placeholder follows at once. */
export const ADOPTABLE_WAIT_MS = 10_000;
export const DEFAULT_SH_PATH = '/bin/sh';
const STDIO_PIPE = /^pipe:\[\d+\]$/;
/** Under the work dir: the stand-ins for the target's mounts that have no host path (host-mounts.ts). */
const STAND_IN_DIR = 'mount-stand-ins';

export interface RestoreIntoContainerOptions {
  criu: CriuClient;
  manifest: Manifest;
  /** The checkpoint's CRIU images (host path). */
  imagesDir: string;
  /** Writable host directory for CRIU's log (restore.log). */
  workDir: string;
  /** Host pid of the target container's PID 1 (thaw-pause). */
  targetPid: number;
  /** Join the target's cgroups before CRIU runs (default true). */
  joinCgroups?: boolean;
  timeoutMs?: number;
  signal?: AbortSignal;
  logger?: Logger;
  nsenterPath?: string;
  shPath?: string;
  /**
   * Compare the checkpoint's recorded credentials with the target's OCI spec before CRIU runs (credentials.ts;
   * default true). Off only for restores into something that is not a container (tests of CRIU itself).
   */
  checkCredentials?: boolean;
  /** The image decoder to share; default one loaded on first use. */
  imageCodec?: CriuImageCodec;
  /** CRIU leaves private anonymous pages to the lazy-pages daemon listening in workDir (memory-fill.ts). */
  lazyPages?: boolean;
  /**
   * The checkpoint's recorded credentials, read once its verification passed (the flow starts the read at prepare, so
   * a cold page cache costs the restore nothing here); absent: read from `imagesDir` now. Rejects as
   * readRecordedCredentials does.
   */
  recordedCredentials?: Promise<ThreadCredentials[]>;
}



export interface RestoredTree {
  /** The root's pid in the target's PID namespace (as CRIU answered). */
  pid: number;
  /** The root's pid on the host. */
  hostPid: number;
  logPath: string;
  criuRestoreMs: number;
  /** Before CRIU: the mount table, the target's spec, the recorded credentials checked against it, the cgroups. */
  checksMs: number;
  /** After CRIU: finding the restored root among the placeholder's children (and its cgroups checked). */
  adoptMs: number;
  /** The cgroup.procs files joined (empty when joinCgroups is false). */
  cgroupsJoined: string[];
  /** The CRIU restore options that were used (for the log and the report). */
  options: Omit<RestoreOptions, 'inheritFds'> & { inheritFds: Array<{ key: string; from: string }> };
}

/** NSpid of a process: its pid in each PID namespace from the host's down. */
export async function nsPids(pid: number): Promise<number[]> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^NSpid:\s+(.*)$/m.exec(status);
  if (!m?.[1]) return [pid];
  return m[1].trim().split(/\s+/).map(Number);
}

/** Children (host pids) of a process, from every thread's children list. */
export async function childrenOf(pid: number): Promise<number[]> {
  const out = new Set<number>();
  for (const tid of await readdir(`/proc/${pid}/task`)) {
    const text = await readFile(`/proc/${pid}/task/${tid}/children`, 'utf8').catch(() => '');
    for (const p of text.trim().split(/\s+/)) if (p !== '') out.add(Number(p));
  }
  return [...out];
}

function isNetNsShared(pid: number): boolean {
  try {
    return readlinkSync(`/proc/${pid}/ns/net`) === readlinkSync('/proc/self/ns/net');
  } catch {
    return true;
  }
}

/** Kills a restored tree: its root is the init of a nested PID namespace, so SIGKILL to it ends them all. */
export function killRestoredTree(hostPid: number | undefined): void {
  if (hostPid === undefined) return;
  try {
    process.kill(hostPid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/**
 * Restores `manifest`'s tree into the container whose PID 1 is `targetPid`. Throws RestoreError: CGROUP,
 * CRIU (cause: the CriuError with CRIU's log), TIMEOUT, ABORTED, ADOPT, TARGET_GONE. On failure nothing it
 * restored is left running.
 */
export async function restoreIntoContainer(o: RestoreIntoContainerOptions): Promise<RestoredTree> {
  const step = 'criu restore into the target container';
  const logger = o.logger ?? silentLogger;
  const pid = o.targetPid;
  const opened: number[] = [];
  let hostPid: number | undefined;
  const entered = performance.now();
  try {
    // Inherited fds: the source's stdio pipes become the placeholder's (its container log).
    const inheritFds: Array<{ fd: number; key: string }> = [];
    const inheritFrom: Array<{ key: string; from: string }> = [];
    const seen = new Set<string>();
    o.manifest.criu.stdioFds.forEach((key, i) => {
      if (!STDIO_PIPE.test(key) || seen.has(key) || i > 2) return;
      seen.add(key);
      const from = `/proc/${pid}/fd/${i}`;
      let fd: number;
      try {
        fd = openSync(from, i === 0 ? fsConstants.O_RDONLY : fsConstants.O_WRONLY);
      } catch (err) {
        throw new RestoreError(RestoreErrorCode.TARGET_GONE, `cannot open ${from}: ${errorMessage(err)}`, { step, cause: err });
      }
      opened.push(fd);
      inheritFds.push({ fd, key });
      inheritFrom.push({ key, from });
    });
    const netnsKey = o.manifest.criu.netnsKey;
    const ownNetNs = !isNetNsShared(pid);
    if (netnsKey !== undefined) {
      const from = `/proc/${pid}/ns/net`;
      const fd = openSync(from, fsConstants.O_RDONLY);
      opened.push(fd);
      inheritFds.push({ fd, key: netnsKey });
      inheritFrom.push({ key: netnsKey, from });
    }

    const hostPaths = planHostRestorePaths(await readHostMountTable(pid), o.manifest.criu.externalMounts, join(o.workDir, STAND_IN_DIR), (path) => {
      // Only the kind of a stand-in (file or directory) comes from this stat; nothing it names is used.
      try {
        return statSync(join(`/proc/${pid}/root`, path)).isDirectory() ? 'dir' : 'file';
      } catch {
        return 'dir';
      }
    });
    // Before CRIU runs: the recorded credentials of every thread against what the target's spec grants.
    // And the working directory and user the checkpointed process had against the target spec's: CRIU gives the
    // process its own back, so a pod asking for another is another workload.
    const recorded = o.manifest.source;
    if (o.checkCredentials !== false || recorded.cwd !== undefined || recorded.user !== undefined) {
      const rawSpec = await readTargetSpec(hostPaths.root);
      // Privilege first: a process that would gain any is refused for that (RESTORE_CREDENTIALS_EXCEED_SPEC).
      if (o.checkCredentials !== false) {
        const threads = await (o.recordedCredentials ?? readRecordedCredentials(o.imagesDir, o.imageCodec ?? CriuImageCodec.shared()));
        assertCredentialsWithinSpec(threads, specCredentialsOf(rawSpec));
      }
      assertSameProcessIdentity(recorded, rawSpec);
    }
    const options: RestoreOptions = {
      imagesDir: o.imagesDir,
      workDir: o.workDir,
      rootPath: hostPaths.root,
      restoreDetached: true,
      manageCgroupsMode: 'ignore',
      externalMounts: hostPaths.externalMounts.map((m) => ({ key: m.key, mountpoint: m.mountpoint })),
      inheritFds,
      ...(netnsKey !== undefined ? { networkLock: 'skip' as const } : {}),
      ...(o.lazyPages === true ? { lazyPages: true } : {}),
    };
    const cgroupsJoined = o.joinCgroups === false ? [] : await targetCgroupProcsFiles(pid).catch((err: unknown) => {
      throw isThawError(err) ? err : new RestoreError(RestoreErrorCode.TARGET_GONE, `cannot read the cgroups of ${pid}: ${errorMessage(err)}`, { step, cause: err });
    });
    const wrapper = [
      ...(cgroupsJoined.length > 0 ? cgroupJoinWrapper(cgroupsJoined, o.shPath ?? DEFAULT_SH_PATH) : []),
      ...nsenterWrapper(pid, { net: ownNetNs, nsenterPath: o.nsenterPath ?? DEFAULT_NSENTER_PATH }),
    ];
    const t0 = performance.now();
    let res;
    try {
      res = await o.criu.restore(options, undefined, { wrapper, timeoutMs: o.timeoutMs ?? DEFAULT_POD_CRIU_RESTORE_TIMEOUT_MS, ...(o.signal ? { signal: o.signal } : {}) });
    } catch (err) {
      const code = isThawError(err, CriuErrorCode.TIMEOUT)
        ? RestoreErrorCode.TIMEOUT
        : isThawError(err, CriuErrorCode.ABORTED)
          ? RestoreErrorCode.ABORTED
          : RestoreErrorCode.CRIU;
      throw new RestoreError(code, errorMessage(err), { step, cause: err, evidence: { criuCode: isThawError(err) ? err.code : undefined } });
    }
    const t1 = performance.now();
    const criuRestoreMs = t1 - t0;

    // The root is reparented to the placeholder when CRIU exits: find it among its children by its pid there.
    const level = (await nsPids(pid)).length - 1;
    const deadline = Date.now() + ADOPTABLE_WAIT_MS;
    for (;;) {
      for (const child of await childrenOf(pid).catch(() => [])) {
        const ns = await nsPids(child).catch(() => []);
        if (ns[level] === res.pid) hostPid = child;
      }
      if (hostPid !== undefined) break;
      if (Date.now() > deadline) {
        throw new RestoreError(RestoreErrorCode.ADOPT, `the restored root (pid ${res.pid} in the container) did not become a child of the placeholder ${pid}`, {
          step,
          evidence: { restoredPid: res.pid, targetPid: pid, logPath: res.logPath },
        });
      }
      await sleep(20);
    }
    if (cgroupsJoined.length > 0) {
      const check = await sameCgroups(hostPid, pid);
      if (!check.same) {
        throw new RestoreError(RestoreErrorCode.CGROUP, 'the restored tree is not in the target container\'s cgroups', { step, evidence: { ...check } });
      }
    }
    logger.debug('criu restore done', { targetPid: pid, restoredPid: res.pid, hostPid, criuRestoreMs: Math.round(criuRestoreMs) });
    return {
      pid: res.pid,
      hostPid,
      logPath: res.logPath,
      criuRestoreMs,
      checksMs: t0 - entered,
      adoptMs: performance.now() - t1,
      cgroupsJoined,
      options: { ...options, inheritFds: inheritFrom },
    };
  } catch (err) {
    killRestoredTree(hostPid);
    throw err;
  } finally {
    for (const fd of opened) closeSync(fd);
  }
}

/** The log path CRIU writes in `workDir` (for evidence when the restore threw before answering). */
export function restoreLogPath(workDir: string): string {
  return join(workDir, 'restore.log');
}

/**
 * RESTORE_INCOMPATIBLE when the checkpointed process's recorded working directory or user (uid, gid) differs from
 * the target spec's process.cwd / process.user. A manifest that recorded neither passes (written before they were).
 */
export function assertSameProcessIdentity(recorded: { cwd?: string; user?: { uid: number; gid: number } }, spec: unknown): void {
  const step = 'compare the working directory and user with the target spec';
  const proc = ((spec as Record<string, unknown> | null)?.['process'] ?? {}) as Record<string, unknown>;
  const cwd = typeof proc['cwd'] === 'string' ? proc['cwd'] : '/';
  const user = (proc['user'] ?? {}) as Record<string, unknown>;
  const mismatches: Array<{ what: string; expected: string; actual: string }> = [];
  if (recorded.cwd !== undefined && recorded.cwd !== cwd) mismatches.push({ what: 'container.cwd', expected: recorded.cwd, actual: cwd });
  if (recorded.user !== undefined) {
    const uid = typeof user['uid'] === 'number' ? user['uid'] : 0;
    const gid = typeof user['gid'] === 'number' ? user['gid'] : 0;
    if (recorded.user.uid !== uid || recorded.user.gid !== gid) mismatches.push({ what: 'container.user', expected: `${recorded.user.uid}:${recorded.user.gid}`, actual: `${uid}:${gid}` });
  }
  if (mismatches.length > 0) {
    throw new RestoreError(RestoreErrorCode.INCOMPATIBLE, `the target is another workload: ${mismatches.map((m) => `${m.what} ${m.actual}, the checkpoint's ${m.expected}`).join('; ')}`, {
      step,
      evidence: { mismatches },
    });
  }
}
