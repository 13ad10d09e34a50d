/**
 * The worker side of the protocol for TypeScript workers (the Python twin is sdk/python/thaw_worker.py).
 *
 * ```ts
 * import { checkpointAndWait } from '<thaw>/src/sdk/worker.js';
 * // after the model is loaded and warmed up:
 * const outcome = await checkpointAndWait({
 *   release: async () => { await engine.sleep(); },   // free what need not be saved
 *   resume: async () => { await engine.wakeUp(); },  // after checkpoint-complete or restore-complete
 * });
 * if (outcome === 'restore-complete') reconnect();   // a new pod: re-open connections, then serve
 * ```
 *
 * Waiting polls every 10 ms by default (protocol.ts says why); polling, deliberately: the wait spans the checkpoint, and a
 * watch (fs.watch is inotify) open during the CRIU dump becomes part of the image, pinned to the source
 * pod's control directory, which a restore on another pod or node cannot reopen. `watch: true` opts in
 * to inotify for waits that no checkpoint spans.
 */
import { CONTROL_DIR_ENV, DEFAULT_CONTROL_DIR, LEGACY_CONTROL_DIR_ENV, OUTCOME_FILES, READY_FOR_CHECKPOINT, RESTORE_COMPLETE, type Outcome } from './protocol.js';
import { SdkErrorCode, SdkError } from './errors.js';
import { firstPresent, readPayload, waitForFile, writeFileAtomic, type Payload } from './marker-files.js';

export type { Outcome } from './protocol.js';

export interface ControlDirOptions {
  /** Default: env SNAPSHOT_CONTROL_DIR, then DYN_SNAPSHOT_CONTROL_DIR, then /snapshot-control. */
  path?: string;
  /** Where the env vars are read from; default process.env. */
  env?: NodeJS.ProcessEnv;
  /** Poll period; default POLL_INTERVAL_MS (10). */
  pollIntervalMs?: number;
  /** Also wake on fs.watch events; default false (see the module comment). */
  watch?: boolean;
}

export interface WaitOptions {
  /** Give up after this long (SDK_WAIT_TIMEOUT); default: wait until an outcome or the signal. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

const FILE_NAMES = OUTCOME_FILES.map(([file]) => file);
const OUTCOME_OF = new Map<string, Outcome>(OUTCOME_FILES.map(([file, outcome]) => [file, outcome]));

/** The control directory the worker uses, from options or the environment. */
export function resolveControlDirPath(options: Pick<ControlDirOptions, 'path' | 'env'> = {}): string {
  const env = options.env ?? process.env;
  return options.path ?? (env[CONTROL_DIR_ENV] || env[LEGACY_CONTROL_DIR_ENV] || DEFAULT_CONTROL_DIR);
}

export class ControlDir {
  readonly path: string;
  private readonly pollIntervalMs: number | undefined;
  private readonly watch: boolean;

  constructor(options: ControlDirOptions = {}) {
    this.path = resolveControlDirPath(options);
    this.pollIntervalMs = options.pollIntervalMs;
    this.watch = options.watch ?? false;
  }

  /**
   * Tells the agent "initialised and quiesced; checkpoint me" by writing ready-for-checkpoint atomically,
   * with `payload` (a JSON object) as its content when given. Call it after releasing what need not be
   * saved; the agent may freeze the process at any moment after this resolves.
   */
  async readyForCheckpoint(payload?: Payload): Promise<void> {
    if (payload !== undefined && (payload === null || typeof payload !== 'object' || Array.isArray(payload))) {
      throw new SdkError(SdkErrorCode.INVALID_PAYLOAD, 'payload must be a JSON object', { step: 'write ready-for-checkpoint' });
    }
    try {
      await writeFileAtomic(this.path, READY_FOR_CHECKPOINT, payload);
    } catch (err) {
      throw new SdkError(SdkErrorCode.WRITE_FAILED, `writing ${READY_FOR_CHECKPOINT} failed: ${(err as Error).message}`, {
        step: 'write ready-for-checkpoint',
        cause: err,
        evidence: { dir: this.path, errno: (err as NodeJS.ErrnoException).code },
      });
    }
  }

  /**
   * Resolves with the first outcome the agent reports: checkpoint-complete (or Dynamo's
   * snapshot-complete), restore-complete or restore-failed. When several are present, restore-failed
   * wins over restore-complete, and that over checkpoint-complete.
   */
  async wait(options: WaitOptions = {}): Promise<Outcome> {
    const file = await waitForFile(this.path, FILE_NAMES, {
      ...options,
      ...(this.pollIntervalMs === undefined ? {} : { pollIntervalMs: this.pollIntervalMs }),
      watch: this.watch,
      step: 'wait for the agent',
      errors: { timeout: SdkErrorCode.WAIT_TIMEOUT, aborted: SdkErrorCode.ABORTED },
    });
    return OUTCOME_OF.get(file) as Outcome;
  }

  /** The outcome present now, without waiting. */
  async outcome(): Promise<Outcome | undefined> {
    const file = await firstPresent(this.path, FILE_NAMES);
    return file === undefined ? undefined : OUTCOME_OF.get(file);
  }

  /** True when this process was restored from a checkpoint (restore-complete is present). */
  async wasRestored(): Promise<boolean> {
    return (await firstPresent(this.path, [RESTORE_COMPLETE])) !== undefined;
  }

  /** The JSON object the agent wrote with a marker ({} for an empty one, undefined if absent). */
  async payload(outcome: Outcome): Promise<Payload | undefined> {
    return readPayload(this.path, outcome, { invalid: SdkErrorCode.INVALID_PAYLOAD, step: `read ${outcome}` });
  }
}

/** What a framework integration provides (vLLM sleep/wake_up, SGLang memory release, ...). */
export interface QuiesceHooks {
  /** Free what need not be saved (KV cache, allocator caches) before the checkpoint. */
  release?: () => void | Promise<void>;
  /** Undo release after checkpoint-complete or restore-complete. */
  resume?: () => void | Promise<void>;
}

export interface CheckpointAndWaitOptions extends QuiesceHooks, WaitOptions {
  controlDir?: ControlDir;
  /** Content of ready-for-checkpoint. */
  payload?: Payload;
}

/**
 * The whole worker side in one call: release(), write ready-for-checkpoint, wait, and resume() after
 * checkpoint-complete or restore-complete. On restore-failed resume() is not called: the agent is
 * abandoning this process and the cold start takes over. Resolves with the outcome.
 */
export async function checkpointAndWait(options: CheckpointAndWaitOptions = {}): Promise<Outcome> {
  const dir = options.controlDir ?? new ControlDir();
  await options.release?.();
  await dir.readyForCheckpoint(options.payload);
  const waitOptions: WaitOptions = {};
  if (options.timeoutMs !== undefined) waitOptions.timeoutMs = options.timeoutMs;
  if (options.signal !== undefined) waitOptions.signal = options.signal;
  const outcome = await dir.wait(waitOptions);
  if (outcome !== 'restore-failed') await options.resume?.();
  return outcome;
}
