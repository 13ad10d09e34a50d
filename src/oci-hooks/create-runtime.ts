/**
 * The createRuntime hook of a restore target (design.md, Restore step 2). runc runs it during `create`,
 * in the runtime's namespaces, after the container's mount namespace is set up and before pivot_root,
 * so `<bundle>/rootfs` is the container's root in both views and nothing of the pod runs yet.
 *
 * It (1) applies the checkpoint's rootfs diff into the rootfs and (2) in overlay mode (containerd 1.7-2.1,
 * no NRI args) bind-mounts thaw-pause over the resolved entrypoint inside the container's mount namespace
 * (restore-recipe.md, last section), then records what it did for the agent (records.ts).
 *
 * It never fails the container: a failed hook would fail the pod, and a cold start is always possible. On
 * any error it removes the overlay if it made one, undoes the rootfs diff if it applied one (undo.ts of the
 * rootfs diff: the cold start runs on the image's own rootfs), writes `hook-failed` with the reason, prints one
 * line on stderr and returns normally; the container then runs its original command. The one exception: when
 * that undo fails too, the rootfs is half changed and the result says `mustNotStart` (main.ts then exits
 * non-zero, so runc fails this create and nothing runs on it).
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { access, lstat, mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { errorMessage, isThawError } from '../errors.js';
import { applyRootfsDiff, discardUndo, undoRootfsDiff, type UndoJournal } from '../restore-engine/rootfs-diff/index.js';
import { DELETED_FILES_FILE_NAME, MANIFEST_FILE_NAME, ROOTFS_DIFF_FILE_NAME } from '../store/manifest.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { resolveEntrypoint, resolveInRoot } from './entrypoint.js';
import { HookError, HookErrorCode } from './errors.js';
import { readEntry } from '../sdk/index.js';
import { CHECKPOINT_UNAVAILABLE_FILE, writeDiffApplied, writeHookDone, writeHookFailed, type HookDoneRecord, type PlaceholderMode } from './records.js';
import { envValue, parseOciConfig, type OciState } from './state.js';
import { DEFAULT_NSENTER_PATH } from '../defaults.js';

const execFileP = promisify(execFile);

/** Hooks get no PATH: every tool by absolute path. */
export const DEFAULT_MOUNT_PATH = '/usr/bin/mount';
export const DEFAULT_UMOUNT_PATH = '/usr/bin/umount';
/** One mount command; a stuck one must not eat the hook's whole timeout. */
export const MOUNT_TIMEOUT_MS = 5_000;
/** The rootfs diff of a large image layer; well under the hook timeout the agent sets. */
export const ROOTFS_DIFF_TIMEOUT_MS = 60_000;

export interface CreateRuntimeOptions {
  mode: PlaceholderMode;
  /** Host path of the container's control directory. */
  controlDir: string;
  /** Host path of the checkpoint directory (holds rootfs-diff.tar and deleted-files.json when there is a diff). */
  checkpointDir: string;
  /** Host path of the thaw-pause binary (overlay mode). */
  thawPausePath: string;
  nsenterPath?: string;
  mountPath?: string;
  umountPath?: string;
  /**
   * The checkpoint is still being pulled into `checkpointDir` (its manifest.json appears when it is published):
   * wait for it this long, polling, unless the agent writes CHECKPOINT_UNAVAILABLE_FILE into the control
   * directory first. Absent: the checkpoint is there already.
   */
  waitCheckpointMs?: number;
  /**
   * The sha256 (hex) of rootfs-diff.tar and of deleted-files.json in the manifest the agent chose and verifies
   * (issue 12, item 6): the hook hashes both files and applies nothing unless they match. Absent: the files are
   * applied as found (an agent that names no digest).
   */
  diffSha256?: { rootfsDiff: string; deletedFiles: string };
  /**
   * The hook's whole budget, in ms from its process's start (performance.now()): the agent passes its OCI
   * hook timeout less HOOK_TIMEOUT_MARGIN_MS. The wait for a pull and the rootfs diff each get only what is
   * left of it (less one MOUNT_TIMEOUT_MS for the overlay); past it the hook gives up, records
   * HOOK_BUDGET_EXCEEDED and the container starts cold, before runc's timeout would kill the hook and fail
   * the pod. Absent: the wait and the diff keep their own limits only.
   */
  budgetMs?: number;
  /**
   * Where to keep the rootfs diff's undo journal after a successful hook (a host file of the agent's, which no
   * pod can reach): the backup then stays in the rootfs, and the agent undoes from this journal when the restore
   * fails later (restore-flow.ts), or drops the backup on restore-complete. Absent: the backup is dropped here.
   */
  undoJournalFile?: string;
  /**
   * overlay mode: an empty file inside the container (absolute, as the container sees it: the agent makes
   * `<control dir>/.thaw-original-entrypoint`) onto which the hook bind-mounts the original entrypoint before it
   * covers it with thaw-pause. thaw-pause execs it (THAW_PAUSE_ORIGINAL) when it falls back with the overlay
   * still in place: its deadline ran out and no agent removed the overlay. Absent: no second mount.
   */
  originalEntrypointPath?: string;
  /** Test seam: fail after the overlay is made (proves it is removed again). */
  failAfterOverlay?: boolean;
  /** ms from the hook process's start to its work (recorded: it is on every restore's critical path). */
  startupMs?: number;
  /**
   * Where budgetMs counts from, on performance.now()'s clock: absent, this process's start (the Node hook); the
   * agent's hook server (src/agent/hook-server.ts) passes the moment the native hook started.
   */
  budgetFrom?: number;
  /**
   * The runtime's view of host paths, prefixed to the bundle (config.json, the rootfs): absent, this process's
   * own (the Node hook runs in the runtime's mount namespace); the agent's hook server passes
   * `/proc/<hook pid>/root`, so that an agent in a DaemonSet's mount namespace (where the container's rootfs
   * mount does not propagate) still reaches the rootfs the runtime mounted, never the empty directory under it.
   */
  hostRoot?: string;
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

async function inMountNs(o: CreateRuntimeOptions, pid: number, argv: string[], step: string): Promise<void> {
  try {
    await execFileP(o.nsenterPath ?? DEFAULT_NSENTER_PATH, ['-t', String(pid), '-m', '--', ...argv], { timeout: MOUNT_TIMEOUT_MS, env: {} });
  } catch (err) {
    const e = err as { stderr?: string; code?: number | string };
    throw new HookError(HookErrorCode.OVERLAY_FAILED, `${argv.join(' ')} in the mount namespace of ${pid} failed: ${(e.stderr ?? errorMessage(err)).trim()}`, {
      step,
      cause: err,
      evidence: { pid, argv, exit: e.code },
    });
  }
}

/** How often the hook looks for a checkpoint being pulled. */
export const CHECKPOINT_POLL_MS = 50;

/** Waits until the checkpoint is published, the agent gives up on it, or `timeoutMs` passes. */
async function waitForCheckpoint(o: CreateRuntimeOptions, timeoutMs: number): Promise<number> {
  const started = performance.now();
  for (;;) {
    if (await exists(join(o.checkpointDir, MANIFEST_FILE_NAME))) return performance.now() - started;
    // Through the control directory's safe reads: a FIFO or a symlink planted there never blocks the hook.
    const unavailable = await readEntry(o.controlDir, CHECKPOINT_UNAVAILABLE_FILE, 'wait for the checkpoint').catch((err: unknown) => `unreadable: ${errorMessage(err)}`);
    if (unavailable !== undefined) {
      throw new HookError(HookErrorCode.CHECKPOINT_UNAVAILABLE, `the checkpoint did not arrive: ${unavailable.trim()}`, { step: 'wait for the checkpoint', evidence: { checkpointDir: o.checkpointDir } });
    }
    if (performance.now() - started > timeoutMs) {
      throw new HookError(HookErrorCode.CHECKPOINT_UNAVAILABLE, `the checkpoint was not published within ${timeoutMs} ms`, { step: 'wait for the checkpoint', evidence: { checkpointDir: o.checkpointDir, timeoutMs } });
    }
    await sleep(CHECKPOINT_POLL_MS);
  }
}

/** sha256 (hex) of a file, streamed. */
async function sha256Of(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Throws HOOK_DIFF_UNVERIFIED unless both files exist with the digests the agent handed over. */
async function checkDiffDigests(tarFile: string, deletedFile: string, expected: { rootfsDiff: string; deletedFiles: string }): Promise<void> {
  const step = 'check the rootfs diff against the verified digests';
  for (const [file, want] of [[tarFile, expected.rootfsDiff], [deletedFile, expected.deletedFiles]] as const) {
    let actual: string;
    try {
      actual = await sha256Of(file);
    } catch (err) {
      throw new HookError(HookErrorCode.DIFF_UNVERIFIED, `cannot hash ${file}: ${errorMessage(err)}`, { step, cause: err, evidence: { file } });
    }
    if (actual !== want) {
      throw new HookError(HookErrorCode.DIFF_UNVERIFIED, `${file} is not the verified one (sha256 ${actual}, expected ${want})`, { step, evidence: { file, actual, expected: want } });
    }
  }
}

/** Parses --diff-sha256 TAR_HEX:DELETED_HEX; undefined for anything else. */
export function parseDiffSha256(value: string | undefined): { rootfsDiff: string; deletedFiles: string } | undefined {
  const m = value === undefined ? null : /^([0-9a-f]{64}):([0-9a-f]{64})$/.exec(value);
  return m === null ? undefined : { rootfsDiff: m[1] as string, deletedFiles: m[2] as string };
}

/** Runs the hook; returns the record it wrote (done or failed). Never throws. */
export async function runCreateRuntime(state: OciState, o: CreateRuntimeOptions): Promise<{ ok: true; record: HookDoneRecord } | { ok: false; code: string; reason: string; mustNotStart?: true }> {
  const started = performance.now();
  let overlayHostPath: string | undefined;
  let originalHostPath: string | undefined;
  // What undoes the applied diff while the hook may still fail (the backup is dropped before hook-done).
  let undo: { rootfs: string; journal: UndoJournal } | undefined;
  try {
    if (state.pid === undefined) throw new HookError(HookErrorCode.STATE_INVALID, 'the state has no pid (createRuntime runs after the init exists)', { step: 'create-runtime hook' });
    const config = parseOciConfig(await readFile(`${o.hostRoot ?? ''}${join(state.bundle, 'config.json')}`, 'utf8'), state.bundle);

    const record: HookDoneRecord = { mode: o.mode, ms: 0, ...(o.startupMs !== undefined ? { startupMs: Math.round(o.startupMs) } : {}) };
    // What is left of the budget for a step that must end before the overlay is made (one MOUNT_TIMEOUT_MS).
    const left = (step: string): number => {
      if (o.budgetMs === undefined) return Infinity;
      // Whole ms: the timers and execFile timeouts downstream take integers only.
      const ms = Math.floor(o.budgetMs - (performance.now() - (o.budgetFrom ?? 0)) - (o.mode === 'overlay' ? MOUNT_TIMEOUT_MS : 0));
      if (ms <= 0) throw new HookError(HookErrorCode.BUDGET_EXCEEDED, `no time left of the hook's ${o.budgetMs} ms budget for: ${step}`, { step, evidence: { budgetMs: o.budgetMs } });
      return ms;
    };
    if (o.waitCheckpointMs !== undefined) record.waitCheckpointMs = Math.round(await waitForCheckpoint(o, Math.min(o.waitCheckpointMs, left('wait for the checkpoint'))));
    const tarFile = join(o.checkpointDir, ROOTFS_DIFF_FILE_NAME);
    const deletedFile = join(o.checkpointDir, DELETED_FILES_FILE_NAME);
    if (o.diffSha256 !== undefined) await checkDiffDigests(tarFile, deletedFile, o.diffSha256);
    if ((await exists(tarFile)) && (await exists(deletedFile))) {
      try {
        const r = await applyRootfsDiff({ rootfs: `${o.hostRoot ?? ''}${config.rootfs}`, tarFile, deletedFilesFile: deletedFile, timeoutMs: Math.min(ROOTFS_DIFF_TIMEOUT_MS, left('apply rootfs diff')), keepUndo: true });
        if (r.undo !== undefined) undo = { rootfs: `${o.hostRoot ?? ''}${config.rootfs}`, journal: r.undo };
        record.rootfsDiff = { entries: r.entries, deleted: r.deleted, ms: Math.round(r.ms) };
      } catch (err) {
        throw new HookError(HookErrorCode.ROOTFS_DIFF_FAILED, errorMessage(err), { step: 'apply rootfs diff', cause: err, evidence: { code: isThawError(err) ? err.code : undefined } });
      }
    }

    if (o.mode === 'overlay') {
      // After the diff: it may have replaced the entrypoint.
      const argv0 = config.args[0] as string;
      // Resolved through the init's view of the mounts: an entrypoint on a CRI bind mount (a GPU pod's Python
      // from the node's /usr, say) exists only in the container's mount namespace, not under the host's rootfs.
      const rootfsView = `/proc/${state.pid}/root${config.rootfs}`;
      const resolved = await resolveEntrypoint(rootfsView, argv0, envValue(config.env, 'PATH'), config.cwd);
      const target = join(config.rootfs, resolved);
      if (o.originalEntrypointPath !== undefined) {
        // Resolved inside the root like the entrypoint (an image symlink on the way stays in the rootfs), and only
        // onto the regular file the agent made: the original stays reachable for a fallback without an agent.
        const at = await resolveInRoot(rootfsView, o.originalEntrypointPath);
        const st = at === undefined ? undefined : await lstat(join(rootfsView, at)).catch(() => undefined);
        if (at !== undefined && st?.isFile() === true) {
          await inMountNs(o, state.pid, [o.mountPath ?? DEFAULT_MOUNT_PATH, '--no-canonicalize', '--bind', target, join(config.rootfs, at)], 'keep the original entrypoint reachable');
          originalHostPath = join(config.rootfs, at);
          record.originalPath = at;
        }
      }
      await inMountNs(o, state.pid, [o.mountPath ?? DEFAULT_MOUNT_PATH, '--no-canonicalize', '--bind', o.thawPausePath, target], 'install the thaw-pause overlay');
      overlayHostPath = target;
      record.overlayPath = resolved;
      if (o.failAfterOverlay) throw new HookError(HookErrorCode.IO, 'failure injected after the overlay (test)', { step: 'create-runtime hook' });
    }
    // Without a journal file for the agent, the backup is dropped here: no `.thaw-undo-*` directory is left.
    if (undo !== undefined && o.undoJournalFile !== undefined) {
      // Written before hook-done: the agent, which reads hook-done first, finds the journal whenever it needs it.
      await mkdir(dirname(o.undoJournalFile), { recursive: true, mode: 0o700 });
      await writeFile(o.undoJournalFile, `${JSON.stringify({ rootfsDiffUndo: undo.journal })}\n`, { mode: 0o600 });
      // For thaw-pause: without an agent to undo it, it must not run the original command on this rootfs.
      if (record.rootfsDiff !== undefined && record.rootfsDiff.entries + record.rootfsDiff.deleted > 0) await writeDiffApplied(o.controlDir, { entries: record.rootfsDiff.entries, deleted: record.rootfsDiff.deleted });
      undo = undefined;
    }
    if (undo !== undefined) {
      const kept = undo;
      undo = undefined;
      try {
        discardUndo(kept.rootfs, kept.journal);
      } catch (err) {
        // The restore can go on (the diff is applied); what is left of the image's originals is reported.
        record.undoBackupLeft = `${kept.journal.backupDir}: ${errorMessage(err)}`;
      }
    }
    record.ms = Math.round(performance.now() - started);
    await writeHookDone(o.controlDir, record);
    return { ok: true, record };
  } catch (err) {
    let code: string = isThawError(err) ? err.code : HookErrorCode.IO;
    let reason = errorMessage(err);
    if (overlayHostPath !== undefined && state.pid !== undefined) {
      try {
        await inMountNs(o, state.pid, [o.umountPath ?? DEFAULT_UMOUNT_PATH, '--no-canonicalize', overlayHostPath], 'remove the thaw-pause overlay');
      } catch (umountErr) {
        // The container would start as thaw-pause with no agent plan for it: say so loudly.
        reason += `; removing the overlay failed too: ${errorMessage(umountErr)}`;
      }
    }
    if (originalHostPath !== undefined && state.pid !== undefined) {
      await inMountNs(o, state.pid, [o.umountPath ?? DEFAULT_UMOUNT_PATH, '--no-canonicalize', originalHostPath], 'remove the original entrypoint mount').catch((umountErr: unknown) => {
        reason += `; removing the original entrypoint's mount failed too: ${errorMessage(umountErr)}`;
      });
    }
    let mustNotStart = false;
    if (undo !== undefined) {
      try {
        undoRootfsDiff(undo.rootfs, undo.journal);
      } catch (undoErr) {
        // Its own cause: this container must not start at all (main.ts exits non-zero, runc fails the create).
        reason = `${code}: ${reason}; undoing the rootfs diff failed too: ${errorMessage(undoErr)}`;
        code = HookErrorCode.UNDO_FAILED;
        mustNotStart = true;
      }
    }
    try {
      await writeHookFailed(o.controlDir, { code, reason });
    } catch (writeErr) {
      reason += `; writing hook-failed failed: ${errorMessage(writeErr)}`;
    }
    return mustNotStart ? { ok: false, code, reason, mustNotStart: true } : { ok: false, code, reason };
  }
}
