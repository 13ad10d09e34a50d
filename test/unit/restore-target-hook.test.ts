/**
 * The NRI adjustment of a restore target and its createRuntime hook: with the native hook configured, the OCI
 * hook is native/build/thaw-hook with its socket, budget and wait, and the work (what the Node hook's argv said)
 * is registered with the agent's hook server under the container id; without it, the Node hook's argv as before.
 * A real local store holds the checkpoint; the hook server is the real one. A checkpoint with compressed pages
 * (schema 2) is refused at CreateContainer by an agent that cannot run thaw-fill.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHookServer, type HookServer } from '../../src/agent/hook-server.js';
import type { ThawRestoreConfig } from '../../src/agent/restore-target.js';
import { createThawNriHandlers } from '../../src/agent/thaw-nri.js';
import { HOOK_ANSWER_GRACE_MS, HOOK_TIMEOUT_MARGIN_MS, START_HOOK_WAIT_MS } from '../../src/defaults.js';
import { createCollectingLogger } from '../../src/log.js';
import { AdjustmentBuilder, type NriHandlerContext } from '../../src/nri-plugin/index.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';

const NATIVE = '/opt/thaw/lib/native/build/thaw-hook';
const ctx: NriHandlerContext = { signal: new AbortController().signal, deadlineMs: 2_000, runtime: { name: 'containerd', version: '1.7.24' }, logger: createCollectingLogger() };

let dir: string;
let store: LocalStore;
let server: HookServer;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'thaw-rt-hook-'));
  store = await openLocalStore({ root: join(dir, 'store'), logger: createCollectingLogger() });
  const pending = await store.beginCheckpoint('default/llm');
  await writeCheckpointFiles(pending.paths);
  await pending.publish(manifestFields(), { replace: false });
  // The same with its lazy pages compressed: the frames' file makes the manifest schema 2 (store/manifest.ts).
  const zpending = await store.beginCheckpoint('default/zllm');
  await writeCheckpointFiles(zpending.paths);
  await writeFile(join(zpending.paths.criuDir, 'thaw-pages.zst'), 'frames');
  expect((await zpending.publish(manifestFields(), { replace: false })).manifest.schemaVersion).toBe(2);
  server = await startHookServer({ socketPath: join(dir, 'run', 'agent-hook.sock') });
});
afterAll(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

function handlers(native: boolean, extra: Partial<ThawRestoreConfig> = {}) {
  const restore: ThawRestoreConfig = {
    store,
    toolkitDir: '/opt/thaw/stack/1.7',
    thawPausePath: '/opt/thaw/lib/native/build/thaw-pause',
    hookArgv: ['/opt/thaw/bin/node', '/opt/thaw/lib/dist/src/oci-hooks/main.js'],
    ...(native ? { nativeHook: { path: NATIVE, server } } : {}),
    workRoot: join(dir, 'work'),
    hostFacts: { arch: manifestFields().constraints.arch, kernelRelease: manifestFields().constraints.kernelRelease },
    ...extra,
  };
  return createThawNriHandlers({ annotationPrefix: 'thaw.dev/', controlRoot: join(dir, 'control'), restore });
}

const pod = { id: 'pod-1', name: 'llm-1', namespace: 'default', uid: 'u1', annotations: { 'thaw.dev/restore': 'llm' } };
const container = (id: string) => ({
  id,
  name: 'worker',
  podSandboxId: 'pod-1',
  args: [...(manifestFields().source.args ?? [])],
  annotations: { 'io.kubernetes.cri.image-name': manifestFields().constraints.image.ref },
});

/** The handler's answer for a restore target: thaw's handlers answer with an AdjustmentBuilder. */
async function adjust(h: ReturnType<typeof handlers>, id: string): Promise<AdjustmentBuilder | undefined> {
  const r = await h.createContainer!(pod, container(id), ctx);
  return r instanceof AdjustmentBuilder ? r : undefined;
}

describe('restore target adjustment: the createRuntime hook', () => {
  it('native: thaw-hook with its socket, budget and wait; the work registered under the container id; poststop stays the Node hook', async () => {
    const h = handlers(true);
    const built = (await adjust(h, 'c-native'))?.build({ name: 'containerd', version: '1.7.24' });
    expect(built, JSON.stringify((ctx.logger as ReturnType<typeof createCollectingLogger>).lines)).toBeDefined();
    const hooks = built?.adjustment.hooks;
    const cr = hooks?.createRuntime?.[0];
    expect(cr?.path).toBe(NATIVE);
    const timeout = cr?.timeout?.value as number;
    const budget = timeout * 1000 - HOOK_TIMEOUT_MARGIN_MS;
    expect(cr?.args).toEqual([NATIVE, '--socket', server.socketPath, '--control-dir', join(dir, 'control', 'c-native'), '--budget-ms', String(budget), '--wait-ms', String(budget + HOOK_ANSWER_GRACE_MS)]);
    expect(cr?.env).toEqual([]);
    // The wait ends before runc's kill (the timeout), so that a hook with no answer still starts the pod cold.
    expect(budget + HOOK_ANSWER_GRACE_MS).toBeLessThan(timeout * 1000);
    expect(hooks?.poststop?.[0]?.path).toBe('/opt/thaw/bin/node');
    expect(server.pending()).toBe(1);
    // The container goes before its hook ran: its registration goes with it.
    await h.removeContainer!(pod, container('c-native'), ctx);
    expect(server.pending()).toBe(0);
  });

  it('without a native hook: the Node hook with the work on its command line, nothing registered', async () => {
    const h = handlers(false);
    const built = (await adjust(h, 'c-node'))?.build({ name: 'containerd', version: '1.7.24' });
    const cr = built?.adjustment.hooks?.createRuntime?.[0];
    expect(cr?.path).toBe('/opt/thaw/bin/node');
    const args = cr?.args ?? [];
    expect(args.slice(0, 5)).toEqual(['/opt/thaw/bin/node', '/opt/thaw/lib/dist/src/oci-hooks/main.js', 'create-runtime', '--mode', 'overlay']);
    for (const flag of ['--control-dir', '--checkpoint-dir', '--thaw-pause', '--budget-ms', '--diff-sha256', '--undo-journal']) expect(args).toContain(flag);
    expect(server.pending()).toBe(0);
    await h.removeContainer!(pod, container('c-node'), ctx);
  });
});

describe('restore target adjustment: a checkpoint with compressed pages', () => {
  const zpod = { ...pod, id: 'pod-z', annotations: { 'thaw.dev/restore': 'zllm' } };
  const zcontainer = (id: string) => ({ ...container(id), podSandboxId: 'pod-z' });

  it('an agent that cannot run thaw-fill leaves the container cold at CreateContainer, cause RESTORE_MEMORY_FILL_REQUIRED; one that can adjusts it', async () => {
    const logger = createCollectingLogger();
    const h = handlers(true, { placesCompressedPages: false });
    expect(await h.createContainer!(zpod, zcontainer('c-z-no'), { ...ctx, logger })).toBeUndefined();
    const line = logger.lines.find((l) => l.fields['event'] === 'restore' && l.fields['outcome'] === 'fallback')?.fields;
    expect(line, JSON.stringify(logger.lines)).toMatchObject({ cause: 'RESTORE_MEMORY_FILL_REQUIRED', checkpoint: 'default/zllm' });
    expect((line?.['mismatches'] as Array<{ what: string }>).map((m) => m.what)).toEqual(['pages']);
    expect(h.stats.restoreFallbacksAtCreate.get('RESTORE_MEMORY_FILL_REQUIRED')).toBe(1);
    expect(server.pending()).toBe(0); // no hook work: nothing was adjusted
    // The same agent restores a checkpoint with plain pages (CRIU places them).
    expect(await adjust(h, 'c-plain-no')).toBeDefined();
    await h.removeContainer!(pod, container('c-plain-no'), ctx);
    const able = handlers(true, { placesCompressedPages: true });
    expect(await able.createContainer!(zpod, zcontainer('c-z-yes'), ctx)).toBeInstanceOf(AdjustmentBuilder);
    await able.removeContainer!(zpod, zcontainer('c-z-yes'), ctx);
    expect(server.pending()).toBe(0);
  });
});

describe('how the agent learns a managed container started', () => {
  it('native: a poststart thaw-hook --started in restore targets and checkpoint sources, and no PostStartContainer handler (so no subscription)', async () => {
    const h = handlers(true);
    expect(h.postStartContainer).toBeUndefined();
    const target = (await adjust(h, 'c-start'))?.build({ name: 'containerd', version: '1.7.24' });
    const source = await h.createContainer!({ ...pod, id: 'pod-2', annotations: { 'thaw.dev/checkpoint': 'llm2' } }, { ...container('c-src'), podSandboxId: 'pod-2' }, ctx);
    const sourceBuilt = source instanceof AdjustmentBuilder ? source.build({ name: 'containerd', version: '1.7.24' }) : undefined;
    for (const built of [target, sourceBuilt]) {
      const ps = built?.adjustment.hooks?.poststart ?? [];
      expect(ps).toHaveLength(1);
      expect(ps[0]?.path).toBe(NATIVE);
      expect(ps[0]?.args).toEqual([NATIVE, '--started', '--socket', server.socketPath, '--wait-ms', String(START_HOOK_WAIT_MS)]);
      // runc kills the hook at its timeout: the hook's own wait ends first (and it exits 0 then).
      expect(START_HOOK_WAIT_MS).toBeLessThan((ps[0]?.timeout?.value as number) * 1000);
    }
    // An untouched pod's container gets nothing at all.
    expect(await h.createContainer!({ id: 'pod-3', name: 'plain', namespace: 'default', uid: 'u3' }, { id: 'c-plain', name: 'app', podSandboxId: 'pod-3' }, ctx)).toBeUndefined();
    await h.removeContainer!(pod, container('c-start'), ctx);
    await h.removeContainer!(pod, container('c-src'), ctx);
  });

  it('a start reaches the flow of the container thaw manages, with its pid; any other container\'s start is ignored', async () => {
    const started: Array<[string, string, number]> = [];
    const restore: ThawRestoreConfig = {
      store,
      toolkitDir: '/opt/thaw/stack/1.7',
      thawPausePath: '/opt/thaw/lib/native/build/thaw-pause',
      hookArgv: ['/opt/thaw/bin/node', '/opt/thaw/lib/dist/src/oci-hooks/main.js'],
      nativeHook: { path: NATIVE, server },
      workRoot: join(dir, 'work'),
      hostFacts: { arch: manifestFields().constraints.arch, kernelRelease: manifestFields().constraints.kernelRelease },
    };
    const h = createThawNriHandlers({
      annotationPrefix: 'thaw.dev/',
      controlRoot: join(dir, 'control'),
      restore,
      coordinator: {
        restoreTargetStarted: (c, pid) => void started.push(['restore', c.containerId, pid]),
        checkpointSourceStarted: (c, pid) => void started.push(['source', c.containerId, pid]),
      },
    });
    await adjust(h, 'c-go');
    await h.createContainer!({ ...pod, id: 'pod-4', annotations: { 'thaw.dev/checkpoint': 'llm4' } }, { ...container('c-go-src'), podSandboxId: 'pod-4' }, ctx);
    h.containerStarted('c-go', 4242);
    h.containerStarted('c-go-src', 4343);
    h.containerStarted('c-unknown', 77);
    h.containerStarted('c-go', 0);
    expect(started).toEqual([['restore', 'c-go', 4242], ['source', 'c-go-src', 4343]]);
    await h.removeContainer!(pod, container('c-go'), ctx);
    await h.removeContainer!(pod, container('c-go-src'), ctx);
  });

  it('without a native hook: NRI PostStartContainer is handled (and so subscribed to), and no poststart hook is added', async () => {
    const h = handlers(false);
    expect(h.postStartContainer).toBeDefined();
    const built = (await adjust(h, 'c-nri'))?.build({ name: 'containerd', version: '1.7.24' });
    expect(built?.adjustment.hooks?.poststart ?? []).toEqual([]);
    await h.removeContainer!(pod, container('c-nri'), ctx);
  });
});
