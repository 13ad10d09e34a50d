/**
 * CRIU restore of a checkpoint into a running placeholder container (design.md, Restore step 3;
 * restore-recipe.md shows the same steps with CRIU's command line).
 *
 * The restorer runs inside the target's namespaces: a shell joins the target's cgroups (restore-cgroups.ts),
 * execs nsenter into its mount, PID, IPC and UTS namespaces, which forks CRIU's swrk there. CRIU then
 * recreates the tree with `--root /` (the target's root), its own nested PID namespace under the
 * placeholder, the source's external mounts bound from the same paths in the target, and the source's
 * stdout/stderr pipes replaced by the placeholder's (so the worker writes to the new container's log).
 * When CRIU exits, the tree's root is reparented to the placeholder (the PID namespace's init), which is
 * what thaw-pause adopts on SIGUSR1; restoreIntoContainer waits for that.
 */
import { closeSync, constants as fsConstants, openSync, readlinkSync } from 'node:fs';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage, isThawError } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import type { Manifest } from '../store/manifest.js';
import { CriuClient, nsenterWrapper } from './criu/client.js';
import { CriuErrorCode } from './criu/errors.js';
import type { RestoreOptions } from './criu/options.js';
import { cgroupJoinWrapper, sameCgroups, targetCgroupProcsFiles } from './restore-cgroups.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';
import { DEFAULT_NSENTER_PATH, DEFAULT_POD_CRIU_RESTORE_TIMEOUT_MS } from '../defaults.js';

/** CRIU exits right after its answer; the reparenting to the placeholder follows at once. */
export const ADOPTABLE_WAIT_MS = 10_000;
export const DEFAULT_SH_PATH = '/bin/sh';
const STDIO_PIPE = /^pipe:\[\d+\]$/;

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
}

export interface RestoredTree {
  /** The root's pid in the target's PID namespace (as CRIU answered). */
  pid: number;
  /** The root's pid on the host. */
  hostPid: number;
  logPath: string;
  criuRestoreMs: number;
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

    const options: RestoreOptions = {
      imagesDir: o.imagesDir,
      workDir: o.workDir,
      rootPath: '/',
      restoreDetached: true,
      manageCgroupsMode: 'ignore',
      externalMounts: o.manifest.criu.externalMounts.map((m) => ({ key: m.key, mountpoint: m.path })),
      inheritFds,
      ...(netnsKey !== undefined ? { networkLock: 'skip' as const } : {}),
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
    const criuRestoreMs = performance.now() - t0;

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
