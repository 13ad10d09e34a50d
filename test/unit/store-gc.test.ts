/**
 * The store's quota and least-recently-used collection on a real filesystem: which checkpoints go, in which
 * order (last use recorded at publish and at lease), never one under a lease, per namespace and in all, the file
 * cache's unlinked entries with them, a dry run that deletes nothing, and room refused before anything is written.
 */
import { link, mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { manifestFields, tempRoot, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { rejection } from '../helpers/rejection.js';

const T0 = Date.parse('2026-01-01T00:00:00Z');

describe('store quota and LRU collection', () => {
  let root: string;
  let cleanup: () => Promise<void>;
  let store: LocalStore;
  let clock = T0;
  const tick = (): void => void (clock += 60_000);

  beforeEach(async () => {
    ({ root, cleanup } = await tempRoot());
    clock = T0;
    store = await openLocalStore({ root, now: () => new Date(clock) });
  });
  afterEach(async () => cleanup());

  async function publish(key: string, bytes = 4096): Promise<number> {
    const ns = key.slice(0, key.indexOf('/'));
    const base = manifestFields();
    const pending = await store.beginCheckpoint(key);
    await writeCheckpointFiles(pending.paths, bytes);
    const published = await pending.publish({ ...base, source: { ...base.source, pod: { name: 'p', namespace: ns, uid: 'u' } } });
    tick();
    return published.manifest.totals.bytes;
  }

  const names = async (): Promise<string[]> => (await store.list()).map((l) => l.name);

  it('collects the least recently used first, by publish and lease time, until the total quota holds', async () => {
    const size = await publish('team-a/one');
    await publish('team-a/two');
    await publish('team-b/three');
    await publish('team-b/four');
    // A restore of `one` makes it the most recently used.
    const release = await store.acquireLease('team-a/one');
    await release();
    tick();
    expect((await store.lastUsedMs('team-a/one'))! > (await store.lastUsedMs('team-b/four'))!).toBe(true);
    const dry = await store.collectGarbage({ totalQuotaBytes: 2 * size }, { dryRun: true });
    expect(dry.collected.map((c) => c.name)).toEqual(['team-a/two', 'team-b/three']);
    expect(await names(), 'a dry run deletes nothing').toEqual(['team-a/one', 'team-a/two', 'team-b/four', 'team-b/three']);
    const gc = await store.collectGarbage({ totalQuotaBytes: 2 * size });
    expect(gc.collected.map((c) => c.name)).toEqual(['team-a/two', 'team-b/three']);
    expect(gc.bytes).toBe(2 * size);
    expect(await names()).toEqual(['team-a/one', 'team-b/four']);
    // Their stamps and last-use records go with them.
    expect((await readdir(join(root, '.used'))).sort()).toEqual(['team-a+one', 'team-b+four']);
    expect((await readdir(join(root, '.verified'))).sort()).toEqual(['team-a+one.json', 'team-b+four.json']);
    expect((await store.collectGarbage({ totalQuotaBytes: 2 * size })).collected, 'within quota: nothing more').toEqual([]);
  });

  it('never collects a checkpoint under a lease: the next least recently used goes instead', async () => {
    const size = await publish('team-a/old');
    await publish('team-a/mid');
    await publish('team-a/new');
    const release = await store.acquireLease('team-a/old'); // a restore reads it now (and it is now the newest)
    const gc = await store.collectGarbage({ totalQuotaBytes: size });
    expect(gc.collected.map((c) => c.name)).toEqual(['team-a/mid', 'team-a/new']);
    expect(await names()).toEqual(['team-a/old']);
    // Over quota with only a leased checkpoint left: nothing goes, and GC says why.
    const stuck = await store.collectGarbage({ totalQuotaBytes: 1 });
    expect(stuck.collected).toEqual([]);
    expect(stuck.unmet).toMatch(/in use by restores/);
    await release();
    expect((await store.collectGarbage({ totalQuotaBytes: 1 })).collected.map((c) => c.name)).toEqual(['team-a/old']);
  });

  it("keeps each namespace within its own quota, collecting only that namespace's checkpoints", async () => {
    const size = await publish('team-a/a1');
    await publish('team-b/b1'); // older than a2 and a3, but team-b is within its quota
    await publish('team-a/a2');
    await publish('team-a/a3');
    const gc = await store.collectGarbage({ namespaceQuotaBytes: (ns) => (ns === 'team-a' ? 2 * size : undefined) });
    expect(gc.collected.map((c) => c.name)).toEqual(['team-a/a1']);
    expect(await names()).toEqual(['team-a/a2', 'team-a/a3', 'team-b/b1']);
  });

  it('makes room for an incoming checkpoint by collecting, or refuses it with STORE_NO_ROOM collecting nothing', async () => {
    const size = await publish('team-a/a1');
    await publish('team-a/a2');
    const limits = { namespaceQuotaBytes: (ns: string) => (ns === 'team-a' ? 2 * size : undefined) };
    const made = await store.makeRoom(limits, { namespace: 'team-a', bytes: size });
    expect(made.collected.map((c) => c.name)).toEqual(['team-a/a1']);
    // More than the quota itself: refused, and nothing is collected for it.
    const err = await rejection(store.makeRoom(limits, { namespace: 'team-a', bytes: 3 * size }));
    expect(err.code).toBe('STORE_NO_ROOM');
    expect(err.message).toMatch(/namespace team-a holds \d+ bytes and needs \d+ more; its quota is \d+/);
    expect(await names()).toEqual(['team-a/a2']);
    // A 10 TB checkpoint: no filesystem here has room; refused after a statfs, nothing collected.
    const huge = await rejection(store.makeRoom({}, { namespace: 'team-b', bytes: 10_000_000_000_000 }));
    expect([huge.code, huge.message]).toEqual(['STORE_NO_ROOM', expect.stringMatching(/the store's filesystem has \d+ bytes free, 10000000000000 are needed/)]);
    expect(await names()).toEqual(['team-a/a2']);
  });

  it("collects the file cache's entries no checkpoint links any more, and keeps linked ones", async () => {
    await publish('team-a/a1');
    const opened = await store.open('team-a/a1');
    const cache = join(root, '.cache', 'sha256');
    await mkdir(cache, { recursive: true, mode: 0o700 });
    const linked = opened.manifest.files.find((f) => f.path === 'criu/pages-1.img')!;
    await link(join(opened.paths.dir, linked.path), join(cache, linked.sha256));
    await writeFile(join(cache, 'f'.repeat(64)), Buffer.alloc(1000), { mode: 0o600 });
    const dry = await store.collectGarbage({}, { dryRun: true });
    expect([dry.cacheFiles, dry.cacheBytes]).toEqual([1, 1000]);
    expect((await readdir(cache)).length).toBe(2);
    const gc = await store.collectGarbage({});
    expect([gc.collected, gc.cacheFiles, gc.cacheBytes]).toEqual([[], 1, 1000]);
    expect(await readdir(cache)).toEqual([linked.sha256]);
    expect((await stat(join(cache, linked.sha256))).nlink).toBe(2);
    // Once the checkpoint goes, its cached file is the cache's alone, and goes at the next collection.
    await store.delete('team-a/a1');
    expect((await store.collectGarbage({})).cacheFiles).toBe(1);
    expect(await readdir(cache)).toEqual([]);
  });
});
