/**
 * The global bounds on concurrent work: the Limiter itself (entries counted as they happen, never timed), and the
 * store's hashing through one limiter shared by two stores (publish and verify of several checkpoints at once on a
 * real filesystem): never more files hashed at once than the bound, and the bound reached.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Limiter } from '../../src/sys/concurrency.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { manifestFields, tempRoot, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { rejection } from '../helpers/rejection.js';

/** A task that enters, records how many run with it, and leaves only when released. */
function gate(): { promise: Promise<void>; release: () => void } {
  let release!: () => void;
  const promise = new Promise<void>((r) => (release = r));
  return { promise, release };
}

describe('Limiter', () => {
  it('lets at most max calls run at once, the others in arrival order, and passes each slot on', async () => {
    const limiter = new Limiter(3);
    let inside = 0;
    let most = 0;
    const order: number[] = [];
    const gates = Array.from({ length: 8 }, gate);
    const runs = gates.map((g, i) =>
      limiter.run(async () => {
        inside++;
        most = Math.max(most, inside);
        order.push(i);
        await g.promise;
        inside--;
        return i;
      }),
    );
    await new Promise((r) => setImmediate(r));
    expect([limiter.running, limiter.waiting, order]).toEqual([3, 5, [0, 1, 2]]);
    gates[1]!.release();
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual([0, 1, 2, 3]);
    for (const g of gates) g.release();
    expect(await Promise.all(runs)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect([most, limiter.peak, limiter.running, limiter.waiting]).toEqual([3, 3, 0, 0]);
  });

  it('a waiter whose signal aborts leaves the queue and runs nothing; a failed call frees its slot', async () => {
    const limiter = new Limiter(1);
    const g = gate();
    const first = limiter.run(() => g.promise);
    const controller = new AbortController();
    let ran = false;
    const waiting = limiter.run(async () => void (ran = true), { signal: controller.signal, step: 'test' });
    await new Promise((r) => setImmediate(r));
    expect(limiter.waiting).toBe(1);
    controller.abort(new Error('pod gone'));
    expect((await rejection(waiting)).code).toBe('SYS_ABORTED');
    expect([limiter.waiting, ran]).toEqual([0, false]);
    g.release();
    await first;
    await expect(limiter.run(async () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(await limiter.run(async () => 'next')).toBe('next');
    expect(limiter.running).toBe(0);
    expect(() => new Limiter(0)).toThrow(RangeError);
  });
});

describe('hashing bounded across stores', () => {
  let roots: Array<{ root: string; cleanup: () => Promise<void> }>;
  let stores: LocalStore[];
  const limiter = new Limiter(2);

  beforeEach(async () => {
    roots = [await tempRoot(), await tempRoot()];
    stores = await Promise.all(roots.map((r) => openLocalStore({ root: r.root, hashLimiter: limiter, hashConcurrency: 4 })));
  });
  afterEach(async () => {
    for (const r of roots) await r.cleanup();
  });

  it('never hashes more files at once than the shared bound, over concurrent publishes and verifies of two stores', async () => {
    // Wrap the limiter's entries to count them as they happen, beside its own peak.
    let inside = 0;
    let most = 0;
    const run = limiter.run.bind(limiter);
    limiter.run = (fn, o) => run(async () => {
      inside++;
      most = Math.max(most, inside);
      try {
        return await fn();
      } finally {
        inside--;
      }
    }, o);
    const keys = ['default/a', 'default/b', 'default/c'];
    await Promise.all(stores.flatMap((store) => keys.map(async (key) => {
      const pending = await store.beginCheckpoint(key);
      await writeCheckpointFiles(pending.paths, 1024 * 1024);
      await pending.publish(manifestFields());
    })));
    const results = await Promise.all(stores.flatMap((store) => keys.map((key) => store.verify(key, { rehash: true }))));
    expect(results.every((r) => r.hashed && r.files === 5)).toBe(true);
    // 6 publishes and 6 verifies of 5 files each, each asking for 4 at once: 2 at most, and 2 reached.
    expect([most, limiter.peak, limiter.running]).toEqual([2, 2, 0]);
  });
});
