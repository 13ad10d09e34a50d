/**
 * SharedPrefetch (one page-cache read per checkpoint, kept going by its holders) and the NRI handlers that
 * start one at RunPodSandbox.
 */
import { describe, expect, it } from 'vitest';
import { PrefetchGate, SharedPrefetch } from '../../src/agent/shared-prefetch.js';
import { type ThawRestoreConfig } from '../../src/agent/restore-target.js';
import { createThawNriHandlers } from '../../src/agent/thaw-nri.js';
import { createCollectingLogger } from '../../src/log.js';
import type { NriHandlerContext } from '../../src/nri-plugin/plugin.js';
import type { LocalStore } from '../../src/store/local-store.js';

interface Call {
  name: string;
  signal: AbortSignal;
  finish: () => void;
  fail: (err: Error) => void;
}

/** A prefetch that runs until the test finishes or fails it, or its signal aborts. */
function controllablePrefetch(): { calls: Call[]; prefetch: (name: string, signal: AbortSignal) => Promise<unknown> } {
  const calls: Call[] = [];
  return {
    calls,
    prefetch: (name, signal) =>
      new Promise((resolve, reject) => {
        calls.push({ name, signal, finish: () => resolve(undefined), fail: reject });
        signal.addEventListener('abort', () => reject(signal.reason), { once: true });
      }),
  };
}

const settle = () => new Promise((r) => setImmediate(r));

describe('SharedPrefetch', () => {
  it('reads a checkpoint once for all its holders and stops when the last one lets go', async () => {
    const { calls, prefetch } = controllablePrefetch();
    const failures: string[] = [];
    const shared = new SharedPrefetch(prefetch, (name) => failures.push(name));
    shared.hold('ckpt-a', 'pod:1');
    shared.hold('ckpt-a', 'pod:2');
    shared.hold('ckpt-a', 'container:c1');
    shared.hold('ckpt-b', 'pod:3');
    expect(calls.map((c) => c.name)).toEqual(['ckpt-a', 'ckpt-b']);
    shared.release('pod:1');
    shared.release('container:c1');
    expect(calls[0]!.signal.aborted).toBe(false);
    shared.release('pod:2');
    expect(calls[0]!.signal.aborted).toBe(true);
    expect(calls[1]!.signal.aborted).toBe(false);
    expect(shared.inFlight()).toEqual([{ name: 'ckpt-b', holders: ['pod:3'] }]);
    await settle();
    expect(failures).toEqual([]); // being stopped is not a failure
    await shared.close();
    expect(calls[1]!.signal.aborted).toBe(true);
    expect(shared.inFlight()).toEqual([]);
  });

  it("hold() resolves when the read ends, for every holder: done, failed or stopped (never rejects)", async () => {
    const { calls, prefetch } = controllablePrefetch();
    const shared = new SharedPrefetch(prefetch, () => undefined);
    const ended: string[] = [];
    void shared.hold('ckpt-a', 'pod:1').then(() => ended.push('a1'));
    void shared.hold('ckpt-a', 'container:c1').then(() => ended.push('a2'));
    void shared.hold('ckpt-b', 'pod:2').then(() => ended.push('b'));
    void shared.hold('ckpt-c', 'pod:3').then(() => ended.push('c'));
    await settle();
    expect(ended).toEqual([]);
    calls[0]!.finish();
    await settle();
    expect(ended).toEqual(['a1', 'a2']);
    calls[1]!.fail(new Error('disk gone'));
    await settle();
    expect(ended).toEqual(['a1', 'a2', 'b']);
    shared.release('pod:3');
    await settle();
    expect(ended).toEqual(['a1', 'a2', 'b', 'c']);
  });

  it('a finished or failed read is forgotten: the next holder starts a new one; failures are reported', async () => {
    const { calls, prefetch } = controllablePrefetch();
    const failures: Array<{ name: string; err: unknown }> = [];
    const shared = new SharedPrefetch(prefetch, (name, err) => failures.push({ name, err }));
    shared.hold('ckpt-a', 'pod:1');
    calls[0]!.finish();
    await settle();
    expect(shared.inFlight()).toEqual([]);
    shared.hold('ckpt-a', 'pod:2');
    expect(calls).toHaveLength(2);
    calls[1]!.fail(new Error('disk gone'));
    await settle();
    expect(failures.map((f) => [f.name, (f.err as Error).message])).toEqual([['ckpt-a', 'disk gone']]);
    expect(shared.inFlight()).toEqual([]);
    // Releasing a holder of a read that already ended changes nothing.
    shared.release('pod:2');
    shared.hold('ckpt-a', 'pod:3');
    expect(calls).toHaveLength(3);
    await shared.close();
  });
});

describe('PrefetchGate', () => {
  it('open unless held; opens when the last holder releases; a release counts once', async () => {
    const gate = new PrefetchGate();
    await gate.wait();
    const a = gate.hold();
    const b = gate.hold();
    let passed = false;
    const waiting = gate.wait().then(() => (passed = true));
    a();
    a();
    await settle();
    expect(passed).toBe(false);
    b();
    await waiting;
    expect(passed).toBe(true);
    await gate.wait();
  });
});

describe('thaw NRI handlers at RunPodSandbox', () => {
  const ctx: NriHandlerContext = {
    signal: new AbortController().signal,
    deadlineMs: 1_000,
    runtime: { name: 'containerd', version: '1.7.24' },
    logger: createCollectingLogger(),
  };
  // Never touched by runPodSandbox: it only hands the name over.
  const restore = { store: {} as LocalStore, toolkitDir: '/opt/thaw/toolkit', thawPausePath: '/opt/thaw/toolkit/bin/thaw-pause', hookArgv: ['/node', '/main.js'], workRoot: '/tmp/w' } satisfies ThawRestoreConfig;

  function handlersRecording(withRestore = true) {
    const started: Array<[string, string]> = [];
    const gone: string[] = [];
    const handlers = createThawNriHandlers({
      annotationPrefix: 'thaw.dev/',
      controlRoot: '/nonexistent',
      coordinator: { restorePodCreated: (podId, name) => started.push([podId, name]), podGone: (podId) => gone.push(podId) },
      ...(withRestore ? { restore } : {}),
    });
    return { handlers, started, gone };
  }

  it('a pod naming a local checkpoint starts its read; others do not; stop and remove end it', async () => {
    const { handlers, started, gone } = handlersRecording();
    const pod = (id: string, annotations: Record<string, string>) => ({ id, name: id, namespace: 'default', annotations });
    await handlers.runPodSandbox!(pod('p1', { 'thaw.dev/restore': 'llm-worker' }), ctx);
    await handlers.runPodSandbox!(pod('p2', { 'thaw.dev/restore': 'llm-worker', 'thaw.dev/container': 'server' }), ctx);
    await handlers.runPodSandbox!(pod('p3', { 'thaw.dev/checkpoint': 'llm-worker' }), ctx); // a source
    await handlers.runPodSandbox!(pod('p4', { 'thaw.dev/restore': 'registry.example/ns/worker:v1' }), ctx); // pulled at CreateContainer
    await handlers.runPodSandbox!(pod('p5', { 'thaw.dev/restore': '../escape' }), ctx); // rejected by the policy
    await handlers.runPodSandbox!(pod('p6', { 'thaw.dev/restore': 'llm-worker', 'thaw.dev/bogus': 'x' }), ctx);
    await handlers.runPodSandbox!(pod('p7', {}), ctx);
    // Another namespace's checkpoint that no policy shares: never read for this pod.
    await handlers.runPodSandbox!(pod('p8', { 'thaw.dev/restore': 'team-b/llm-worker' }), ctx);
    await handlers.runPodSandbox!({ ...pod('p9', { 'thaw.dev/restore': 'llm-worker' }), namespace: 'team-a' }, ctx);
    expect(started).toEqual([
      ['p1', 'default/llm-worker'],
      ['p2', 'default/llm-worker'],
      ['p9', 'team-a/llm-worker'],
    ]);
    await handlers.stopPodSandbox!(pod('p1', {}), ctx);
    await handlers.removePodSandbox!(pod('p2', {}), ctx);
    expect(gone).toEqual(['p1', 'p2']);
  });

  it('without a restore engine nothing is read', async () => {
    const { handlers, started } = handlersRecording(false);
    await handlers.runPodSandbox!({ id: 'p1', annotations: { 'thaw.dev/restore': 'llm-worker' } }, ctx);
    expect(started).toEqual([]);
  });
});
