/**
 * src/agent/cuda-steps.ts over the fake driver: loading (none → CPU-only), the checkpoint hooks (own pid
 * never passed, GPU constraints only with CUDA processes, lock timeout rolled back), the restore step (no
 * GPU constraints → no driver call, GPU map planned from the checkpoint's GPUs to this node's), and the
 * fake's token mode that the integration test relies on (state kept in the process's own memory).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { checkpointHooksFactory, cudaRestoreStep, loadNodeCuda, withoutOwnPid, type NodeCuda } from '../../src/agent/cuda-steps.js';
import type { RestoreStepContext } from '../../src/restore-engine/restore-flow.js';
import { CudaError } from '../../src/cuda/index.js';
import { createCollectingLogger } from '../../src/log.js';
import type { RestoredTree } from '../../src/restore-engine/restore.js';
import type { GpuConstraints } from '../../src/store/manifest.js';
import {
  FAKE_GPU,
  FAKE_LIBCUDA,
  FAKE_NVML,
  OTHER_GPU,
  buildFakeLibraries,
  clearFakeEnv,
  fakeIntrospection,
  fakeTokenEnv,
  fakeTokenState,
  readFakeCalls,
  setFakeEnv,
  type FakeIntrospection,
} from './cuda-fake-lib.js';

const log = createCollectingLogger();
let node: NodeCuda;
let fake: FakeIntrospection;
let tmp: string;
const signal = new AbortController().signal;
const hex = (uuid: string): string => uuid.replace(/^GPU-/, '').replace(/-/g, '');

beforeAll(() => {
  buildFakeLibraries();
  clearFakeEnv();
  const loaded = loadNodeCuda({ libcudaPath: FAKE_LIBCUDA, libnvmlPath: FAKE_NVML, logger: log });
  if (!loaded) throw new Error('the fake driver did not load');
  node = loaded;
  fake = fakeIntrospection();
  tmp = mkdtempSync(join(tmpdir(), 'thaw-cuda-steps-'));
});

afterEach(() => {
  clearFakeEnv();
  fake.reset();
  log.lines.length = 0;
});

afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** The restore step's inputs for a checkpoint with `gpu` constraints (or none). */
function restoreInputs(gpu: GpuConstraints | undefined): [RestoredTree, RestoreStepContext] {
  const tree = { pid: 1, hostPid: 4242, logPath: '', criuRestoreMs: 0, cgroupsJoined: [], options: {} } as unknown as RestoredTree;
  const ctx = {
    container: { containerId: 'c1' },
    checkpoint: { manifest: { constraints: { ...(gpu ? { gpu } : {}) } } },
    targetPid: 1,
    signal,
  } as unknown as RestoreStepContext;
  return [tree, ctx];
}

describe('loading the driver', () => {
  it('reports this node’s GPU facts from the driver and NVML', () => {
    expect(node.facts).toMatchObject({ model: 'NVIDIA H100 80GB HBM3', uuids: [FAKE_GPU], cudaApiVersion: 13000 });
    expect(typeof node.facts?.driverVersion).toBe('string');
  });

  it('without a driver: undefined and one info line, never a throw', () => {
    const logger = createCollectingLogger();
    expect(loadNodeCuda({ libcudaPath: join(tmp, 'no-such-libcuda.so.1'), logger })).toBeUndefined();
    const lines = logger.lines.filter((l) => l.msg === 'no CUDA driver: workers are checkpointed as CPU-only');
    expect(lines.map((l) => l.level)).toEqual(['info']);
  });
});

describe('the checkpoint hooks', () => {
  it('never hands the driver the agent’s own pid, which the driver counts as a CUDA process', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '700' });
    expect(node.api.findCudaProcesses([process.pid, 700]), 'cuInit makes the caller a CUDA process').toEqual([process.pid, 700]);
    expect(withoutOwnPid([1, process.pid, 2], process.pid)).toEqual([1, 2]);
    const hooks = checkpointHooksFactory({ node, logger: log, lockTimeoutMs: 1000 })();
    await hooks.lock([process.pid, 700], signal);
    await hooks.checkpoint([process.pid, 700], signal);
    expect([node.api.getState(700), node.api.getState(process.pid)]).toEqual(['checkpointed', 'running']);
    await hooks.restoreAndUnlock([process.pid, 700], signal);
    expect(node.api.getState(700)).toBe('running');
    expect(fake.lastLockTimeoutMs()).toBe(1000);
  });

  it('records GPU constraints (with the processes’ GPU memory from NVML) only when the container has CUDA processes', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '701,702', FAKE_NVML_USED_BYTES: String(3 << 20) });
    const factory = checkpointHooksFactory({ node, logger: log, ownPid: 1 });
    const cuda = factory();
    await cuda.lock([701, 702, 703], signal);
    expect(cuda.gpuConstraints?.()).toEqual({
      model: 'NVIDIA H100 80GB HBM3',
      uuids: [FAKE_GPU],
      cudaApiVersion: 13000,
      driverVersion: node.facts?.driverVersion,
      memoryBytes: 2 * (3 << 20),
    });
    await cuda.restoreAndUnlock([701, 702, 703], signal);
    const cpuOnly = factory(); // each checkpoint gets its own hooks: nothing carries over
    await cpuOnly.lock([703], signal);
    expect(cpuOnly.gpuConstraints?.()).toBeUndefined();
  });

  it('a lock that times out unlocks what was locked and throws CUDA_ERROR_TIMEOUT', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '710,711', FAKE_CUDA_FAIL: 'lock:timeout@711' });
    const hooks = checkpointHooksFactory({ node, logger: log, ownPid: 1 })();
    const err = await hooks.lock([710, 711], signal).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(CudaError);
    expect((err as CudaError).resultName).toBe('CUDA_ERROR_TIMEOUT');
    expect([node.api.getState(710), node.api.getState(711)]).toEqual(['running', 'running']);
  });
});

describe('the restore step', () => {
  /** Checkpoints fake pid `pid` so that the step has something to restore. */
  const checkpointed = async (pid: number): Promise<void> => {
    await node.api.lock(pid, { timeoutMs: 1000 });
    await node.api.checkpoint(pid);
  };

  it('does nothing for a checkpoint without GPU constraints (no CUDA process was checkpointed)', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '720' });
    await checkpointed(720);
    const step = cudaRestoreStep({ node, logger: log, treePids: async () => [720] });
    await step(...restoreInputs(undefined));
    expect(node.api.getState(720)).toBe('checkpointed');
  });

  it('restores and unlocks the tree’s CUDA processes in place when the GPUs are the same (no map), skipping its own pid', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '721' });
    await checkpointed(721);
    const step = cudaRestoreStep({ node, logger: log, treePids: async () => [process.pid, 721, 722] });
    await step(...restoreInputs({ model: 'NVIDIA H100 80GB HBM3', uuids: [FAKE_GPU] }));
    expect([node.api.getState(721), node.api.getState(process.pid)]).toEqual(['running', 'running']);
    expect(fake.lastRestorePairs()).toEqual([]);
  });

  it('maps the checkpoint’s GPU onto this node’s when they differ', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '723', FAKE_CUDA_GPUS: OTHER_GPU });
    await checkpointed(723);
    setFakeEnv({ FAKE_CUDA_GPUS: FAKE_GPU }); // "another node": the same model, another GPU
    const step = cudaRestoreStep({ node, logger: log, treePids: async () => [723] });
    await step(...restoreInputs({ uuids: [OTHER_GPU] }));
    expect(node.api.getState(723)).toBe('running');
    expect(fake.lastRestorePairs()).toEqual([[hex(OTHER_GPU), hex(FAKE_GPU)]]);
  });

  it('throws when this node has fewer GPUs than the checkpoint used, the tree has no CUDA process, or the driver fails', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '724' });
    await checkpointed(724);
    const step = cudaRestoreStep({ node, logger: log, treePids: async () => [724] });
    const tooMany = await step(...restoreInputs({ uuids: [FAKE_GPU, OTHER_GPU] })).then(() => undefined, (e: unknown) => e);
    expect((tooMany as CudaError).code).toBe('CUDA_INVALID_ARGUMENT');
    const none = cudaRestoreStep({ node, logger: log, ownPid: 1, treePids: async () => [799] });
    const noCuda = await none(...restoreInputs({ uuids: [FAKE_GPU] })).then(() => undefined, (e: unknown) => e);
    expect((noCuda as CudaError).message).toMatch(/no CUDA process in the restored tree/);
    setFakeEnv({ FAKE_CUDA_FAIL: 'restore:missing-gpu' });
    const failed = await step(...restoreInputs({ uuids: [FAKE_GPU] })).then(() => undefined, (e: unknown) => e);
    expect((failed as CudaError).resultName).toBe('CUDA_ERROR_INVALID_DEVICE');
  });
});

describe('the fake’s token mode', () => {
  let child: ChildProcess | undefined;
  afterEach(() => {
    child?.kill('SIGKILL');
    child = undefined;
  });

  it('keeps a token process’s state in its own memory and logs every call', async () => {
    const stateDir = mkdtempSync(join(tmp, 'state-'));
    child = spawn('sleep', ['60'], { env: { ...fakeTokenEnv('tok-unit'), PATH: process.env['PATH'] ?? '/usr/bin:/bin' }, stdio: 'ignore' });
    const pid = child.pid!;
    await new Promise((r) => setTimeout(r, 100)); // the exec: environ is sleep's own from then on
    setFakeEnv({ FAKE_CUDA_STATE_DIR: stateDir });
    expect(node.api.findCudaProcesses([pid])).toEqual([pid]);
    expect(node.nvml?.gpuMemoryByPid().has(pid)).toBe(true);
    await node.api.lock(pid, { timeoutMs: 1000 });
    await node.api.checkpoint(pid);
    expect(await fakeTokenState(pid), 'the digit in the process’s environment').toBe(2);
    expect(node.nvml?.gpuMemoryByPid().has(pid), 'a checkpointed process holds no GPU memory').toBe(false);
    await node.api.restoreAndUnlockAll([pid]);
    expect(await fakeTokenState(pid)).toBe(0);
    expect((await readFakeCalls(stateDir, 'tok-unit')).map((c) => `${c.op} ${c.pid} ${c.result}`)).toEqual([
      `lock ${pid} CUDA_SUCCESS`,
      `checkpoint ${pid} CUDA_SUCCESS`,
      `restore ${pid} CUDA_SUCCESS`,
      `unlock ${pid} CUDA_SUCCESS`,
    ]);
  });
});
