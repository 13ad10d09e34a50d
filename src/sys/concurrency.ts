/** Bounded concurrency: at most N async calls in flight over a list. */
import { throwIfAborted } from '../util.js';
import { sysAborted } from './errors.js';

/**
 * Runs `fn` over `items` with at most `concurrency` calls in flight. After the first failure (or an abort)
 * no new item starts; the calls already running are awaited, so nothing is left writing or reading behind
 * the caller's back, and the first error is thrown. An abort throws `aborted(reason)` (default SYS_ABORTED).
 */
export async function forEachLimit<T>(
  items: readonly T[],
  concurrency: number,
  fn: (item: T, index: number) => Promise<void>,
  options: { signal?: AbortSignal; step: string; aborted?: (cause: unknown) => Error },
): Promise<void> {
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new RangeError(`concurrency must be a positive integer (got ${concurrency})`);
  }
  const aborted = options.aborted ?? sysAborted(options.step);
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < items.length) {
      if (options.signal?.aborted) {
        failure ??= { error: aborted(options.signal.reason) };
        return;
      }
      const index = next++;
      try {
        await fn(items[index]!, index);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  if (failure !== undefined) throw failure.error;
  throwIfAborted(options.signal, aborted);
}

/**
 * A bound on concurrent work shared by every caller holding the same instance: at most `max` run() calls
 * execute at once, the others wait in arrival order. The agent makes one per kind of work (hashing, CRIU) and
 * hands it to every component doing that work, so that the bound holds across checkpoints, restores and pulls.
 * `running` and `peak` say how many run now and at most so far (what the tests count).
 */
export class Limiter {
  private active = 0;
  private highest = 0;
  private readonly queue: Array<() => void> = [];

  constructor(readonly max: number) {
    if (!Number.isInteger(max) || max < 1) throw new RangeError(`a limiter's max must be a positive integer (got ${max})`);
  }

  get running(): number {
    return this.active;
  }

  get peak(): number {
    return this.highest;
  }

  get waiting(): number {
    return this.queue.length;
  }

  /** Runs `fn` once fewer than `max` run; a `signal` aborted while waiting throws `aborted(reason)` and runs nothing. */
  async run<T>(fn: () => Promise<T>, options: { signal?: AbortSignal; step?: string; aborted?: (cause: unknown) => Error } = {}): Promise<T> {
    const aborted = options.aborted ?? sysAborted(options.step ?? 'wait for a turn');
    const signal = options.signal;
    if (this.active >= this.max) {
      await new Promise<void>((resolve, reject) => {
        const onAbort = (): void => {
          const i = this.queue.indexOf(go);
          if (i >= 0) this.queue.splice(i, 1);
          reject(aborted(signal?.reason));
        };
        const go = (): void => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        };
        if (signal?.aborted) return onAbort();
        this.queue.push(go);
        signal?.addEventListener('abort', onAbort, { once: true });
      });
    } else {
      throwIfAborted(signal, aborted);
      this.active++;
    }
    this.highest = Math.max(this.highest, this.active);
    try {
      return await fn();
    } finally {
      const next = this.queue.shift();
      // The slot passes to the next waiter directly (active stays), or is freed.
      if (next !== undefined) next();
      else this.active--;
    }
  }
}
