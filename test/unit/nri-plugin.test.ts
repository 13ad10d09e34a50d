import { afterEach, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { AdjustmentBuilder } from '../../src/nri-plugin/adjustment.js';
import { NriHandlerRejection } from '../../src/nri-plugin/errors.js';
import {
  createNriPlugin,
  eventMaskOf,
  readLaunchEnv,
  type NriHandlers,
  type NriPlugin,
} from '../../src/nri-plugin/plugin.js';
import { NriEvent, type ContainerAdjustment, type CreateContainerResponse } from '../../src/nri-plugin/nri-types.js';
import { FakeRuntime, PLUGIN_SERVICE } from '../helpers/nri-fake-runtime.js';

const cleanups: Array<() => Promise<unknown> | unknown> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()?.();
});

async function setup(handlers: NriHandlers, runtimeOpts: Parameters<typeof FakeRuntime.listen>[0] = {}, pluginOpts: Partial<Parameters<typeof createNriPlugin>[0]> = {}) {
  const runtime = await FakeRuntime.listen(runtimeOpts);
  cleanups.push(() => runtime.close());
  const logger = createCollectingLogger({ side: 'plugin' });
  const plugin: NriPlugin = createNriPlugin({
    name: 'thaw-test',
    idx: '10',
    handlers,
    logger,
    socketPath: runtime.socketPath,
    reconnect: { initialDelayMs: 20, maxDelayMs: 100 },
    ...pluginOpts,
  });
  cleanups.push(() => plugin.close());
  await plugin.start();
  const conn = await runtime.connection(0);
  await conn.handshake;
  return { runtime, plugin, logger, conn };
}

const pod = { id: 'pod-1', name: 'p', namespace: 'default', uid: 'u1', annotations: { 'thaw.dev/checkpoint': 'w' } };
const container = { id: 'ctr-1', podSandboxId: 'pod-1', name: 'c', args: ['/bin/sh'], env: ['A=1'] };

describe('NRI plugin against an in-process runtime', () => {
  it('register → Configure (before the RegisterPlugin reply) → Synchronize → CreateContainer → StateChange → unknown method', async () => {
    const seen: string[] = [];
    const handlers: NriHandlers = {
      configure: (_config, name, version) => void seen.push(`configure ${name} ${version}`),
      synchronize: (pods, containers) => {
        seen.push(`synchronize ${pods.length} ${containers.length}`);
        return [{ containerId: 'ctr-0', ignoreFailure: true }];
      },
      runPodSandbox: (p) => void seen.push(`run ${p.id}`),
      createContainer: (p, c, ctx) => {
        seen.push(`create ${p.id} ${c.id} ${ctx.runtime.version}`);
        return new AdjustmentBuilder().addEnv('SNAPSHOT_CONTROL_DIR', '/snapshot-control').addAnnotation('thaw.dev/seen', 'yes');
      },
      startContainer: (_p, c) => void seen.push(`start ${c.id}`),
      stopContainer: () => [],
      removeContainer: (_p, c) => void seen.push(`remove ${c.id}`),
    };
    const { plugin, conn } = await setup(handlers, { sync: { pods: [pod], containers: [container] } });

    expect(conn.registered).toEqual({ pluginName: 'thaw-test', pluginIdx: '10' });
    expect(conn.configureAnsweredBeforeRegisterReply).toBe(true);
    // RUN_POD_SANDBOX | CREATE_CONTAINER | START_CONTAINER | STOP_CONTAINER | REMOVE_CONTAINER = 0x629 (§10)
    expect(conn.configureEvents).toBe(0x629);
    expect(plugin.eventMask).toBe(0x629);
    expect(conn.syncReplies).toEqual([{ update: [{ containerId: 'ctr-0', ignoreFailure: true }] }]);
    expect(plugin.state).toBe('synchronized');

    const created = await conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse');
    expect(created.adjust?.env).toEqual([{ key: 'SNAPSHOT_CONTROL_DIR', value: '/snapshot-control' }]);
    expect(created.adjust?.annotations).toEqual({ 'thaw.dev/seen': 'yes' });

    await conn.call('StateChange', 'StateChangeEvent', { event: NriEvent.RUN_POD_SANDBOX, pod }, 'Empty');
    await conn.call('StateChange', 'StateChangeEvent', { event: NriEvent.START_CONTAINER, pod, container }, 'Empty');
    // v0.12 dedicated RPC reaches the same handler
    await conn.call('RemoveContainer', 'RemoveContainerRequest', { pod, container }, 'RemoveContainerResponse');

    await expect(conn.client.call(PLUGIN_SERVICE, 'UpdatePodSandbox', Buffer.alloc(0), { timeoutMs: 1000 })).rejects.toMatchObject({
      code: 'TTRPC_STATUS',
      grpcCode: 12,
      grpcMessage: 'method UpdatePodSandbox',
    });
    await expect(conn.client.call('nri.pkg.api.v1alpha1.Nope', 'X', Buffer.alloc(0), { timeoutMs: 1000 })).rejects.toMatchObject({
      grpcCode: 12,
      grpcMessage: 'service nri.pkg.api.v1alpha1.Nope',
    });
    expect(seen).toEqual([
      'configure containerd v1.7.24',
      'synchronize 1 1',
      'create pod-1 ctr-1 v1.7.24',
      'run pod-1',
      'start ctr-1',
      'remove ctr-1',
    ]);
  });

  it('answers each Synchronize chunk with more=true and gives the handler every pod at the end', async () => {
    let got: number[] = [];
    const pods = Array.from({ length: 7 }, (_, i) => ({ id: `p${i}` }));
    const { conn } = await setup(
      {
        synchronize: (ps) => void (got = [ps.length]),
        createContainer: () => undefined,
      },
      { sync: { pods, containers: [], chunks: 3 } },
    );
    expect(conn.syncReplies).toEqual([{ more: true, update: [] }, { more: true, update: [] }, { update: [] }]);
    expect(got).toEqual([7]);
  });

  it('a handler that overruns its budget gets an empty adjustment sent in time, with a loud log line', async () => {
    const { conn, logger } = await setup(
      { createContainer: () => new Promise<ContainerAdjustment>((r) => setTimeout(() => r({ annotations: { late: 'x' } }), 3000)) },
      { requestTimeoutMs: 400 },
    );
    // The runtime's own 400 ms deadline: a late answer would reject this call with TTRPC_DEADLINE_EXCEEDED.
    const res = await conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse', 400);
    expect(res.adjust).toBeUndefined();
    expect(logger.lines.some((l) => l.level === 'error' && /overran its \d+ ms budget/.test(l.msg))).toBe(true);
  });

  it('createContainerWanted sees the request\'s head only; false answers at once with no adjustment, true (or a throw) runs createContainer on the whole request', async () => {
    const heads: Array<[Record<string, unknown>, Record<string, unknown>]> = [];
    const full: Array<Record<string, unknown>> = [];
    let answer: boolean | 'throw' = false;
    const { conn, logger } = await setup({
      createContainerWanted: (p, c) => {
        heads.push([{ ...p }, { ...c }]);
        if (answer === 'throw') throw new Error('filter bug');
        return answer;
      },
      createContainer: (_p, c) => {
        full.push({ ...c });
        return { annotations: { seen: 'full' } };
      },
    });
    const big = {
      ...container,
      annotations: { 'io.kubernetes.cri.image-name': 'img:1' },
      args: ['/bin/sh', '-c', 'sleep 1'],
      env: Array.from({ length: 30 }, (_, i) => `V${i}=${i}`),
      mounts: [{ destination: '/data', source: '/host/data', type: 'bind', options: ['rbind', 'ro'] }],
      linux: { cgroupsPath: '/kubepods/x', namespaces: [{ type: 'pid' }] },
    };
    const skipped = await conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod: { ...pod, labels: { app: 'x' } }, container: big }, 'CreateContainerResponse');
    expect(skipped.adjust).toBeUndefined();
    expect(full).toHaveLength(0);
    // The head: identity, annotations and args; nothing of the spec's rest was decoded.
    expect(heads[0]![0]).toEqual({ id: 'pod-1', name: 'p', namespace: 'default', uid: 'u1', annotations: pod.annotations });
    expect(heads[0]![1]).toEqual({ id: 'ctr-1', podSandboxId: 'pod-1', name: 'c', annotations: big.annotations, args: big.args });
    for (const a of [true, 'throw'] as const) {
      answer = a;
      const handled = await conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container: big }, 'CreateContainerResponse');
      expect(handled.adjust?.annotations).toEqual({ seen: 'full' });
      expect(full.at(-1)).toMatchObject({ env: big.env, mounts: [expect.objectContaining({ destination: '/data' })] });
    }
    expect(full).toHaveLength(2);
    expect(logger.lines.some((l) => l.level === 'error' && l.fields['error'] === 'filter bug')).toBe(true);
  });

  it('a throwing CreateContainer handler yields an empty, successful reply; NriHandlerRejection fails it on purpose', async () => {
    let reject = false;
    const { conn, logger } = await setup({
      createContainer: () => {
        if (reject) throw new NriHandlerRejection('checkpoint is corrupt and the pod asked for strict mode');
        throw new Error('policy bug');
      },
    });
    const res = await conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse');
    expect(res).toEqual({ update: [], evict: [] });
    expect(logger.lines.some((l) => l.level === 'error' && l.fields['error'] === 'policy bug')).toBe(true);
    reject = true;
    await expect(conn.call('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse')).rejects.toMatchObject({
      grpcCode: 2,
      grpcMessage: 'checkpoint is corrupt and the pod asked for strict mode',
    });
  });

  it('reports args as not applied on containerd 1.7 and includes them on 2.2', async () => {
    const handlers: NriHandlers = { createContainer: () => new AdjustmentBuilder().setArgs(['/opt/thaw/bin/thaw-pause', '--']) };
    const old = await setup(handlers);
    const r1 = await old.conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse');
    expect(r1.adjust?.args ?? []).toEqual([]);
    expect(old.logger.lines.some((l) => l.msg.includes('args not applied'))).toBe(true);
    const fresh = await setup(handlers, { runtimeVersion: 'v2.2.0' });
    const r2 = await fresh.conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse');
    expect(r2.adjust?.args).toEqual(['/opt/thaw/bin/thaw-pause', '--']);
  });

  it('reconnects with back-off and registers again when the runtime drops the connection', async () => {
    const { runtime, plugin, conn } = await setup({ createContainer: () => undefined });
    conn.disconnect();
    const second = await runtime.connection(1);
    await second.handshake;
    expect(second.registered).toEqual({ pluginName: 'thaw-test', pluginIdx: '10' });
    await plugin.waitForState('synchronized', { timeoutMs: 2000 });
  });

  it('close() rejects a pending UpdateContainers call with TTRPC_CLOSED and resolves stopped', async () => {
    const { plugin } = await setup(
      { createContainer: () => undefined },
      { runtimeMethods: { UpdateContainers: () => new Promise<Uint8Array>(() => undefined) } },
    );
    const pending = plugin.updateContainers([{ containerId: 'x' }], [], { timeoutMs: 10_000 });
    await new Promise((r) => setTimeout(r, 50));
    await plugin.close();
    await expect(pending).rejects.toMatchObject({ code: 'TTRPC_CLOSED' });
    await expect(plugin.stopped).resolves.toEqual({ reason: 'closed' });
    expect(plugin.state).toBe('closed');
  });

  it('a stream id reused by the runtime is answered InvalidArgument and the connection stays healthy', async () => {
    const { conn } = await setup({ createContainer: () => ({ annotations: { a: 'b' } }) });
    // Our client numbers streams itself; forge a reuse by resetting its counter.
    (conn.client as unknown as { nextStreamId: number }).nextStreamId = 1;
    await expect(conn.call('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse')).rejects.toMatchObject({
      grpcCode: 3,
      grpcMessage: 'StreamID cannot be re-used and must increment',
    });
    (conn.client as unknown as { nextStreamId: number }).nextStreamId = 1001;
    const ok = await conn.call<CreateContainerResponse>('CreateContainer', 'CreateContainerRequest', { pod, container }, 'CreateContainerResponse');
    expect(ok.adjust?.annotations).toEqual({ a: 'b' });
  });
});

describe('NRI plugin construction', () => {
  const logger = createCollectingLogger();
  it('derives the event mask from the handler methods present', () => {
    expect(eventMaskOf({ createContainer: () => undefined })).toBe(0x8);
    expect(eventMaskOf({ runPodSandbox: () => undefined, removeContainer: () => undefined })).toBe(0x401);
    expect(eventMaskOf({ configure: () => undefined, synchronize: () => undefined })).toBe(0);
  });

  it('rejects an empty handler set, bad names and bad indexes with exact messages', () => {
    expect(() => createNriPlugin({ name: 'x', idx: '10', handlers: {}, logger })).toThrow(expect.objectContaining({ code: 'NRI_NO_HANDLERS' }));
    expect(() => createNriPlugin({ name: 'x', idx: '10', handlers: { configure: () => undefined }, logger })).toThrow(
      expect.objectContaining({ code: 'NRI_NO_HANDLERS' }),
    );
    const h = { createContainer: () => undefined };
    expect(() => createNriPlugin({ name: 'x', idx: '1', handlers: h, logger })).toThrow(/idx must be exactly two digits/);
    expect(() => createNriPlugin({ name: 'a b', idx: '10', handlers: h, logger })).toThrow(/name must match/);
    expect(() => createNriPlugin({ name: 'x', idx: '10', handlers: h, logger, fd: 3, socketPath: '/x' })).toThrow(/either socketPath or fd/);
  });

  it('reads the launch environment and names what is missing', () => {
    expect(readLaunchEnv({ NRI_PLUGIN_NAME: 'thaw', NRI_PLUGIN_IDX: '10', NRI_PLUGIN_SOCKET: '3' })).toEqual({ name: 'thaw', idx: '10', fd: 3 });
    expect(() => readLaunchEnv({ NRI_PLUGIN_NAME: 'thaw' })).toThrow(/missing NRI_PLUGIN_IDX, NRI_PLUGIN_SOCKET/);
  });

  it('a start() without a runtime and without reconnect rejects with NRI_CLOSED', async () => {
    const p = createNriPlugin({ name: 'x', idx: '10', handlers: { createContainer: () => undefined }, logger, socketPath: '/tmp/nri-none/s', reconnect: false });
    await expect(p.start()).rejects.toMatchObject({ code: 'NRI_CLOSED' });
    await expect(p.stopped).resolves.toMatchObject({ reason: 'error', error: { code: 'NRI_CONNECT_FAILED' } });
  });
});
