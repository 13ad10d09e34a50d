/**
 * Small utilities with no thaw domain knowledge, each defined once. Imports only node: modules, so every
 * layer may use it.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Throws when `signal` has fired; called between units of work. `aborted` makes the error from the signal's
 * reason (each layer its own ABORTED code); without it the reason itself is thrown (an Error made of it when
 * it is not one).
 */
export function throwIfAborted(signal: AbortSignal | undefined, aborted?: (reason: unknown) => Error): void {
  if (!signal?.aborted) return;
  if (aborted !== undefined) throw aborted(signal.reason);
  throw signal.reason instanceof Error ? signal.reason : new Error(String(signal.reason ?? 'aborted'));
}

/** A promise resolved from outside (Node.js 20 has no Promise.withResolvers); resolving twice is harmless. */
export interface Deferred {
  promise: Promise<void>;
  resolve(): void;
}

export function deferred(): Deferred {
  let resolve: () => void = () => undefined;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * Resolves when `p` settles or `signal` fires, whichever comes first (never rejects: the caller checks the
 * signal after it); the listener is removed either way.
 */
export async function untilOrAborted(p: Promise<unknown>, signal: AbortSignal | undefined): Promise<void> {
  if (signal === undefined) return void (await p.catch(() => undefined));
  if (signal.aborted) return;
  let onAbort: () => void = () => undefined;
  const aborted = new Promise<void>((resolve) => (onAbort = resolve));
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    await Promise.race([p.then(() => undefined, () => undefined), aborted]);
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

/**
 * The package root: the nearest directory above this module with a package.json (this file is src/util.ts
 * under vitest, dist/src/util.js when built, <prefix>/lib/dist/src/util.js when installed).
 */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error(`no package.json above ${fileURLToPath(import.meta.url)}`);
    dir = up;
  }
  return dir;
}

/** Whether a process of this pid exists (signal 0; EPERM: it exists, owned by another user). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
