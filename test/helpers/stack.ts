/**
 * Test helpers for a real private containerd (src/node-stack). A test file calls `useNodeStack()` at
 * the top of a describe block; the stack starts once before its tests (after cleaning stacks left by
 * crashed runs) and is stopped after them, also when a test failed.
 */
import { afterAll, beforeAll } from 'vitest';
import { cleanupStaleStacks } from '../../src/node-stack/cleanup.js';
import { startNodeStack, type NodeStack, type NodeStackOptions } from '../../src/node-stack/containerd.js';
import { parseFlavor, type StackFlavor } from '../../src/node-stack/paths.js';

/** The flavors listed in THAW_CONTAINERD ("1.7", "2.1" or "1.7,2.1"); default ["1.7"]. */
export function flavorsUnderTest(env: string | undefined = process.env.THAW_CONTAINERD): StackFlavor[] {
  const list = (env ?? '').split(/[,\s]+/).filter((s) => s !== '');
  return list.length === 0 ? ['1.7'] : [...new Set(list.map((f) => parseFlavor(f)))];
}

export interface NodeStackHandle {
  /** The running stack; throws when read outside the tests of the block (before beforeAll ran). */
  readonly stack: NodeStack;
}

/** Starts time of a stack (containerd + image import) on a loaded 2-core machine stays well under this. */
export const USE_NODE_STACK_START_TIMEOUT_MS = 90_000;

export function useNodeStack(options: NodeStackOptions = {}): NodeStackHandle {
  let current: NodeStack | undefined;
  beforeAll(async () => {
    await cleanupStaleStacks(options.logger ? { logger: options.logger } : {});
    current = await startNodeStack(options);
  }, USE_NODE_STACK_START_TIMEOUT_MS);
  afterAll(async () => {
    const s = current;
    current = undefined;
    await s?.stop();
  }, USE_NODE_STACK_START_TIMEOUT_MS);
  return {
    get stack(): NodeStack {
      if (!current) throw new Error('useNodeStack: the stack is not running (read it inside a test, after beforeAll)');
      return current;
    },
  };
}

/** Polls `probe` every `intervalMs` until it returns a value other than undefined, or throws after `timeoutMs`. */
export async function waitFor<T>(probe: () => Promise<T | undefined> | T | undefined, what: string, timeoutMs = 10_000, intervalMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
