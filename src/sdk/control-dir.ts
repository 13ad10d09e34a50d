/**
 * The agent side of the worker protocol: the per-container control directory on the host
 * (`<root>/<container-id>`, e.g. /run/thaw/control/<id>, bind-mounted at /snapshot-control in the
 * container), waiting for the worker's ready marker, and writing the agent's markers.
 *
 * Callers: the NRI CreateContainer handler creates the directory; the checkpoint flow waits for
 * ready and writes checkpoint-complete; the restore flow writes restore-complete or restore-failed;
 * the poststop hook removes the directory. None of these is slow except waitForWorkerReady, which
 * must not run inside an NRI handler.
 */
import { chmod, chown, lstat, mkdir, rm } from 'node:fs/promises';
import { join, relative, resolve, sep } from 'node:path';
import { CONTROL_DIR_ERROR_CODES, SdkError } from './errors.js';
import { firstPresent, readPayload, removeEntry, waitForFile, writeFileAtomic, type Payload } from './marker-files.js';
import {
  CHECKPOINT_COMPLETE,
  OUTCOMES,
  READY_MARKERS,
  RESTORE_COMPLETE,
  RESTORE_FAILED,
  SNAPSHOT_COMPLETE,
  type AgentMarker,
  type ReadyMarker,
} from './protocol.js';

/** containerd ids are 64 hex chars; allow other runtimes' names but nothing that could name a path. */
export const MAX_CONTAINER_ID_LENGTH = 128;
const CONTAINER_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

/** Agent markers are read by the worker, which may not run as root; they hold no secrets. */
const AGENT_MARKER_MODE = 0o644;

/**
 * Checks that `containerId` is a single safe path component, so that `<root>/<id>` cannot leave root:
 * 1..128 characters of [A-Za-z0-9_.-], not starting with '.' or '-' (so no '..', no '/', no NUL, no
 * option-looking names). Throws CONTROL_DIR_INVALID_ID.
 */
export function validateContainerId(containerId: string): void {
  const reject = (why: string): never => {
    throw new SdkError(CONTROL_DIR_ERROR_CODES.INVALID_ID, `invalid container id: ${why}`, {
      step: 'validate container id',
      evidence: { containerId: JSON.stringify(containerId).slice(0, 300) },
    });
  };
  if (typeof containerId !== 'string' || containerId.length === 0) reject('empty');
  if (containerId.length > MAX_CONTAINER_ID_LENGTH) reject(`longer than ${MAX_CONTAINER_ID_LENGTH} characters`);
  if (containerId.includes('\0')) reject('contains NUL');
  if (containerId.includes('/') || containerId.includes('\\')) reject('contains a path separator');
  if (containerId.includes('..')) reject("contains '..'");
  if (!CONTAINER_ID_PATTERN.test(containerId)) reject('allowed characters are A-Z a-z 0-9 _ . - and it must start with a letter or digit');
}

/** `<root>/<containerId>` after validation, and checked to be directly inside root. */
export function controlDirPath(root: string, containerId: string): string {
  validateContainerId(containerId);
  const rootAbs = resolve(root);
  const dir = join(rootAbs, containerId);
  const rel = relative(rootAbs, dir);
  if (rel !== containerId || rel.includes(sep)) {
    throw new SdkError(CONTROL_DIR_ERROR_CODES.INVALID_ID, 'container id resolves outside the control root', {
      step: 'validate container id',
      evidence: { root, containerId },
    });
  }
  return dir;
}

export interface CreateControlDirOptions {
  /**
   * Owner of the container's directory. Default root (0:0). A worker that runs as another user cannot
   * write its ready marker into a root-owned 0700 directory: pass the container's process uid/gid.
   * Applied only when the agent runs as root (tests as another user keep their own uid).
   */
  owner?: { uid: number; gid: number };
}

/**
 * Creates `<root>/<containerId>` (and root itself) with mode 0700, owned by root or `options.owner`, and
 * returns its path. Idempotent (NRI may deliver CreateContainer again); refuses a path that exists as
 * anything but a real directory (a symlink planted there would redirect the agent's writes).
 */
export async function createControlDir(root: string, containerId: string, options: CreateControlDirOptions = {}): Promise<string> {
  const dir = controlDirPath(root, containerId);
  const step = 'create control directory';
  const fail = (message: string, cause?: unknown): never => {
    throw new SdkError(CONTROL_DIR_ERROR_CODES.CREATE_FAILED, message, { step, cause, evidence: { dir } });
  };
  try {
    await mkdir(resolve(root), { recursive: true, mode: 0o700 });
    await mkdir(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') fail(`mkdir failed: ${(err as Error).message}`, err);
  }
  const st = await lstat(dir).catch((err: unknown) => fail(`lstat failed: ${(err as Error).message}`, err));
  if (!st.isDirectory() || st.isSymbolicLink()) fail('exists and is not a directory');
  try {
    await chmod(dir, 0o700); // mkdir's mode is masked by the umask
    const owner = options.owner ?? { uid: 0, gid: 0 };
    if (process.getuid?.() === 0) await chown(dir, owner.uid, owner.gid);
  } catch (err) {
    fail(`chmod/chown failed: ${(err as Error).message}`, err);
  }
  return dir;
}

/** Removes `<root>/<containerId>` and what is in it; a missing directory is fine (poststop may run twice). */
export async function removeControlDir(root: string, containerId: string): Promise<void> {
  const dir = controlDirPath(root, containerId);
  try {
    await rm(dir, { recursive: true, force: true });
  } catch (err) {
    throw new SdkError(CONTROL_DIR_ERROR_CODES.REMOVE_FAILED, `rm failed: ${(err as Error).message}`, {
      step: 'remove control directory',
      cause: err,
      evidence: { dir },
    });
  }
}

export interface WaitForWorkerReadyOptions {
  /** Give up after this long (CONTROL_DIR_WAIT_TIMEOUT); default: wait until the signal fires. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** The fallback poll period; default POLL_INTERVAL_MS. */
  pollIntervalMs?: number;
}

/**
 * Resolves with the ready marker the worker wrote (`ready-for-checkpoint`, or Dynamo's
 * `ready-for-snapshot`). Wakes on fs.watch events and polls as well (the agent is never checkpointed, so
 * its inotify watch is harmless; the poll covers watchers that miss or fail).
 */
export async function waitForWorkerReady(dir: string, options: WaitForWorkerReadyOptions = {}): Promise<ReadyMarker> {
  return waitForFile(dir, READY_MARKERS, {
    ...options,
    watch: true,
    step: 'wait for worker ready',
    errors: { timeout: CONTROL_DIR_ERROR_CODES.WAIT_TIMEOUT, aborted: CONTROL_DIR_ERROR_CODES.ABORTED },
  });
}

/** The ready marker present now, if any (no waiting). */
export async function readyMarkerPresent(dir: string): Promise<ReadyMarker | undefined> {
  return firstPresent(dir, READY_MARKERS);
}

/** The JSON payload the worker wrote with its ready marker ({} for an empty marker, undefined if absent). */
export async function readReadyPayload(dir: string, marker: ReadyMarker): Promise<Payload | undefined> {
  return readPayload(dir, marker, { invalid: CONTROL_DIR_ERROR_CODES.INVALID_PAYLOAD, step: 'read ready payload' });
}

/**
 * Writes an agent marker atomically. `checkpoint-complete` is written together with Dynamo's
 * `snapshot-complete`, so a Dynamo worker waiting for that name wakes too. `payload` (a JSON object)
 * may tell the worker more, e.g. why a restore failed.
 */
export async function writeMarker(dir: string, marker: AgentMarker, payload?: Payload): Promise<void> {
  if (!(OUTCOMES as readonly string[]).includes(marker)) {
    throw new SdkError(CONTROL_DIR_ERROR_CODES.INVALID_MARKER, `not a marker the agent writes: ${JSON.stringify(marker)}`, {
      step: 'write marker',
      evidence: { dir, marker, allowed: [...OUTCOMES] },
    });
  }
  const names = marker === CHECKPOINT_COMPLETE ? [CHECKPOINT_COMPLETE, SNAPSHOT_COMPLETE] : [marker];
  for (const name of names) {
    try {
      await writeFileAtomic(dir, name, payload, AGENT_MARKER_MODE);
    } catch (err) {
      throw new SdkError(CONTROL_DIR_ERROR_CODES.WRITE_FAILED, `writing ${name} failed: ${(err as Error).message}`, {
        step: 'write marker',
        cause: err,
        evidence: { dir, name, errno: (err as NodeJS.ErrnoException).code },
      });
    }
  }
}

/**
 * Removes restore-complete and restore-failed left by an earlier attempt, so a restored worker cannot
 * wake on a stale one (Dynamo deletes restore-complete before each restore). Call before the restore.
 */
export async function clearStaleMarkers(dir: string): Promise<void> {
  for (const name of [RESTORE_COMPLETE, RESTORE_FAILED]) {
    try {
      await removeEntry(dir, name);
    } catch (err) {
      throw new SdkError(CONTROL_DIR_ERROR_CODES.WRITE_FAILED, `removing stale ${name} failed: ${(err as Error).message}`, {
        step: 'clear stale markers',
        cause: err,
        evidence: { dir, name },
      });
    }
  }
}
