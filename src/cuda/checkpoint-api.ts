/**
 * The CUDA side of a checkpoint and a restore, in thaw's terms: typed states, GPU maps as UUID strings,
 * and the multi-process steps the restore engine runs over a container's process tree, each returning
 * how long it took (for the manifest's phaseMs and the metrics).
 *
 * Order of operations (as Dynamo's snapshot agent does it, reference/gpu-checkpoint-landscape.md §1.4-1.5):
 * checkpoint = lock every CUDA process, then checkpoint every one; restore = restore every one, then unlock
 * every one. No process runs CUDA work while a peer is locked or not yet restored.
 */
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { CudaError, CudaErrorCode } from './errors.js';
import { CUprocessState, parseGpuUuid, type CudaDriver, type GpuUuidPair } from './libcuda.js';
import { DEFAULT_CUDA_LOCK_TIMEOUT_MS } from '../defaults.js';

export type CudaProcessState = 'running' | 'locked' | 'checkpointed' | 'failed' | 'checkpointing' | 'restoring';

/** A GPU of the checkpoint (`oldUuid`) and the GPU of this node it is restored onto, "GPU-…" form. */
export interface GpuMapping {
  oldUuid: string;
  newUuid: string;
}

/** How long one multi-process step took: in all, and per pid (ms, rounded to 0.1). */
export interface StepTiming {
  pids: number[];
  totalMs: number;
  perPidMs: Record<number, number>;
}

// A lock that never returns would hang the checkpoint; the driver's own timeout bounds it
// (DEFAULT_CUDA_LOCK_TIMEOUT_MS, src/defaults.ts).

export interface CudaCheckpointApiOptions {
  logger?: Logger;
  /** Clock for timings (ms); default performance.now. */
  now?: () => number;
}

const STATE_NAMES: Record<number, CudaProcessState> = {
  [CUprocessState.RUNNING]: 'running',
  [CUprocessState.LOCKED]: 'locked',
  [CUprocessState.CHECKPOINTED]: 'checkpointed',
  [CUprocessState.FAILED]: 'failed',
  [CUprocessState.CHECKPOINTING]: 'checkpointing',
  [CUprocessState.RESTORING]: 'restoring',
};

const round = (ms: number): number => Math.round(ms * 10) / 10;

function abortIfAborted(signal: AbortSignal | undefined, step: string): void {
  if (signal?.aborted) {
    throw new CudaError(CudaErrorCode.ABORTED, 'aborted by the caller', { step, cause: signal.reason });
  }
}

/**
 * GPU pairs for the driver. Identity pairs are dropped, and a map that is all identity becomes no map:
 * the driver then restores in place instead of taking its migration path (Dynamo does the same).
 */
export function gpuPairsFor(gpuMap: readonly GpuMapping[] | undefined): GpuUuidPair[] {
  if (!gpuMap || gpuMap.length === 0) return [];
  const pairs = gpuMap.map((m) => ({ oldUuid: parseGpuUuid(m.oldUuid), newUuid: parseGpuUuid(m.newUuid) }));
  const identity = pairs.every((p) => Buffer.from(p.oldUuid).equals(Buffer.from(p.newUuid)));
  return identity ? [] : pairs;
}

export class CudaCheckpointApi {
  readonly driver: CudaDriver;
  readonly #log: Logger;
  readonly #now: () => number;

  constructor(driver: CudaDriver, options: CudaCheckpointApiOptions = {}) {
    this.driver = driver;
    this.#log = options.logger ?? silentLogger;
    this.#now = options.now ?? (() => performance.now());
  }

  getState(pid: number): CudaProcessState {
    const state = this.driver.checkpointGetState(pid);
    const name = STATE_NAMES[state];
    if (name === undefined) {
      throw new CudaError(CudaErrorCode.CALL_FAILED, `unknown CUprocessState ${state}`, {
        step: `get checkpoint state of pid ${pid}`,
        pid,
        evidence: { state },
      });
    }
    return name;
  }

  restoreThreadId(pid: number): number {
    return this.driver.checkpointGetRestoreThreadId(pid);
  }

  /** Lock one process; resolves with the time it took (ms). Timeout: CudaError CUDA_CALL_FAILED, CUDA_ERROR_TIMEOUT. */
  async lock(pid: number, options: { timeoutMs: number }): Promise<number> {
    if (!Number.isInteger(options.timeoutMs) || options.timeoutMs <= 0) {
      // 0 is "no timeout" to the driver: thaw never asks for that (a busy worker would hang the checkpoint).
      throw new CudaError(CudaErrorCode.INVALID_ARGUMENT, `timeoutMs must be a positive integer, got ${options.timeoutMs}`, {
        step: `lock pid ${pid}`,
        pid,
      });
    }
    return this.#timed(() => this.driver.checkpointLock(pid, options.timeoutMs));
  }

  checkpoint(pid: number): Promise<number> {
    return this.#timed(() => this.driver.checkpointCheckpoint(pid));
  }

  restore(pid: number, options: { gpuMap?: readonly GpuMapping[] } = {}): Promise<number> {
    return this.#timed(() => this.driver.checkpointRestore(pid, gpuPairsFor(options.gpuMap)));
  }

  unlock(pid: number): Promise<number> {
    return this.#timed(() => this.driver.checkpointUnlock(pid));
  }

  async #timed(call: () => Promise<void>): Promise<number> {
    const started = this.#now();
    await call();
    return round(this.#now() - started);
  }

  /**
   * The pids (of a container's process tree) that are CUDA processes: those for which the driver returns
   * a restore thread id. Dynamo's technique, and CRIU's CUDA plugin's (`--get-restore-tid`): getState
   * also answers for `--launch-job` coordinators that hold no GPU state. Any failure means "not CUDA"
   * (driver 580 answers CUDA_ERROR_NOT_INITIALIZED for a non-CUDA pid); each is logged at debug level with
   * its name. Note: a process that has merely called cuInit counts as a CUDA process (the agent itself does).
   */
  findCudaProcesses(pids: readonly number[]): number[] {
    const found: number[] = [];
    for (const pid of pids) {
      try {
        this.driver.checkpointGetRestoreThreadId(pid);
        found.push(pid);
      } catch (err) {
        const name = err instanceof CudaError ? err.resultName : undefined;
        this.#log.debug('not a CUDA process', { pid, result: name });
      }
    }
    return found;
  }

  /**
   * Locks every pid, one after another. If one fails (timeout, error, abort), the ones already locked are
   * unlocked before the error is thrown, so the worker goes on serving; the error's evidence lists what
   * was rolled back and any unlock that failed too.
   */
  async lockAll(pids: readonly number[], options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<StepTiming> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_CUDA_LOCK_TIMEOUT_MS;
    const started = this.#now();
    const perPidMs: Record<number, number> = {};
    const locked: number[] = [];
    for (const pid of pids) {
      try {
        abortIfAborted(options.signal, `lock pid ${pid}`);
        perPidMs[pid] = await this.lock(pid, { timeoutMs });
        locked.push(pid);
      } catch (err) {
        throw await this.#rollBackLocks(err, locked);
      }
    }
    const timing = { pids: [...pids], totalMs: round(this.#now() - started), perPidMs };
    this.#log.debug('cuda lock', { ...timing });
    return timing;
  }

  async #rollBackLocks(err: unknown, locked: readonly number[]): Promise<unknown> {
    const rollbackFailures: Array<{ pid: number; error: string }> = [];
    for (const pid of [...locked].reverse()) {
      try {
        await this.driver.checkpointUnlock(pid);
      } catch (unlockErr) {
        rollbackFailures.push({ pid, error: (unlockErr as Error).message });
      }
    }
    this.#log.warn('cuda lock failed; unlocked the processes locked before it', {
      error: err,
      unlocked: locked.filter((p) => !rollbackFailures.some((f) => f.pid === p)),
      rollbackFailures,
    });
    if (!(err instanceof CudaError)) return err;
    return new CudaError(err.code, err.message.slice(err.step.length + 2), {
      step: err.step,
      cause: err,
      evidence: { ...err.evidence, rolledBack: [...locked], rollbackFailures },
      ...(err.result !== undefined ? { result: err.result } : {}),
      ...(err.resultName !== undefined ? { resultName: err.resultName } : {}),
      ...(err.pid !== undefined ? { pid: err.pid } : {}),
    });
  }

  /**
   * Checkpoints every pid (each must be locked). `concurrency` > 1 runs that many driver calls at once,
   * each on its own threadpool thread. On failure the first error is thrown once the calls in flight end;
   * the processes stay locked or checkpointed, and the caller runs restoreAndUnlockAll to let them go on.
   */
  async checkpointAll(pids: readonly number[], options: { signal?: AbortSignal; concurrency?: number } = {}): Promise<StepTiming> {
    const timing = await this.#forEach(pids, 'checkpoint', options, (pid) => this.checkpoint(pid));
    this.#log.debug('cuda checkpoint', { ...timing });
    return timing;
  }

  /**
   * Brings every pid back to RUNNING from wherever it is: checkpointed → restore (with the GPU map) then
   * unlock; locked → unlock; running → nothing. Restores all before unlocking any. Used after a CRIU
   * restore and, on the source, after the dump or a failed checkpoint. Goes on past a failing pid (the
   * others must not stay locked) and throws the first error at the end, with every failure in its evidence.
   * Takes no AbortSignal on purpose: stopping halfway would leave workers locked, which is worse than finishing.
   */
  async restoreAndUnlockAll(
    pids: readonly number[],
    options: { gpuMap?: readonly GpuMapping[]; concurrency?: number } = {},
  ): Promise<{ restore: StepTiming; unlock: StepTiming }> {
    const failures: Array<{ pid: number; error: unknown }> = [];
    const states = new Map<number, CudaProcessState>();
    for (const pid of pids) {
      try {
        states.set(pid, this.getState(pid));
      } catch (error) {
        failures.push({ pid, error });
      }
    }
    const pairs = gpuPairsFor(options.gpuMap);
    const toRestore = pids.filter((p) => states.get(p) === 'checkpointed');
    const restore = await this.#forEach(
      toRestore,
      'restore',
      { keepGoing: failures, ...(options.concurrency !== undefined ? { concurrency: options.concurrency } : {}) },
      (pid) => this.#timed(() => this.driver.checkpointRestore(pid, pairs)),
    );
    const restoredOrLocked = pids.filter(
      (p) => (states.get(p) === 'locked' || toRestore.includes(p)) && !failures.some((f) => f.pid === p),
    );
    const unlock = await this.#forEach(restoredOrLocked, 'unlock', { keepGoing: failures }, (pid) => this.unlock(pid));
    this.#log.debug('cuda restore and unlock', { restore, unlock, failures: failures.length });
    const first = failures[0];
    if (first !== undefined) {
      const others = failures.slice(1).map((f) => ({ pid: f.pid, error: (f.error as Error).message }));
      if (others.length === 0) throw first.error;
      const e = first.error;
      if (!(e instanceof CudaError)) throw e;
      throw new CudaError(e.code, e.message.slice(e.step.length + 2), {
        step: e.step,
        cause: e,
        evidence: { ...e.evidence, otherFailures: others },
        ...(e.result !== undefined ? { result: e.result } : {}),
        ...(e.resultName !== undefined ? { resultName: e.resultName } : {}),
        ...(e.pid !== undefined ? { pid: e.pid } : {}),
      });
    }
    return { restore, unlock };
  }

  /**
   * Runs `call` for every pid, at most `concurrency` at a time (default 1). Without `keepGoing` the first
   * failure stops new calls and is thrown once the calls in flight end; with it, failures are collected there.
   */
  async #forEach(
    pids: readonly number[],
    what: string,
    options: { signal?: AbortSignal; concurrency?: number; keepGoing?: Array<{ pid: number; error: unknown }> },
    call: (pid: number) => Promise<number>,
  ): Promise<StepTiming> {
    const concurrency = Math.max(1, Math.floor(options.concurrency ?? 1));
    const started = this.#now();
    const perPidMs: Record<number, number> = {};
    const queue = [...pids];
    let firstError: unknown;
    const worker = async (): Promise<void> => {
      for (let pid = queue.shift(); pid !== undefined; pid = queue.shift()) {
        if (firstError !== undefined) return;
        try {
          abortIfAborted(options.signal, `${what} pid ${pid}`);
          perPidMs[pid] = await call(pid);
        } catch (error) {
          if (options.keepGoing) options.keepGoing.push({ pid, error });
          else if (firstError === undefined) firstError = error;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, Math.max(1, pids.length)) }, worker));
    if (firstError !== undefined) throw firstError;
    return { pids: [...pids], totalMs: round(this.#now() - started), perPidMs };
  }
}

/**
 * The restore engine's CUDA seam for a checkpoint (CheckpointCudaHooks in src/restore-engine/checkpoint.ts,
 * matched by shape: this layer cannot import the engine). Given every pid of the container's tree:
 * `lock` finds the CUDA processes and locks them all (rolling back on failure), `checkpoint` checkpoints
 * those that are locked, `restoreAndUnlock` brings back whatever is locked or checkpointed. `timings`
 * collects each step's StepTiming for the manifest.
 */
export function checkpointCudaHooks(
  api: CudaCheckpointApi,
  options: { lockTimeoutMs?: number; concurrency?: number } = {},
): {
  lock(pids: readonly number[], signal: AbortSignal): Promise<void>;
  checkpoint(pids: readonly number[], signal: AbortSignal): Promise<void>;
  restoreAndUnlock(pids: readonly number[], signal: AbortSignal): Promise<void>;
  timings: Record<string, StepTiming>;
} {
  const timings: Record<string, StepTiming> = {};
  const cudaPidsIn = (pids: readonly number[]): number[] => api.findCudaProcesses(pids);
  const inState = (pids: readonly number[], wanted: CudaProcessState): number[] =>
    cudaPidsIn(pids).filter((p) => api.getState(p) === wanted);
  const concurrency = options.concurrency ?? 1;
  return {
    timings,
    async lock(pids, signal) {
      timings['lock'] = await api.lockAll(cudaPidsIn(pids), {
        timeoutMs: options.lockTimeoutMs ?? DEFAULT_CUDA_LOCK_TIMEOUT_MS,
        signal,
      });
    },
    async checkpoint(pids, signal) {
      timings['checkpoint'] = await api.checkpointAll(inState(pids, 'locked'), { signal, concurrency });
    },
    async restoreAndUnlock(pids) {
      const result = await api.restoreAndUnlockAll(cudaPidsIn(pids), { concurrency });
      timings['restore'] = result.restore;
      timings['unlock'] = result.unlock;
    },
  };
}
