/**
 * src/cuda/checkpoint-api.ts over the fake driver: typed states, the multi-process steps (lockAll with
 * rollback, checkpointAll, restoreAndUnlockAll with a GPU map), errors with CUresult names, and that the
 * blocking driver calls run off the event loop.
 */
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  CudaCheckpointApi,
  CudaError,
  checkpointCudaHooks,
  gpuPairsFor,
  loadCuda,
  type CudaProcessState,
} from '../../src/cuda/index.js';
import { createCollectingLogger } from '../../src/log.js';
import {
  FAKE_GPU,
  FAKE_LIBCUDA,
  OTHER_GPU,
  buildFakeLibraries,
  clearFakeEnv,
  fakeIntrospection,
  setFakeEnv,
  type FakeIntrospection,
} from '../helpers/cuda-fake-lib.js';

let api: CudaCheckpointApi;
let fake: FakeIntrospection;
const log = createCollectingLogger();
let tmp: string;

beforeAll(() => {
  buildFakeLibraries();
  clearFakeEnv();
  api = new CudaCheckpointApi(loadCuda({ path: FAKE_LIBCUDA }), { logger: log });
  fake = fakeIntrospection();
  tmp = mkdtempSync(join(tmpdir(), 'thaw-cuda-'));
});

afterEach(() => {
  clearFakeEnv();
  fake.reset();
  log.lines.length = 0;
});

afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function rejection(p: Promise<unknown>): Promise<CudaError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(CudaError);
  return err as CudaError;
}

const states = (pids: number[]): CudaProcessState[] => pids.map((p) => api.getState(p));

describe('one process', () => {
  it('goes through the typed states and returns a time for each step', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '500' });
    expect(api.getState(500)).toBe('running');
    expect(await api.lock(500, { timeoutMs: 2000 })).toBeGreaterThanOrEqual(0);
    expect(api.getState(500)).toBe('locked');
    await api.checkpoint(500);
    expect(api.getState(500)).toBe('checkpointed');
    await api.restore(500);
    expect(api.getState(500)).toBe('locked');
    await api.unlock(500);
    expect(api.getState(500)).toBe('running');
    expect(api.restoreThreadId(500)).toBe(501);
  });

  it('refuses a lock without a timeout (0 would wait forever)', async () => {
    expect((await rejection(api.lock(500, { timeoutMs: 0 }))).code).toBe('CUDA_INVALID_ARGUMENT');
  });

  it('restores onto another GPU with a GPU map', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '510' });
    await api.lock(510, { timeoutMs: 1000 });
    await api.checkpoint(510);
    // The node now has another GPU only (the checkpoint moved).
    setFakeEnv({ FAKE_CUDA_GPUS: OTHER_GPU });
    await api.restore(510, { gpuMap: [{ oldUuid: FAKE_GPU, newUuid: OTHER_GPU }] });
    expect(fake.lastRestorePairs()).toEqual([['6a2f0c1e0b4d4c559e1a7f00d1ce0001', '0b9e8d7c6b5a49488776655443322110']]);
    expect(api.getState(510)).toBe('locked');
  });

  it('restoring where the GPU is missing fails with CUDA_CALL_FAILED and the CUresult name', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '520' });
    await api.lock(520, { timeoutMs: 1000 });
    await api.checkpoint(520);
    setFakeEnv({ FAKE_CUDA_GPUS: OTHER_GPU });
    const noMap = await rejection(api.restore(520));
    expect(noMap).toMatchObject({ code: 'CUDA_CALL_FAILED', resultName: 'CUDA_ERROR_INVALID_DEVICE', step: 'restore pid 520', pid: 520 });
    // A map onto a GPU that is not there either.
    const badMap = await rejection(api.restore(520, { gpuMap: [{ oldUuid: FAKE_GPU, newUuid: 'GPU-11111111-2222-3333-4444-555555555555' }] }));
    expect(badMap).toMatchObject({ code: 'CUDA_CALL_FAILED', resultName: 'CUDA_ERROR_INVALID_VALUE', result: 1 });
    expect(api.getState(520)).toBe('checkpointed');
    // Injected: restore:missing-gpu.
    setFakeEnv({ FAKE_CUDA_GPUS: undefined, FAKE_CUDA_FAIL: 'restore:missing-gpu' });
    expect((await rejection(api.restore(520))).resultName).toBe('CUDA_ERROR_INVALID_DEVICE');
  });

  it('an identity GPU map is sent as no map (no migration path in the driver)', () => {
    expect(gpuPairsFor([{ oldUuid: FAKE_GPU, newUuid: FAKE_GPU }])).toEqual([]);
    expect(gpuPairsFor(undefined)).toEqual([]);
    expect(gpuPairsFor([{ oldUuid: FAKE_GPU, newUuid: OTHER_GPU }])).toHaveLength(1);
  });
});

describe('process trees', () => {
  it('findCudaProcesses keeps the pids the driver knows (restore thread id), from env or a pid file', () => {
    const pidFile = join(tmp, 'pids');
    writeFileSync(pidFile, '603\n604\n');
    setFakeEnv({ FAKE_CUDA_PIDS: '601', FAKE_CUDA_PIDS_FILE: pidFile });
    expect(api.findCudaProcesses([600, 601, 602, 603, 604])).toEqual([601, 603, 604]);
    expect(log.lines.filter((l) => l.msg === 'not a CUDA process').map((l) => l.fields)).toEqual([
      { pid: 600, result: 'CUDA_ERROR_NOT_INITIALIZED' },
      { pid: 602, result: 'CUDA_ERROR_NOT_INITIALIZED' },
    ]);
  });

  it('lockAll → checkpointAll → restoreAndUnlockAll, with timings per pid', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '700,701,702' });
    const pids = [700, 701, 702];
    const lock = await api.lockAll(pids, { timeoutMs: 3000 });
    expect(fake.lastLockTimeoutMs()).toBe(3000);
    expect(lock.pids).toEqual(pids);
    expect(Object.keys(lock.perPidMs).map(Number)).toEqual(pids);
    expect(states(pids)).toEqual(['locked', 'locked', 'locked']);
    const ckpt = await api.checkpointAll(pids, { concurrency: 2 });
    expect(Object.keys(ckpt.perPidMs)).toHaveLength(3);
    expect(states(pids)).toEqual(['checkpointed', 'checkpointed', 'checkpointed']);
    const { restore, unlock } = await api.restoreAndUnlockAll(pids);
    expect(restore.pids).toEqual(pids);
    expect(unlock.pids).toEqual(pids);
    expect(states(pids)).toEqual(['running', 'running', 'running']);
  });

  it('lockAll: when the second pid times out, the first is unlocked and the error says so', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '710,711,712', FAKE_CUDA_FAIL: 'lock:timeout@711' });
    const err = await rejection(api.lockAll([710, 711, 712], { timeoutMs: 500 }));
    expect(err).toMatchObject({ code: 'CUDA_CALL_FAILED', resultName: 'CUDA_ERROR_TIMEOUT', result: 909, pid: 711, step: 'lock pid 711' });
    expect(err.evidence).toMatchObject({ rolledBack: [710], rollbackFailures: [] });
    expect(err.message).toBe('lock pid 711: CUDA_ERROR_TIMEOUT (909): the wait operation has timed out');
    setFakeEnv({ FAKE_CUDA_FAIL: undefined });
    expect(states([710, 711, 712])).toEqual(['running', 'running', 'running']);
    expect(log.lines.some((l) => l.level === 'warn' && /unlocked the processes locked before it/.test(l.msg))).toBe(true);
  });

  it('lockAll: a rollback unlock that fails too is in the evidence', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '720,721', FAKE_CUDA_FAIL: 'lock:error@721,unlock:error@720' });
    const err = await rejection(api.lockAll([720, 721], { timeoutMs: 500 }));
    expect(err.resultName).toBe('CUDA_ERROR_UNKNOWN');
    expect(err.evidence['rollbackFailures']).toEqual([{ pid: 720, error: expect.stringMatching(/unlock pid 720: CUDA_ERROR_UNKNOWN/) }]);
  });

  it('lockAll stops and rolls back when the signal fires', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '730,731' });
    const ac = new AbortController();
    ac.abort(new Error('pod deleted'));
    const err = await rejection(api.lockAll([730, 731], { timeoutMs: 500, signal: ac.signal }));
    expect(err.code).toBe('CUDA_ABORTED');
    expect(states([730, 731])).toEqual(['running', 'running']);
  });

  it('checkpointAll: a failing pid fails the step with its CUresult name', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '740,741', FAKE_CUDA_FAIL: 'checkpoint:error@741' });
    await api.lockAll([740, 741], { timeoutMs: 500 });
    const err = await rejection(api.checkpointAll([740, 741]));
    expect(err).toMatchObject({ code: 'CUDA_CALL_FAILED', resultName: 'CUDA_ERROR_UNKNOWN', pid: 741, step: 'checkpoint pid 741' });
    // The cleanup brings both back whatever state they are in (740 checkpointed, 741 still locked).
    expect(states([740, 741])).toEqual(['checkpointed', 'locked']);
    setFakeEnv({ FAKE_CUDA_FAIL: undefined });
    await api.restoreAndUnlockAll([740, 741]);
    expect(states([740, 741])).toEqual(['running', 'running']);
  });

  it('restoreAndUnlockAll goes on past a failing pid and throws the first failure with the others', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '750,751,752' });
    await api.lockAll([750, 751, 752], { timeoutMs: 500 });
    await api.checkpointAll([750, 751, 752]);
    setFakeEnv({ FAKE_CUDA_FAIL: 'restore:missing-gpu@750,unlock:error@752' });
    const err = await rejection(api.restoreAndUnlockAll([750, 751, 752]));
    expect(err).toMatchObject({ resultName: 'CUDA_ERROR_INVALID_DEVICE', pid: 750 });
    expect(err.evidence['otherFailures']).toEqual([{ pid: 752, error: expect.stringMatching(/unlock pid 752/) }]);
    setFakeEnv({ FAKE_CUDA_FAIL: undefined });
    expect(states([750, 751, 752])).toEqual(['checkpointed', 'running', 'locked']);
  });

  it('restoreAndUnlockAll maps GPUs for every process', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '760,761' });
    await api.lockAll([760, 761], { timeoutMs: 500 });
    await api.checkpointAll([760, 761]);
    setFakeEnv({ FAKE_CUDA_GPUS: OTHER_GPU });
    await api.restoreAndUnlockAll([760, 761], { gpuMap: [{ oldUuid: FAKE_GPU, newUuid: OTHER_GPU }] });
    expect(states([760, 761])).toEqual(['running', 'running']);
  });
});

describe('event loop', () => {
  it('lock/checkpoint run on the threadpool: timers fire while the driver call blocks', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '800', FAKE_CUDA_DELAY_MS: '150' });
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    try {
      await api.lock(800, { timeoutMs: 1000 });
    } finally {
      clearInterval(timer);
    }
    expect(ticks).toBeGreaterThanOrEqual(5);
    setFakeEnv({ FAKE_CUDA_DELAY_MS: undefined });
    await api.unlock(800);
  });
});

describe('the checkpoint flow seam (CheckpointCudaHooks shape)', () => {
  it('locks and checkpoints only the CUDA processes of the tree, then brings them back', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '901,903' });
    const hooks = checkpointCudaHooks(api, { lockTimeoutMs: 750 });
    const tree = [900, 901, 902, 903];
    const signal = new AbortController().signal;
    await hooks.lock(tree, signal);
    expect(fake.lastLockTimeoutMs()).toBe(750);
    await hooks.checkpoint(tree, signal);
    expect(states([901, 903])).toEqual(['checkpointed', 'checkpointed']);
    await hooks.restoreAndUnlock(tree, signal);
    expect(states([901, 903])).toEqual(['running', 'running']);
    expect(Object.keys(hooks.timings).sort()).toEqual(['checkpoint', 'lock', 'restore', 'unlock']);
    expect(hooks.timings['lock']?.pids).toEqual([901, 903]);
  });

  it('a control file steers the fake as the environment does (for other processes)', () => {
    const control = join(tmp, 'control');
    writeFileSync(control, 'FAKE_CUDA_PIDS=950\n');
    setFakeEnv({ FAKE_CUDA_CONTROL_FILE: control, FAKE_CUDA_PIDS: '951' });
    expect(api.findCudaProcesses([950, 951])).toEqual([950]);
  });
});
