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
