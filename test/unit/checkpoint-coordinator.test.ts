/**
 * The checkpoint coordinator's scheduling with the flow replaced (runCheckpoint seam) and real control dirs:
 * it waits for the ready marker outside the caller, runs one checkpoint per container, several containers
 * at once, aborts on containerGone, and logs one event per attempt. The flow itself is tested against real
 * CRIU in test/integration/checkpoint.test.ts.
 */
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

import { CheckpointCoordinator, type CheckpointEvent } from '../../src/agent/checkpoint-coordinator.js';
import type { ManagedContainer } from '../../src/agent/managed-container.js';
import { createCollectingLogger } from '../../src/log.js';
import {
  CheckpointError,
  CheckpointErrorCode,
  type CheckpointContainerOptions,
  type CheckpointCudaHooks,
  type CheckpointResult,
} from '../../src/restore-engine/checkpoint.js';
import type { CriuClient } from '../../src/restore-engine/criu/client.js';
import type { LocalStore } from '../../src/store/local-store.js';
import type { Manifest } from '../../src/store/manifest.js';

const root = mkdtempSync(join(tmpdir(), 'thaw-coord-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function container(id: string): ManagedContainer {
  const controlDir = join(root, id);
  mkdirSync(controlDir, { recursive: true });
  return {
    containerId: id,
    containerName: 'worker',
    podId: `pod-${id}`,
    podName: `p-${id}`,
    podNamespace: 'default',
    podUid: `uid-${id}`,
    checkpointName: `default/ck-${id}`,
    controlDir,
    imageRef: 'docker.io/x/y:1',
  };
}

const ready = (c: ManagedContainer): void => writeFileSync(join(c.controlDir, 'ready-for-checkpoint'), '');

function fakeResult(name: string): CheckpointResult {
  return {
    manifest: { id: `id-${name}`, name, totals: { bytes: 123, fileCount: 1 } } as unknown as Manifest,
    phases: { inspectMs: 1, dumpMs: 2, rootfsDiffMs: 3, publishMs: 4, totalMs: 10 },
    workDir: '/nowhere',
  };
}

function setup(run: (o: CheckpointContainerOptions, call: { signal?: AbortSignal }) => Promise<CheckpointResult>) {
  const logger = createCollectingLogger();
  const events: CheckpointEvent[] = [];
  const calls: CheckpointContainerOptions[] = [];
  const coordinator = new CheckpointCoordinator({
    store: {} as LocalStore,
    criu: {} as CriuClient,
    criuVersion: '4.1.1',
    containerd: { socket: '/run/containerd/containerd.sock', root: '/var/lib/containerd' },
    containerdVersion: '1.7.24',
    logger,
    onCheckpointOf: (c) => (c.containerId === 'exit' ? 'exit' : 'continue'),
    imageDigestOf: async () => `sha256:${'a'.repeat(64)}`,
    onEvent: (e) => events.push(e),
    runCheckpoint: (o, call) => {
      calls.push(o);
      return run(o, call);
    },
  });
  return { coordinator, logger, events, calls };
}

describe('CheckpointCoordinator', () => {
  it('sets the GPU memory saved against what the worker says its tensors hold, and warns about allocator cache', async () => {
    const GiB = 2 ** 30;
    const { coordinator, logger, events } = setup(async (o) => {
      const r = fakeResult(o.checkpointName);
      (r.manifest as unknown as { constraints: unknown }).constraints = { gpu: { model: 'H100', memoryBytes: 20 * GiB } };
      return r;
    });
    const c = container('gpu1');
    writeFileSync(join(c.controlDir, 'ready-for-checkpoint'), JSON.stringify({ gpuTensorBytes: 2 * GiB, gpuAllocatorReservedBytes: 19 * GiB }));
    coordinator.checkpointSourceStarted(c, 77);
    await coordinator.idle();
    expect(events[0]?.gpuMemory).toMatchObject({ savedBytes: 20 * GiB, tensorBytes: 2 * GiB, allocatorCacheBytes: 17 * GiB });
    expect(logger.lines.some((l) => l.level === 'warn' && /allocator cache/.test(l.msg))).toBe(true);
  });

  it('waits for the ready marker in the background, checkpoints once, logs one event', async () => {
    const { coordinator, logger, events, calls } = setup(async (o) => fakeResult(o.checkpointName));
    const c = container('a1');
    coordinator.checkpointSourceStarted(c, 4242); // returns at once
    expect(coordinator.status('a1')?.state).toBe('waiting-for-worker');
    coordinator.checkpointSourceStarted(c, 4242); // a second start while one runs is ignored
    await new Promise((r) => setTimeout(r, 150));
    expect(calls).toHaveLength(0);
    ready(c);
    await coordinator.idle();
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({
      containerId: 'a1',
      pid: 4242,
      controlDir: c.controlDir,
      checkpointName: 'default/ck-a1',
      onCheckpoint: 'continue',
      imageRef: 'docker.io/x/y:1',
      imageDigest: `sha256:${'a'.repeat(64)}`,
      source: { containerName: 'worker', pod: { name: 'p-a1', namespace: 'default', uid: 'uid-a1' } },
    });
    expect(events).toEqual([
      {
        event: 'checkpoint', id: 'id-default/ck-a1', name: 'default/ck-a1', namespace: 'default', pod: 'default/p-a1', container: 'worker', containerId: 'a1',
        outcome: 'succeeded', phases: fakeResult('x').phases, bytes: 123,
      },
    ]);
    expect(logger.lines.filter((l) => l.msg === 'checkpoint')).toHaveLength(1);
    expect(logger.lines.some((l) => l.msg.includes('already in progress'))).toBe(true);
    expect(coordinator.status('a1')).toMatchObject({ state: 'succeeded', id: 'id-default/ck-a1', bytes: 123 });
  });

  it('gives each checkpoint its own CUDA hooks when given a factory', async () => {
    const made: CheckpointCudaHooks[] = [];
    const calls: CheckpointContainerOptions[] = [];
    const coordinator = new CheckpointCoordinator({
      store: {} as LocalStore,
      criu: {} as CriuClient,
      criuVersion: '4.1.1',
    containerd: { socket: '/run/containerd/containerd.sock', root: '/var/lib/containerd' },
      containerdVersion: '1.7.24',
      logger: createCollectingLogger(),
      cuda: () => {
        const hooks: CheckpointCudaHooks = { lock: async () => {}, checkpoint: async () => {}, restoreAndUnlock: async () => {} };
        made.push(hooks);
        return hooks;
      },
      runCheckpoint: async (o) => {
        calls.push(o);
        return fakeResult(o.checkpointName);
      },
    });
    const [a, b] = [container('f1'), container('f2')];
    coordinator.checkpointSourceStarted(a, 1);
    coordinator.checkpointSourceStarted(b, 2);
    ready(a);
    ready(b);
    await coordinator.idle();
    expect(made).toHaveLength(2);
    expect(calls.map((c) => c.cuda)).toEqual(expect.arrayContaining(made));
    expect(calls[0]?.cuda).not.toBe(calls[1]?.cuda);
  });

  it('runs several containers in parallel', async () => {
    let inFlight = 0;
    let maxInFlight = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { coordinator, events } = setup(async (o) => {
      inFlight += 1;
      maxInFlight = Math.max(maxInFlight, inFlight);
      if (inFlight === 2) release();
      await gate;
      inFlight -= 1;
      return fakeResult(o.checkpointName);
    });
    const b1 = container('b1');
    const b2 = container('exit');
    ready(b1);
    ready(b2);
    coordinator.checkpointSourceStarted(b1, 1);
    coordinator.checkpointSourceStarted(b2, 2);
    await coordinator.idle();
    expect(maxInFlight).toBe(2);
    expect(events.map((e) => e.outcome)).toEqual(['succeeded', 'succeeded']);
  });

  it('containerGone aborts the wait: no checkpoint, a cancelled event', async () => {
    const { coordinator, events, calls } = setup(async (o) => fakeResult(o.checkpointName));
    const c = container('c1');
    coordinator.checkpointSourceStarted(c, 7);
    coordinator.containerGone('c1');
    await coordinator.idle();
    expect(calls).toHaveLength(0);
    expect(events).toMatchObject([{ outcome: 'cancelled', containerId: 'c1' }]);
    expect(coordinator.status('c1')?.state).toBe('cancelled');
  });

  it('containerGone aborts a running checkpoint through its signal', async () => {
    const { coordinator, events } = setup(
      (_o, call) =>
        new Promise((_resolve, reject) => {
          call.signal?.addEventListener('abort', () => reject(new Error('criu killed')), { once: true });
        }),
    );
    const c = container('c2');
    ready(c);
    coordinator.checkpointSourceStarted(c, 7);
    await new Promise((r) => setTimeout(r, 50));
    expect(coordinator.status('c2')?.state).toBe('checkpointing');
    coordinator.containerGone('c2');
    await coordinator.idle();
    expect(events).toMatchObject([{ outcome: 'cancelled', error: { message: 'criu killed' } }]);
  });

  it('a failed checkpoint is a failed event with the error and the phases it finished', async () => {
    const { coordinator, events, logger } = setup(async () => {
      throw new CheckpointError(CheckpointErrorCode.FAILED, 'dump failed: nope', {
        step: 'checkpoint x',
        evidence: { phase: 'dump', causeCode: 'CRIU_FAILED', phases: { inspectMs: 5, dumpMs: 0, rootfsDiffMs: 0, publishMs: 0, totalMs: 9 } },
      });
    });
    const c = container('d1');
    ready(c);
    coordinator.checkpointSourceStarted(c, 7);
    await coordinator.idle();
    expect(events).toMatchObject([
      { outcome: 'failed', phases: { inspectMs: 5 }, error: { code: 'CHECKPOINT_FAILED', evidence: { phase: 'dump', causeCode: 'CRIU_FAILED' } } },
    ]);
    expect(logger.lines.find((l) => l.msg === 'checkpoint')?.level).toBe('error');
    // A new start of the same container (after the job ended) is taken.
    coordinator.checkpointSourceStarted(c, 8);
    await coordinator.idle();
    expect(events).toHaveLength(2);
  });

  it("checkpoints only into the pod's own namespace: a key of another is refused before the flow runs", async () => {
    const { coordinator, events, calls } = setup(async (o) => fakeResult(o.checkpointName));
    coordinator.checkpointNow({ ...container('ns1'), podNamespace: 'team-a', checkpointName: 'team-b/llm' }, 5, { replace: true });
    await coordinator.idle();
    expect(calls).toHaveLength(0);
    expect(events).toMatchObject([{ outcome: 'failed', name: 'team-b/llm', namespace: 'team-b', error: { code: 'STORE_INVALID_NAME' } }]);
  });

  it('close() aborts every job', async () => {
    const { coordinator, events } = setup(async (o) => fakeResult(o.checkpointName));
    coordinator.checkpointSourceStarted(container('e1'), 1);
    coordinator.checkpointSourceStarted(container('e2'), 2);
    await coordinator.close();
    expect(events.map((e) => e.outcome)).toEqual(['cancelled', 'cancelled']);
    expect(coordinator.status().map((s) => s.state).sort()).toEqual(['cancelled', 'cancelled']);
  });
});
