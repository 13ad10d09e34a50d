/**
 * The deadline and answer wrapping around every NRI handler call.
 *
 * - A handler runs under a budget = the request's timeout (the runtime's default when the request carries
 *   none) minus a safety margin (at most a quarter of the timeout), so the reply still arrives in time.
 * - A handler that overruns its budget or throws is logged loudly and answered with `fallback` (an empty,
 *   successful reply): containerd gets its answer in time and the pod proceeds without thaw (a pod never
 *   fails because of thaw). Its context's signal fires at the deadline so it can stop.
 * - Only a handler that throws NriHandlerRejection makes the runtime fail the operation (a non-OK status);
 *   `rethrow` (Configure only) turns any exception into a status, refusing the connection.
 */
import type { Logger } from '../log.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';
import { GrpcCode, NriErrorCode, NriError, NriHandlerRejection, TtrpcStatusError } from './errors.js';
import type { MaybePromise, NriHandlerContext } from './plugin-handlers.js';
import type { RuntimeInfo } from './runtime-version.js';
import type { TtrpcCall } from './ttrpc-server.js';

/** How much earlier than the runtime's deadline a handler is cut off, so the reply still arrives in time. */
export const DEFAULT_HANDLER_SAFETY_MARGIN_MS = 250;

/** What a guarded call needs to know of its plugin, read when the call starts. */
export interface GuardEnv {
  logger: Logger;
  /** The runtime's per-request timeout (from Configure), used when the request carries none. */
  requestTimeoutMs: number;
  /** Default DEFAULT_HANDLER_SAFETY_MARGIN_MS. */
  handlerSafetyMarginMs?: number | undefined;
  /** The runtime from Configure; undefined before it. */
  runtime: RuntimeInfo | undefined;
}

function handlerContext(call: TtrpcCall, env: GuardEnv): { ctx: NriHandlerContext; budgetMs: number; controller: AbortController } {
  const timeoutMs = call.timeoutMs > 0 ? call.timeoutMs : env.requestTimeoutMs;
  const margin = Math.min(env.handlerSafetyMarginMs ?? DEFAULT_HANDLER_SAFETY_MARGIN_MS, Math.floor(timeoutMs / 4));
  const budgetMs = Math.max(1, timeoutMs - margin);
  const controller = new AbortController();
  const onOuterAbort = (): void => controller.abort(call.signal.reason);
  call.signal.addEventListener('abort', onOuterAbort, { once: true });
  controller.signal.addEventListener('abort', () => call.signal.removeEventListener('abort', onOuterAbort), { once: true });
  const ctx: NriHandlerContext = {
    signal: controller.signal,
    deadlineMs: budgetMs,
    runtime: env.runtime ?? { name: 'unknown', version: 'unknown' },
    logger: env.logger,
  };
  return { ctx, budgetMs, controller };
}

/**
 * Runs a handler under its budget. Overrun or exception → logged, `fallback` returned (an empty,
 * successful reply). NriHandlerRejection → a non-OK status (the runtime fails the operation).
 * `rethrow` (Configure only) turns any exception into a status.
 */
export async function guarded<T>(
  env: GuardEnv,
  what: string,
  call: TtrpcCall,
  fn: (ctx: NriHandlerContext) => MaybePromise<T>,
  fallback: T,
  rethrow = false,
): Promise<T> {
  const logger = env.logger;
  const { ctx, budgetMs, controller } = handlerContext(call, env);
  const started = Date.now();
  let timer: NodeJS.Timeout | undefined;
  const overrun = new Promise<'overrun'>((resolve) => {
    timer = setTimeout(() => resolve('overrun'), Math.min(budgetMs, MAX_TIMER_DELAY_MS));
  });
  try {
    const result = await Promise.race([Promise.resolve().then(() => fn(ctx)), overrun]);
    if (result === 'overrun') {
      controller.abort(new NriError(NriErrorCode.TTRPC_DEADLINE_EXCEEDED, `handler budget of ${budgetMs} ms exceeded`, { step: what }));
      logger.error(`nri plugin: ${what} handler overran its ${budgetMs} ms budget; answering with an empty reply so the pod proceeds without thaw`, {
        handler: what,
        budgetMs,
        requestTimeoutMs: call.timeoutMs,
      });
      return fallback;
    }
    return result as T;
  } catch (err) {
    if (err instanceof NriHandlerRejection) {
      logger.warn(`nri plugin: ${what} handler rejected the operation`, { handler: what, error: err.reason });
      throw new TtrpcStatusError(GrpcCode.UNKNOWN, err.reason, { step: what, cause: err });
    }
    if (rethrow) {
      logger.error(`nri plugin: ${what} handler failed`, { handler: what, error: (err as Error)?.message ?? String(err) });
      throw new TtrpcStatusError(GrpcCode.UNKNOWN, `${what}: ${(err as Error)?.message ?? String(err)}`, { step: what, cause: err });
    }
    logger.error(`nri plugin: ${what} handler threw; answering with an empty reply so the pod proceeds without thaw`, {
      handler: what,
      error: err instanceof Error ? err.message : String(err),
      stack: err instanceof Error ? err.stack : undefined,
      elapsedMs: Date.now() - started,
    });
    return fallback;
  } finally {
    if (timer) clearTimeout(timer);
    if (!controller.signal.aborted) controller.abort();
  }
}
