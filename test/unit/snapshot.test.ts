import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { decide, DEFAULT_ANNOTATION_PREFIX } from '../../src/nri-plugin/policy.js';
import { createAgentMetrics } from '../../src/agent/agent-metrics.js';
import { parseExposition } from '../../src/agent/metrics.js';
import { ThawNriStats } from '../../src/agent/nri-stats.js';
import { findSnapshotCheckpoint, snapshotCheckpointKey, snapshotCheckpointName, snapshotKey, SnapshotTracker, type SnapshotId } from '../../src/agent/snapshot.js';
import { managedAnnotations, managedFromContainer } from '../../src/agent/managed-container.js';
import { openLocalStore, type LocalStore } from '../../src/store/index.js';
import { parseManifest } from '../../src/store/manifest.js';
import { manifestFields, tempRoot, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { createControlDir } from '../../src/sdk/index.js';
import { join } from 'node:path';
import { createThawNriHandlers } from '../../src/agent/thaw-nri.js';
import type { ThawRestoreConfig } from '../../src/agent/restore-target.js';
import { createCollectingLogger } from '../../src/log.js';
import type { NriHandlerContext } from '../../src/nri-plugin/plugin.js';
import type { AdjustmentBuilder } from '../../src/nri-plugin/index.js';

const digestA = `sha256:${'a'.repeat(64)}`;
const digestB = `sha256:${'b'.repeat(64)}`;
const base = { imageDigest: digestA, containerName: 'worker', args: ['/usr/bin/node', '/app/w.js'] };
const gpu = { model: 'NVIDIA H200', driverVersion: '580.1', cudaApiVersion: 13000 };

describe('snapshot key', () => {
  it('is a sha256 that changes with the image digest, the args, the container, the GPU model and driver', () => {
    const k = snapshotKey({ ...base, gpu });
    expect(k).toMatch(/^[0-9a-f]{64}$/);
    expect(snapshotKey({ ...base, gpu })).toBe(k);
    const others = [
      snapshotKey({ ...base, imageDigest: digestB, gpu }),
      snapshotKey({ ...base, args: ['/usr/bin/node', '/app/w.js', '--x'], gpu }),
      snapshotKey({ ...base, containerName: 'sidecar', gpu }),
      snapshotKey({ ...base, gpu: { ...gpu, model: 'NVIDIA H100' } }),
      snapshotKey({ ...base, gpu: { ...gpu, driverVersion: '580.2' } }),
      snapshotKey({ ...base, gpu: { ...gpu, cudaApiVersion: 13010 } }),
      snapshotKey(base),
    ];
    expect(new Set([k, ...others]).size).toBe(others.length + 1);
  });

  it('does not let one arg boundary stand for another', () => {
    expect(snapshotKey({ ...base, args: ['a b', 'c'] })).not.toBe(snapshotKey({ ...base, args: ['a', 'b c'] }));
  });

  it('names the stored checkpoint <name>-<12 hex>, different per namespace and key, within the name rule', () => {
    const key = snapshotKey(base);
    const a = snapshotCheckpointName({ namespace: 'team-a', name: 'qwen', key });
    expect(a).toMatch(/^qwen-[0-9a-f]{12}$/);
    expect(snapshotCheckpointName({ namespace: 'team-b', name: 'qwen', key })).not.toBe(a);
    expect(snapshotCheckpointName({ namespace: 'team-a', name: 'qwen', key: snapshotKey({ ...base, imageDigest: digestB }) })).not.toBe(a);
    expect(snapshotCheckpointName({ namespace: 'team-a', name: 'q'.repeat(115), key }).length).toBe(128);
  });
});

describe('thaw.dev/snapshot annotation', () => {
  const run = (a: Record<string, string>) => decide({ podAnnotations: a, containerName: 'worker' }, { annotationPrefix: DEFAULT_ANNOTATION_PREFIX });
  it('is a snapshot decision, alone or with on-checkpoint and container', () => {
    expect(run({ 'thaw.dev/snapshot': 'qwen' })).toEqual({ kind: 'snapshot', snapshotName: 'qwen', onCheckpoint: 'continue' });
    expect(run({ 'thaw.dev/snapshot': 'qwen', 'thaw.dev/on-checkpoint': 'exit' })).toMatchObject({ kind: 'snapshot', onCheckpoint: 'exit' });
    expect(run({ 'thaw.dev/snapshot': 'qwen', 'thaw.dev/container': 'other' }).kind).toBe('other-container');
  });
  it('is rejected beside checkpoint or restore, with a bad or too long name, or a reserved one', () => {
    expect(run({ 'thaw.dev/snapshot': 'qwen', 'thaw.dev/restore': 'qwen' })).toMatchObject({ kind: 'rejected', annotation: 'thaw.dev/snapshot' });
    expect(run({ 'thaw.dev/snapshot': 'qwen', 'thaw.dev/checkpoint': 'qwen' })).toMatchObject({ kind: 'rejected', annotation: 'thaw.dev/snapshot' });
    expect(run({ 'thaw.dev/snapshot': '../x' })).toMatchObject({ kind: 'rejected', annotation: 'thaw.dev/snapshot' });
    expect(run({ 'thaw.dev/snapshot': 'oci-abc' })).toMatchObject({ kind: 'rejected' });
    expect(run({ 'thaw.dev/snapshot': 'q'.repeat(116) })).toMatchObject({ kind: 'rejected', reason: expect.stringMatching(/at most 115/) });
    expect(run({ 'thaw.dev/snapshot': 'q'.repeat(115) }).kind).toBe('snapshot');
  });
});

describe('snapshot checkpoints in the store', () => {
  let root: string;
  let cleanup: () => Promise<void>;
  let store: LocalStore;
  beforeEach(async () => {
    ({ root, cleanup } = await tempRoot());
    store = await openLocalStore({ root });
  });
  afterEach(async () => cleanup());

  const publish = async (name: string, snapshot: { name: string; key: string } | undefined, namespace = 'team-a') => {
    const pending = await store.beginCheckpoint(name);
    await writeCheckpointFiles(pending.paths, 4096);
    const fields = manifestFields({ ...(snapshot ? { snapshot } : {}) });
    fields.source.pod = { ...fields.source.pod!, namespace };
    return pending.publish(fields);
  };

  it('finds its own checkpoint; absent when none; the record round-trips through the manifest', async () => {
    const id: SnapshotId = { namespace: 'team-a', name: 'qwen', key: snapshotKey(base) };
    expect(await findSnapshotCheckpoint(store, id)).toEqual({ kind: 'absent', storedName: snapshotCheckpointName(id) });
    // Another namespace's snapshot of the same name and key lives in that namespace: not this one's.
    await publish(snapshotCheckpointKey({ ...id, namespace: 'team-b' }), { name: 'qwen', key: id.key }, 'team-b');
    expect((await findSnapshotCheckpoint(store, id)).kind).toBe('absent');
    await publish(snapshotCheckpointKey(id), { name: 'qwen', key: id.key });
    expect(snapshotCheckpointKey(id)).toBe(`team-a/${snapshotCheckpointName(id)}`);
    const found = await findSnapshotCheckpoint(store, id);
    expect(found.kind).toBe('found');
    if (found.kind === 'found') expect(found.checkpoint.manifest.snapshot).toEqual({ name: 'qwen', key: id.key });
    // A new key (new image digest) does not find the old checkpoint.
    expect((await findSnapshotCheckpoint(store, { ...id, key: snapshotKey({ ...base, imageDigest: digestB }) })).kind).toBe('absent');
  });

  it('leaves a checkpoint under the stored name alone when its record or owner is not the snapshot\'s', async () => {
    const id: SnapshotId = { namespace: 'team-a', name: 'qwen', key: snapshotKey(base) };
    const name = snapshotCheckpointKey(id);
    await publish(name, undefined); // named so by hand, no snapshot record
    expect(await findSnapshotCheckpoint(store, id)).toMatchObject({ kind: 'taken', reason: expect.stringMatching(/not snapshot qwen/) });
    await store.delete(name);
    await publish(name, { name: 'qwen', key: 'c'.repeat(64) }); // another key's record
    expect((await findSnapshotCheckpoint(store, id)).kind).toBe('taken');
    await store.delete(name);
    // The right record from another namespace's pod: the store keeps it out of team-a/ at all.
    await expect(publish(name, { name: 'qwen', key: id.key }, 'team-b')).rejects.toMatchObject({ code: 'STORE_INVALID_NAME' });
    expect((await findSnapshotCheckpoint(store, id)).kind).toBe('absent');
  });

  it('refuses a manifest whose snapshot key is not 64 hex', () => {
    const good = { schemaVersion: 1, kind: 'thaw.checkpoint', name: 'x', id: '8d2f7a4e-0000-4000-8000-000000000001', createdAt: '2026-01-01T00:00:00Z', ...manifestFields(), files: [], totals: { bytes: 0, fileCount: 0 } };
    expect(parseManifest({ ...good, snapshot: { name: 'q', key: 'f'.repeat(64) } }).snapshot).toEqual({ name: 'q', key: 'f'.repeat(64) });
    expect(() => parseManifest({ ...good, snapshot: { name: 'q', key: 'XYZ' } })).toThrow(/snapshot.key must be 64/);
    expect(parseManifest(good).snapshot).toBeUndefined();
  });
});

describe('snapshot claims and outcomes', () => {
  const id: SnapshotId = { namespace: 'ns', name: 'qwen', key: 'f'.repeat(64) };
  it('gives one container the claim; released at its checkpoint\'s end or when it goes', () => {
    const t = new SnapshotTracker();
    expect(t.claims.tryClaim(id, 'c1')).toBe(true);
    expect(t.claims.tryClaim(id, 'c2')).toBe(false);
    expect(t.claims.tryClaim(id, 'c1')).toBe(true);
    expect(t.claims.tryClaim({ ...id, key: 'e'.repeat(64) }, 'c3')).toBe(true);
    t.onCheckpointEvent({ containerId: 'c1', outcome: 'failed' });
    expect(t.claims.tryClaim(id, 'c2')).toBe(true);
    t.containerGone('c2');
    expect(t.claims.holder(id)).toBeUndefined();
    t.claims.release('c-none');
  });

  it('asks for a new checkpoint after restores of one fell back in a row; a success or a new checkpoint resets it', () => {
    const t = new SnapshotTracker(3);
    t.restoreFailed('qwen-1');
    t.expect('r1', { namespace: 'ns', snapshot: 'qwen', via: 'restore', storedName: 'qwen-1' });
    t.onRestoreEvent({ containerId: 'r1', outcome: 'fallback', cause: 'RESTORE_CRIU_FAILED' });
    expect(t.shouldRetake('qwen-1')).toBe(false);
    t.expect('r2', { namespace: 'ns', snapshot: 'qwen', via: 'restore', storedName: 'qwen-1' });
    t.onRestoreEvent({ containerId: 'r2', outcome: 'restored' });
    expect(t.failuresOf('qwen-1')).toBe(0);
    for (let i = 0; i < 3; i++) t.restoreFailed('qwen-1');
    expect([t.shouldRetake('qwen-1'), t.shouldRetake('qwen-2')]).toEqual([true, false]);
    t.expect('s1', { namespace: 'ns', snapshot: 'qwen', via: 'checkpoint', storedName: 'qwen-1' });
    t.onCheckpointEvent({ containerId: 's1', outcome: 'failed' });
    expect(t.shouldRetake('qwen-1')).toBe(true);
    t.expect('s2', { namespace: 'ns', snapshot: 'qwen', via: 'checkpoint', storedName: 'qwen-1' });
    t.onCheckpointEvent({ containerId: 's2', outcome: 'succeeded' });
    expect(t.shouldRetake('qwen-1')).toBe(false);
  });

  it('counts every pod once: restored, cold with its cause, checkpointed', async () => {
    const t = new SnapshotTracker();
    t.expect('r1', { namespace: 'ns', snapshot: 'qwen', via: 'restore' });
    t.expect('r2', { namespace: 'ns', snapshot: 'qwen', via: 'restore' });
    t.expect('s1', { namespace: 'ns', snapshot: 'qwen', via: 'checkpoint' });
    t.expect('s2', { namespace: 'ns', snapshot: 'qwen', via: 'checkpoint' });
    t.count('ns', 'qwen', 'cold', 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS');
    t.onRestoreEvent({ containerId: 'r1', outcome: 'restored' });
    t.onRestoreEvent({ containerId: 'r1', outcome: 'restored' }); // one event per pod counts
    t.onRestoreEvent({ containerId: 'r2', outcome: 'fallback', cause: 'RESTORE_CRIU_FAILED' });
    t.onCheckpointEvent({ containerId: 's1', outcome: 'succeeded' });
    t.onCheckpointEvent({ containerId: 's2', outcome: 'cancelled' });
    t.onRestoreEvent({ containerId: 'unrelated', outcome: 'restored' });
    expect(t.rows().map((r) => [r.outcome, r.cause, r.count])).toEqual([
      ['checkpointed', '', 1],
      ['cold', 'AGENT_SNAPSHOT_CHECKPOINT_CANCELLED', 1],
      ['cold', 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS', 1],
      ['cold', 'RESTORE_CRIU_FAILED', 1],
      ['restored', '', 1],
    ]);
    const m = createAgentMetrics({
      stats: new ThawNriStats(),
      version: '1',
      stored: async () => ({ count: 1, bytes: 1, snapshots: [{ namespace: 'ns', snapshot: 'qwen', count: 2 }] }),
      restoresInFlight: () => 0,
      checkpointsInFlight: () => 0,
      snapshotPods: () => t.rows(),
    });
    const e = parseExposition(await m.registry.render());
    expect(e.get('thaw_snapshot_pods_total{namespace="ns",snapshot="qwen",outcome="restored",cause=""}')).toBe(1);
    expect(e.get('thaw_snapshot_pods_total{namespace="ns",snapshot="qwen",outcome="cold",cause="RESTORE_CRIU_FAILED"}')).toBe(1);
    expect(e.get('thaw_snapshot_pods_total{namespace="ns",snapshot="qwen",outcome="checkpointed",cause=""}')).toBe(1);
    expect(e.get('thaw_snapshot_checkpoints_stored{namespace="ns",snapshot="qwen"}')).toBe(2);
  });

  it('learns a snapshot source back from its annotations, with the spec args its manifest needs', async () => {
    const { root, cleanup } = await tempRoot('thaw-ctl-');
    try {
      const containerId = 'a'.repeat(64);
      const controlDir = await createControlDir(root, containerId);
      const entry = { containerId, containerName: 'worker', podId: 'p', podName: 'p', podNamespace: 'ns', podUid: 'u', checkpointName: 'qwen-0123456789ab', controlDir, snapshot: { name: 'qwen', key: 'f'.repeat(64) } };
      const annotations = managedAnnotations('thaw.dev/', 'checkpoint-source', entry);
      const back = managedFromContainer('thaw.dev/', root, { namespace: 'ns', name: 'p', uid: 'u', id: 'p' }, { id: containerId, name: 'worker', annotations, args: ['/usr/bin/node', '/app/w.js'] });
      expect(back).toMatchObject({ snapshot: { name: 'qwen', key: 'f'.repeat(64) }, specArgs: ['/usr/bin/node', '/app/w.js'], role: 'checkpoint-source' });
      // A key that is not 64 hex is not a snapshot.
      const forged = managedFromContainer('thaw.dev/', root, { namespace: 'ns' }, { id: containerId, name: 'worker', annotations: { ...annotations, 'thaw.dev/snapshot-key': 'zz' }, args: ['x'] });
      expect(forged?.snapshot).toBeUndefined();
      expect(forged?.specArgs).toBeUndefined();
    } finally {
      await cleanup();
    }
  });
});

describe('thaw.dev/snapshot at NRI CreateContainer (the handlers over a real store)', () => {
  const ctx: NriHandlerContext = { signal: new AbortController().signal, deadlineMs: 1_000, runtime: { name: 'containerd', version: '1.7.24' }, logger: createCollectingLogger() };
  let root: string;
  let cleanup: () => Promise<void>;
  let store: LocalStore;
  beforeEach(async () => {
    ({ root, cleanup } = await tempRoot());
    store = await openLocalStore({ root: join(root, 'store') });
  });
  afterEach(async () => cleanup());

  const handlersWith = (imageDigestOf: (name: string) => Promise<string>) => {
    const tracker = new SnapshotTracker();
    const restore = { store, toolkitDir: '/opt/thaw/toolkit', thawPausePath: '/opt/thaw/toolkit/bin/thaw-pause', hookArgv: ['/node', '/main.js'], workRoot: join(root, 'work') } satisfies ThawRestoreConfig;
    const handlers = createThawNriHandlers({ annotationPrefix: 'thaw.dev/', controlRoot: join(root, 'control'), restore, snapshot: { tracker, imageDigestOf } });
    return { handlers, tracker };
  };
  const pod = (id: string) => ({ id, name: id, namespace: 'team-a', uid: `${id}-uid`, annotations: { 'thaw.dev/snapshot': 'qwen' } });
  const container = (id: string) => ({ id: id.repeat(64).slice(0, 64), name: 'worker', podSandboxId: id, args: ['/usr/bin/node', '/app/w.js'], annotations: { 'io.kubernetes.cri.image-name': 'registry.example/llm:1' } });

  it('one container takes the claim and becomes a source (control dir, snapshot annotations); the next is left unchanged', async () => {
    const { handlers, tracker } = handlersWith(async () => digestA);
    const first = await handlers.createContainer!(pod('a'), container('a'), ctx);
    const second = await handlers.createContainer!(pod('b'), container('b'), ctx);
    const adjustment = (first as AdjustmentBuilder | undefined)?.build().adjustment;
    expect(adjustment?.annotations?.['thaw.dev/role']).toBe('checkpoint-source');
    const key = adjustment?.annotations?.['thaw.dev/snapshot-key'];
    expect(key).toBe(snapshotKey({ ...base, imageDigest: digestA }));
    expect(adjustment?.annotations?.['thaw.dev/checkpoint-name']).toBe(snapshotCheckpointKey({ namespace: 'team-a', name: 'qwen', key: key! }));
    expect(second).toBeUndefined();
    expect(tracker.rows().map((r) => [r.outcome, r.cause])).toEqual([['cold', 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS']]);
    // The source goes (NRI StopContainer): the claim with it; the next container takes it.
    await handlers.stopContainer!(pod('a'), container('a'), ctx);
    tracker.containerGone(container('a').id); // what the engine's coordinator does on containerStopped
    expect((await handlers.createContainer!(pod('c'), container('c'), ctx) as AdjustmentBuilder | undefined)?.build().adjustment.annotations?.['thaw.dev/role']).toBe('checkpoint-source');
  });

  it('without the image digest there is no key: the container is left unchanged, counted AGENT_SNAPSHOT_KEY_UNKNOWN', async () => {
    const { handlers, tracker } = handlersWith(async () => {
      throw new Error('containerd did not answer');
    });
    expect(await handlers.createContainer!(pod('a'), container('a'), ctx)).toBeUndefined();
    expect(handlers.stats.fallbacksByCause.get('AGENT_SNAPSHOT_KEY_UNKNOWN')).toBe(1);
    expect(tracker.rows().map((r) => [r.outcome, r.cause])).toEqual([['cold', 'AGENT_SNAPSHOT_KEY_UNKNOWN']]);
    expect(tracker.claims.size).toBe(0);
  });

  it('a snapshot checkpoint a restore failed from on this node (the store\'s restore-failure mark) is taken again by the next container at once', async () => {
    const { handlers } = handlersWith(async () => digestA);
    const key = snapshotKey({ ...base, imageDigest: digestA });
    const name = snapshotCheckpointKey({ namespace: 'team-a', name: 'qwen', key });
    const pending = await store.beginCheckpoint(name);
    await writeCheckpointFiles(pending.paths, 4096);
    const fields = manifestFields({ snapshot: { name: 'qwen', key } });
    fields.source.pod = { ...fields.source.pod!, namespace: 'team-a' };
    await pending.publish(fields);
    const role = async (id: string): Promise<string | undefined> => ((await handlers.createContainer!(pod(id), container(id), ctx)) as AdjustmentBuilder | undefined)?.build().adjustment.annotations?.['thaw.dev/role'];
    // Unmarked: the snapshot is found, so this container does not become its source.
    expect(await role('a')).not.toBe('checkpoint-source');
    await store.recordRestoreFailure(await store.open(name), { cause: 'RESTORE_CRIU', reason: 'test', containerId: 'c'.repeat(64), pod: 'team-a/x' });
    expect(await role('b')).toBe('checkpoint-source');
  });

  it('a checkpoint planted under the stored name without the snapshot record is not restored: cold, AGENT_SNAPSHOT_NAME_TAKEN', async () => {
    const { handlers, tracker } = handlersWith(async () => digestA);
    const name = snapshotCheckpointKey({ namespace: 'team-a', name: 'qwen', key: snapshotKey({ ...base, imageDigest: digestA }) });
    const pending = await store.beginCheckpoint(name);
    await writeCheckpointFiles(pending.paths, 4096);
    const fields = manifestFields();
    fields.source.pod = { ...fields.source.pod!, namespace: 'team-a' };
    await pending.publish(fields);
    expect(await handlers.createContainer!(pod('a'), container('a'), ctx)).toBeUndefined();
    expect(tracker.rows().map((r) => [r.outcome, r.cause])).toEqual([['cold', 'AGENT_SNAPSHOT_NAME_TAKEN']]);
  });
});
