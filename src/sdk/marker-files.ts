/**
 * File primitives of the worker protocol, shared by the agent side (control-dir.ts) and the TypeScript
 * worker (worker.ts): atomic marker writes, payload reads, and waiting for the first of several names.
 */
import { randomBytes } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { POLL_INTERVAL_MS, TEMP_PREFIX } from './protocol.js';
import { SdkError, type SdkErrorCode } from './errors.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';


export type Payload = Record<string, unknown>;

/**
 * Writes `dir/name` so that a reader sees either no file or the whole content: a temporary name in the
 * same directory, fsync, rename, then fsync of the directory so the rename survives a crash. The content
 * is the payload as JSON, or empty when there is none (Dynamo's markers are empty files).
 */
export async function writeFileAtomic(dir: string, name: string, payload: Payload | undefined, mode = 0o600): Promise<void> {
  const data = payload === undefined ? '' : `${JSON.stringify(payload)}\n`;
  const tmp = join(dir, `${TEMP_PREFIX}${name}-${process.pid}-${randomBytes(4).toString('hex')}`);
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await fh.close();
  try {
    await rename(tmp, join(dir, name));
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  const dh = await open(dir, 'r');
  try {
    await dh.sync();
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
  let text: string;
  try {
    text = await readFile(join(dir, name), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
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

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return false;
    throw err;
  }
}

/** The first of `names` (in the given order) present in `dir`, or undefined. */
export async function firstPresent<T extends string>(dir: string, names: readonly T[]): Promise<T | undefined> {
  for (const name of names) if (await exists(join(dir, name))) return name;
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
