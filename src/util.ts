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
