/**
 * File primitives of the worker protocol, shared by the agent side (control-dir.ts), the create-runtime
 * hook's records (oci-hooks/records.ts) and the TypeScript worker (worker.ts): atomic marker writes,
 * payload reads, and waiting for the first of several names.
 *
 * A control directory is shared with the pod, so for the agent (root, on the host) it is hostile
 * territory: the pod may plant symlinks, hard links, FIFOs, device nodes or huge files under any name.
 * The contract of every function here:
 * - the directory is opened once with O_DIRECTORY|O_NOFOLLOW and entries are addressed through that
 *   directory object (`/proc/self/fd/<dirfd>/<name>`), never by re-walking the path;
 * - `name` is one path component (no '/', not '.' or '..');
 * - a read opens the entry with O_PATH|O_NOFOLLOW (which opens nothing: no FIFO blocks, no device's open
 *   runs), fstats it, and reads only a regular file with one link and at most MARKER_MAX_BYTES, reopened
 *   through that very O_PATH fd (the inode that was checked, not the name again);
 * - a write creates a random name with O_CREAT|O_EXCL|O_NOFOLLOW and renames it over `name` inside the
 *   directory: whatever the pod left at `name` (a symlink to a host file, a hard link) is replaced as a
 *   directory entry and never written through;
 * - an existence check is an lstat (never follows a symlink).
 */
import { randomBytes } from 'node:crypto';
import { constants as fsc, watch, type FSWatcher } from 'node:fs';
import { lstat, open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { POLL_INTERVAL_MS, TEMP_PREFIX } from './protocol.js';
import { CONTROL_DIR_ERROR_CODES, SdkError, type SdkErrorCode } from './errors.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';


/**
 * The largest marker or record read from a control directory. Markers are empty or a small JSON object
 * (a ready payload, a hook record); the cap keeps a planted huge file (or a sparse one) from swelling the
 * agent.
 */
export const MARKER_MAX_BYTES = 64 * 1024;

/** Linux's O_PATH (the same value on x86-64 and arm64); Node's fs.constants does not export it. */
const O_PATH = 0o10000000;

export type Payload = Record<string, unknown>;

const unsafe = (dir: string, name: string, why: string, step: string, cause?: unknown): SdkError =>
  new SdkError(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY, `${name} in the control directory ${why}`, { step, cause, evidence: { dir, name } });

function checkName(dir: string, name: string, step: string): void {
  if (name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
    throw unsafe(dir, JSON.stringify(name), 'is not a single path component', step);
  }
}

/**
 * Opens `dir` itself as a directory object, refusing a symlink in its place. The caller closes it;
 * entries are then reached with entryPath().
 */
export async function openDir(dir: string): Promise<FileHandle> {
  return open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW);
}

/** `name` inside the directory object `dh` (the directory opened, not its path walked again). */
export function entryPath(dh: FileHandle, name: string): string {
  return `/proc/self/fd/${dh.fd}/${name}`;
}

/**
 * The content of `dir/name` as a string, or undefined when absent, under the rules above: refuses (with
 * CONTROL_DIR_UNSAFE_ENTRY) anything but a regular file with one link of at most `maxBytes`.
 */
export async function readEntry(dir: string, name: string, step: string, maxBytes = MARKER_MAX_BYTES): Promise<string | undefined> {
  checkName(dir, name, step);
  let dh: FileHandle;
  try {
    dh = await openDir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    let ph: FileHandle;
    try {
      ph = await open(entryPath(dh, name), O_PATH | fsc.O_NOFOLLOW);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const st = await ph.stat();
      if (!st.isFile()) throw unsafe(dir, name, 'is not a regular file (a symlink, FIFO, device, socket or directory)', step);
      if (st.nlink !== 1) throw unsafe(dir, name, `has ${st.nlink} hard links`, step);
      if (st.size > maxBytes) throw unsafe(dir, name, `is larger than ${maxBytes} bytes`, step);
      // Reopen the inode just checked (the O_PATH fd's magic link), non-blocking for good measure.
      const fh = await open(`/proc/self/fd/${ph.fd}`, fsc.O_RDONLY | fsc.O_NONBLOCK);
      try {
        // Read at most maxBytes + 1: the size was checked, but the file may grow while we read it.
        const buf = Buffer.alloc(maxBytes + 1);
        let n = 0;
        for (;;) {
          const { bytesRead } = await fh.read(buf, n, buf.length - n, null);
          if (bytesRead === 0) break;
          n += bytesRead;
          if (n > maxBytes) throw unsafe(dir, name, `grew above ${maxBytes} bytes while read`, step);
        }
        return buf.subarray(0, n).toString('utf8');
      } finally {
        await fh.close();
      }
    } finally {
      await ph.close();
    }
  } finally {
    await dh.close();
  }
}

/**
 * Writes `dir/name` so that a reader sees either no file or the whole content: a random name created
 * with O_EXCL|O_NOFOLLOW inside the directory object, fsync, rename over `name` within that directory,
 * then fsync of the directory so the rename survives a crash. The content is the payload as JSON, or
 * empty when there is none (Dynamo's markers are empty files).
 */
export async function writeFileAtomic(dir: string, name: string, payload: Payload | undefined, mode = 0o600): Promise<void> {
  const data = payload === undefined ? '' : `${JSON.stringify(payload)}\n`;
  await writeEntryAtomic(dir, name, data, mode);
}

/** writeFileAtomic with the content given as a string. */
export async function writeEntryAtomic(dir: string, name: string, data: string, mode = 0o600): Promise<void> {
  checkName(dir, name, 'write marker');
  const dh = await openDir(dir);
  try {
    const tmp = entryPath(dh, `${TEMP_PREFIX}${name}-${randomBytes(8).toString('hex')}`);
    const fh = await open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW | fsc.O_NONBLOCK, mode);
    try {
      await fh.writeFile(data);
      await fh.chmod(mode); // open's mode is masked by the umask
      await fh.sync();
    } catch (err) {
      await fh.close().catch(() => undefined);
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    await fh.close();
    try {
      await rename(tmp, entryPath(dh, name));
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    await dh.sync();
  } finally {
    await dh.close();
  }
}

/** Removes `dir/name` (the entry itself, whatever it is but a directory); false when it was absent. */
export async function removeEntry(dir: string, name: string): Promise<boolean> {
  checkName(dir, name, 'remove marker');
  const dh = await openDir(dir);
  try {
    await unlink(entryPath(dh, name));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  } finally {
    await dh.close();
  }
}

/** The JSON object in `dir/name`: undefined when the file is absent, {} when it is empty. */
export async function readPayload(
  dir: string,
  name: string,
  errors: { invalid: SdkErrorCode; step: string },
): Promise<Payload | undefined> {
  const text = await readEntry(dir, name, errors.step);
  if (text === undefined) return undefined;
  if (text.trim() === '') return {};
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (cause) {
    throw new SdkError(errors.invalid, `${name} does not hold JSON`, { step: errors.step, cause, evidence: { dir, name, text: text.slice(0, 200) } });
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new SdkError(errors.invalid, `${name} holds JSON that is not an object`, { step: errors.step, evidence: { dir, name, text: text.slice(0, 200) } });
  }
  return value as Payload;
}

/**
 * Whether `dir/name` exists as any kind of entry. lstat: a planted symlink is seen as present (its
 * reader then refuses it) and never followed; lstat of a FIFO or device opens nothing.
 */
async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return false;
    throw err;
  }
}

/**
 * The first of `names` (in the given order) present in `dir`, or undefined. The names are ours (protocol
 * constants); only their last component is looked up without following, so `dir` itself must be a path
 * the caller trusts (the agent's `<root>/<id>`, or the worker's own mount).
 */
export async function firstPresent<T extends string>(dir: string, names: readonly T[]): Promise<T | undefined> {
  for (const name of names) if (await exists(`${dir}/${name}`)) return name;
  return undefined;
}

export interface WaitForFileOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
  pollIntervalMs?: number;
  /** Wake on fs.watch (inotify) events as well as on the poll timer. */
  watch: boolean;
  step: string;
  errors: { timeout: SdkErrorCode; aborted: SdkErrorCode };
}

/**
 * Waits until one of `names` exists in `dir` and returns it (the first in `names` order when several do).
 * The poll timer always runs: fs.watch may be unavailable, may miss events (a directory replaced
 * underneath it) or fail later, and then the wait simply goes on by polling. Rejects with
 * `errors.timeout` after timeoutMs and `errors.aborted` when the signal fires; every timer, watcher and
 * listener is released before it settles.
 */
export async function waitForFile<T extends string>(dir: string, names: readonly T[], options: WaitForFileOptions): Promise<T> {
  const pollIntervalMs = options.pollIntervalMs ?? POLL_INTERVAL_MS;
  const { signal, step } = options;
  const deadline = options.timeoutMs === undefined ? undefined : Date.now() + options.timeoutMs;
  const aborted = () =>
    new SdkError(options.errors.aborted, 'aborted while waiting', { step, cause: signal?.reason, evidence: { dir, names } });
  if (signal?.aborted) throw aborted();

  let wake: (() => void) | undefined;
  // An event can arrive while firstPresent() is running, before `wake` is set: remember it, or the wait
  // below would sleep a whole poll period on a marker that is already there.
  let poked = false;
  const poke = () => {
    poked = true;
    wake?.();
  };
  let watcher: FSWatcher | undefined;
  if (options.watch) {
    try {
      watcher = watch(dir, { persistent: false }, poke);
      watcher.on('error', () => {
        watcher?.close();
        watcher = undefined;
      });
    } catch {
      watcher = undefined; // no such directory yet, or no inotify: polling alone
    }
  }
  signal?.addEventListener('abort', poke);
  try {
    for (;;) {
      poked = false;
      const found = await firstPresent(dir, names);
      if (found !== undefined) return found;
      if (signal?.aborted) throw aborted();
      const leftMs = deadline === undefined ? Infinity : deadline - Date.now();
      if (leftMs <= 0) {
        throw new SdkError(options.errors.timeout, `none of ${names.join(', ')} appeared within ${options.timeoutMs} ms`, {
          step,
          evidence: { dir, names, timeoutMs: options.timeoutMs },
        });
      }
      await new Promise<void>((resolve) => {
        if (poked) return resolve();
        const timer = setTimeout(done, Math.min(pollIntervalMs, leftMs, MAX_TIMER_DELAY_MS));
        function done(): void {
          clearTimeout(timer);
          wake = undefined;
          resolve();
        }
        wake = done;
      });
    }
  } finally {
    signal?.removeEventListener('abort', poke);
    watcher?.close();
  }
}
