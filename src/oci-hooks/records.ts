/**
 * What the create-runtime hook leaves in the container's control directory for the agent, which reads it
 * after the container started (the hook and the agent never talk otherwise). Written before any process of
 * the pod runs and read before the restore, so nothing of the workload can have forged it. The directory
 * is still the pod's (a fallback's original command, or a restored worker, may plant entries in it later),
 * so writes and reads go through marker-files.ts: dir fd, O_EXCL random names, regular files only, a size
 * cap.
 */
import { readEntry, writeEntryAtomic } from '../sdk/index.js';

/** The hook failed: the container runs its original command. Payload: HookFailedRecord. */
export const HOOK_FAILED_FILE = 'hook-failed';
/** The hook succeeded. Payload: HookDoneRecord. Hidden: it is thaw's, not part of the worker protocol. */
export const HOOK_DONE_FILE = '.thaw-hook.json';
/**
 * Written (before HOOK_DONE_FILE) when the hook applied a rootfs diff that the agent must undo before a cold
 * start: thaw-pause, at its deadline without the agent, exits instead of running the original command on it
 * (native/thaw-pause.c, THAW_PAUSE_DIFF_MARKER).
 */
export const DIFF_APPLIED_FILE = '.thaw-diff-applied';

/**
 * Written by the agent when the checkpoint a hook waits for (a pull in progress) will not arrive. Payload:
 * HookFailedRecord (the pull's error code and reason).
 */
export const CHECKPOINT_UNAVAILABLE_FILE = '.thaw-checkpoint-unavailable';
/**
 * overlay mode: the empty file the agent makes in the control directory at CreateContainer, onto which the hook
 * bind-mounts the original entrypoint (create-runtime.ts, originalEntrypointPath).
 */
export const ORIGINAL_ENTRYPOINT_FILE = '.thaw-original-entrypoint';

export type PlaceholderMode = 'args' | 'overlay';

export interface HookDoneRecord {
  mode: PlaceholderMode;
  /** overlay mode: the path (inside the container, absolute, no symlinks) that thaw-pause is mounted over. */
  overlayPath?: string;
  /** overlay mode: where the original entrypoint is also mounted (inside the container; thaw-pause's THAW_PAUSE_ORIGINAL). */
  originalPath?: string;
  rootfsDiff?: { entries: number; deleted: number; ms: number };
  /** The diff's undo backup could not be removed after a successful apply: its name and why (it stays in the rootfs). */
  undoBackupLeft?: string;
  /** How long the hook waited for a checkpoint being pulled. */
  waitCheckpointMs?: number;
  /** The hook's work. */
  ms: number;
  /** Before the work: the runtime's spawn of Node.js, its start and the module loading (ms since the process began). */
  startupMs?: number;
}

export interface HookFailedRecord {
  code: string;
  reason: string;
}

async function writeAtomic(dir: string, name: string, value: unknown): Promise<void> {
  await writeEntryAtomic(dir, name, `${JSON.stringify(value)}\n`, 0o644);
}

export function writeCheckpointUnavailable(dir: string, record: HookFailedRecord): Promise<void> {
  return writeAtomic(dir, CHECKPOINT_UNAVAILABLE_FILE, record);
}

export function writeHookDone(dir: string, record: HookDoneRecord): Promise<void> {
  return writeAtomic(dir, HOOK_DONE_FILE, record);
}

export function writeDiffApplied(dir: string, record: { entries: number; deleted: number }): Promise<void> {
  return writeAtomic(dir, DIFF_APPLIED_FILE, record);
}

export function writeHookFailed(dir: string, record: HookFailedRecord): Promise<void> {
  return writeAtomic(dir, HOOK_FAILED_FILE, record);
}

/** The hook's outcome as recorded, or `missing` when it left nothing (it did not run). */
export type HookOutcome =
  | { kind: 'done'; record: HookDoneRecord }
  | { kind: 'failed'; record: HookFailedRecord }
  | { kind: 'missing' };

async function readJson(dir: string, name: string): Promise<unknown> {
  try {
    const text = await readEntry(dir, name, 'read hook record');
    return text === undefined ? undefined : (JSON.parse(text) as unknown);
  } catch (err) {
    // A record we cannot read is as good as a failure: the agent must not restore on a guess.
    return { code: 'HOOK_RECORD_UNREADABLE', reason: (err as Error).message };
  }
}

/** Reads what the hook recorded; hook-failed wins over done (the hook may have failed after writing). */
export async function readHookOutcome(dir: string): Promise<HookOutcome> {
  const failed = await readJson(dir, HOOK_FAILED_FILE);
  if (failed !== undefined) {
    const f = failed as Partial<HookFailedRecord>;
    return { kind: 'failed', record: { code: String(f.code ?? 'HOOK_FAILED'), reason: String(f.reason ?? 'hook-failed present') } };
  }
  const done = await readJson(dir, HOOK_DONE_FILE);
  if (done === undefined) return { kind: 'missing' };
  const d = done as Partial<HookDoneRecord> & { code?: string; reason?: string };
  if (d.mode !== 'args' && d.mode !== 'overlay') {
    return { kind: 'failed', record: { code: d.code ?? 'HOOK_RECORD_INVALID', reason: d.reason ?? `${HOOK_DONE_FILE} has no valid mode` } };
  }
  if (d.mode === 'overlay' && (typeof d.overlayPath !== 'string' || !d.overlayPath.startsWith('/'))) {
    return { kind: 'failed', record: { code: 'HOOK_RECORD_INVALID', reason: `${HOOK_DONE_FILE}: overlay mode without an absolute overlayPath` } };
  }
  if (d.originalPath !== undefined && (typeof d.originalPath !== 'string' || !d.originalPath.startsWith('/'))) {
    return { kind: 'failed', record: { code: 'HOOK_RECORD_INVALID', reason: `${HOOK_DONE_FILE}: originalPath is not an absolute path` } };
  }
  return { kind: 'done', record: d as HookDoneRecord };
}
