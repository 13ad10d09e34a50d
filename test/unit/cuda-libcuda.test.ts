/**
 * src/cuda/libcuda.ts and nvml.ts against the fake driver and fake NVML (native/fake-libcuda), loaded
 * through the same koffi code as the real libraries: every binding, the error mapping (CUresult number +
 * name + step + pid), the struct layouts, and the typed "unavailable" conditions.
 */
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  CHECKPOINT_STRUCT_SIZES,
  CudaError,
  CUprocessState,
  CUresult,
  formatGpuUuid,
  gpuFacts,
  loadCuda,
  parseGpuUuid,
  planGpuMap,
  tryLoadCuda,
  tryLoadNvml,
  type CudaDriver,
} from '../../src/cuda/index.js';
import { isThawError } from '../../src/errors.js';
import {
  FAKE_GPU,
  FAKE_LIBCUDA,
  FAKE_NVML,
  OTHER_GPU,
  buildFakeLibraries,
  clearFakeEnv,
  fakeIntrospection,
  setFakeEnv,
  type FakeIntrospection,
} from '../helpers/cuda-fake-lib.js';

let driver: CudaDriver;
let fake: FakeIntrospection;

beforeAll(() => {
  buildFakeLibraries();
  clearFakeEnv();
  driver = loadCuda({ path: FAKE_LIBCUDA });
  fake = fakeIntrospection();
});

afterEach(() => {
  clearFakeEnv();
  fake.reset();
});

/** The CudaError a call throws (sync or async). */
async function failure(call: () => unknown): Promise<CudaError> {
  try {
    await call();
  } catch (err) {
    expect(err).toBeInstanceOf(CudaError);
    return err as CudaError;
  }
  throw new Error('expected the call to fail');
}

describe('struct layouts (CUDA 13.0 driver API reference)', () => {
  it('are 64 bytes each, GpuPair 32, with gpuPairsCount at 8 and reserved1 at 56', () => {
    expect(CHECKPOINT_STRUCT_SIZES).toEqual({
      CUcheckpointLockArgs: 64,
      CUcheckpointCheckpointArgs: 64,
      CUcheckpointUnlockArgs: 64,
      CUcheckpointGpuPair: 32,
      CUcheckpointRestoreArgs: 64,
      restoreGpuPairsCountOffset: 8,
      restoreReserved1Offset: 56,
    });
  });
});

describe('tryLoadCuda', () => {
  it('loads the fake through the same path and reports the CUDA API version', () => {
    const loaded = tryLoadCuda({ path: FAKE_LIBCUDA });
    expect(loaded.ok).toBe(true);
    expect(driver.driverVersion).toBe(13000);
    expect(driver.path).toBe(FAKE_LIBCUDA);
  });

  it('turns a missing library into CUDA_UNAVAILABLE with a reason, without throwing', () => {
    const loaded = tryLoadCuda({ path: '/nonexistent/libcuda.so.1' });
    expect(loaded.ok).toBe(false);
    if (loaded.ok) return;
    expect(loaded.error.code).toBe('CUDA_UNAVAILABLE');
    expect(loaded.reason).toMatch(/cannot load \/nonexistent\/libcuda\.so\.1/);
    expect(isThawError(loaded.error, 'CUDA_UNAVAILABLE')).toBe(true);
    expect(() => loadCuda({ path: '/nonexistent/libcuda.so.1' })).toThrow(/CUDA_UNAVAILABLE|cannot load/);
  });

  it('finds the real driver by soname when there is one; here (no GPU) that is CUDA_UNAVAILABLE', () => {
    const loaded = tryLoadCuda();
    if (loaded.ok) expect(loaded.driver.deviceCount()).toBeGreaterThan(0);
    else expect(loaded.error.code).toBe('CUDA_UNAVAILABLE');
  });

  it('a library without the checkpoint API (driver < r570) is CUDA_UNAVAILABLE, saying so', () => {
    const loaded = tryLoadCuda({ path: FAKE_NVML });
    expect(loaded.ok).toBe(false);
    if (!loaded.ok) expect(loaded.reason).toMatch(/required entry point is missing|checkpoint API/);
  });

  it('a failing cuInit (no GPU on the node) is CUDA_UNAVAILABLE with the CUresult and its name', () => {
    setFakeEnv({ FAKE_CUDA_GPUS: '' });
    const loaded = tryLoadCuda({ path: FAKE_LIBCUDA });
    expect(loaded.ok).toBe(false);
    if (loaded.ok) return;
    expect(loaded.error.result).toBe(CUresult.CUDA_ERROR_NO_DEVICE);
    expect(loaded.error.resultName).toBe('CUDA_ERROR_NO_DEVICE');
    expect(loaded.reason).toMatch(/cuInit\(0\) returned 100 CUDA_ERROR_NO_DEVICE/);
  });

  it('an injected cuInit failure is reported the same way', () => {
    setFakeEnv({ FAKE_CUDA_FAIL: 'init:not-permitted' });
    const loaded = tryLoadCuda({ path: FAKE_LIBCUDA });
    expect(loaded.ok ? undefined : loaded.error.resultName).toBe('CUDA_ERROR_NOT_PERMITTED');
  });
});

describe('error names and device queries', () => {
  it('names CUresults through cuGetErrorName, with a fallback for unknown numbers', () => {
    expect(driver.errorName(909)).toBe('CUDA_ERROR_TIMEOUT');
    expect(driver.errorName(401)).toBe('CUDA_ERROR_ILLEGAL_STATE');
    expect(driver.errorString(909)).toBe('the wait operation has timed out');
    expect(driver.errorName(123456)).toBe('CUresult(123456)');
  });

  it('lists the fake GPU: name, UUID (v2), memory', () => {
    setFakeEnv({ FAKE_CUDA_GPU_NAME: 'NVIDIA H100 80GB HBM3', FAKE_CUDA_TOTAL_MEM: String(80 * 2 ** 30) });
    expect(driver.deviceCount()).toBe(1);
    const dev = driver.device(0);
    expect(driver.deviceName(dev)).toBe('NVIDIA H100 80GB HBM3');
    expect(formatGpuUuid(driver.deviceUuid(dev))).toBe(FAKE_GPU);
    expect(driver.deviceTotalMemBytes(dev)).toBe(80 * 2 ** 30);
  });

  it('a bad ordinal throws CUDA_CALL_FAILED with CUDA_ERROR_INVALID_DEVICE and the step', async () => {
    const err = await failure(() => driver.device(3));
    expect(err.code).toBe('CUDA_CALL_FAILED');
    expect(err.result).toBe(101);
    expect(err.resultName).toBe('CUDA_ERROR_INVALID_DEVICE');
    expect(err.step).toBe('get device 3');
    expect(err.message).toBe('get device 3: CUDA_ERROR_INVALID_DEVICE (101): invalid device ordinal');
  });

  it('formats and parses GPU UUIDs both ways; rejects malformed ones with CUDA_INVALID_ARGUMENT', async () => {
    expect(formatGpuUuid(parseGpuUuid(OTHER_GPU))).toBe(OTHER_GPU);
    expect(formatGpuUuid(parseGpuUuid('0b9e8d7c6b5a49488776655443322110'))).toBe(OTHER_GPU);
    expect((await failure(() => parseGpuUuid('GPU-xyz'))).code).toBe('CUDA_INVALID_ARGUMENT');
  });
});

describe('checkpoint calls', () => {
  it('walk the state machine: running → locked → checkpointed → locked → running', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '1234' });
    expect(driver.checkpointGetState(1234)).toBe(CUprocessState.RUNNING);
    expect(driver.checkpointGetRestoreThreadId(1234)).toBe(1235);
    await driver.checkpointLock(1234, 5000);
    expect(fake.lastLockTimeoutMs()).toBe(5000);
    expect(driver.checkpointGetState(1234)).toBe(CUprocessState.LOCKED);
    await driver.checkpointCheckpoint(1234);
    expect(driver.checkpointGetState(1234)).toBe(CUprocessState.CHECKPOINTED);
    await driver.checkpointRestore(1234);
    expect(fake.lastRestorePairs()).toEqual([]);
    expect(driver.checkpointGetState(1234)).toBe(CUprocessState.LOCKED);
    await driver.checkpointUnlock(1234);
    expect(driver.checkpointGetState(1234)).toBe(CUprocessState.RUNNING);
  });

  it('a call in the wrong state: CUDA_ERROR_ILLEGAL_STATE (401) with the step and the pid', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '1234' });
    const err = await failure(() => driver.checkpointCheckpoint(1234));
    expect(err).toMatchObject({ code: 'CUDA_CALL_FAILED', result: 401, resultName: 'CUDA_ERROR_ILLEGAL_STATE', step: 'checkpoint pid 1234', pid: 1234 });
    expect(err.evidence).toMatchObject({ result: 401, resultName: 'CUDA_ERROR_ILLEGAL_STATE', pid: 1234 });
    expect(err.toJSON()).toMatchObject({ code: 'CUDA_CALL_FAILED', step: 'checkpoint pid 1234' });
  });

  it('a non-CUDA pid: CUDA_ERROR_NOT_INITIALIZED, as the real driver (r580) answers', async () => {
    const err = await failure(() => driver.checkpointGetState(4321));
    expect(err).toMatchObject({ resultName: 'CUDA_ERROR_NOT_INITIALIZED', result: 3, pid: 4321, step: 'get checkpoint state of pid 4321' });
  });

  it('a lock timeout: CUDA_ERROR_TIMEOUT (909) and the process stays running', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '77', FAKE_CUDA_FAIL: 'lock:timeout' });
    const err = await failure(() => driver.checkpointLock(77, 100));
    expect(err).toMatchObject({ result: 909, resultName: 'CUDA_ERROR_TIMEOUT', step: 'lock pid 77', pid: 77 });
    setFakeEnv({ FAKE_CUDA_FAIL: undefined });
    expect(driver.checkpointGetState(77)).toBe(CUprocessState.RUNNING);
  });

  it('restore passes the GPU pairs in CUcheckpointRestoreArgs (pointer @0, count @8)', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '88', FAKE_CUDA_GPUS: `${FAKE_GPU},${OTHER_GPU}` });
    await driver.checkpointLock(88, 1000);
    await driver.checkpointCheckpoint(88);
    await driver.checkpointRestore(88, [{ oldUuid: parseGpuUuid(FAKE_GPU), newUuid: parseGpuUuid(OTHER_GPU) }]);
    expect(fake.lastRestorePairs()).toEqual([['6a2f0c1e0b4d4c559e1a7f00d1ce0001', '0b9e8d7c6b5a49488776655443322110']]);
  });

  it('rejects bad arguments before calling the driver', async () => {
    expect((await failure(() => driver.checkpointLock(0, 10))).code).toBe('CUDA_INVALID_ARGUMENT');
    expect((await failure(() => driver.checkpointLock(5, -1))).code).toBe('CUDA_INVALID_ARGUMENT');
    const bad = await failure(() => driver.checkpointRestore(5, [{ oldUuid: new Uint8Array(3), newUuid: new Uint8Array(16) }]));
    expect(bad.code).toBe('CUDA_INVALID_ARGUMENT');
  });

  it('an injected numeric CUresult for one pid only', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '10,11', FAKE_CUDA_FAIL: 'unlock:999@11' });
    for (const pid of [10, 11]) await driver.checkpointLock(pid, 1000);
    await driver.checkpointUnlock(10);
    const err = await failure(() => driver.checkpointUnlock(11));
    expect(err).toMatchObject({ result: 999, resultName: 'CUDA_ERROR_UNKNOWN', pid: 11 });
  });
});

describe('NVML', () => {
  it('is NVML_UNAVAILABLE, typed and without a throw, when the library is missing', () => {
    const loaded = tryLoadNvml({ path: '/nonexistent/libnvidia-ml.so.1' });
    expect(loaded.ok).toBe(false);
    if (!loaded.ok) expect(loaded.error.code).toBe('NVML_UNAVAILABLE');
    const real = tryLoadNvml();
    if (!real.ok) expect(real.error.code).toBe('NVML_UNAVAILABLE');
  });

  it('a failing nvmlInit_v2 is NVML_UNAVAILABLE with the nvmlReturn_t', () => {
    setFakeEnv({ FAKE_CUDA_FAIL: 'nvml-init:not-permitted' });
    const loaded = tryLoadNvml({ path: FAKE_NVML });
    expect(loaded.ok ? undefined : [loaded.error.result, loaded.error.resultName]).toEqual([4, 'Insufficient Permissions']);
  });

  it('reports driver version, devices, memory and per-process GPU memory (v3 structs)', () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '300,301,302,303,304,305', FAKE_NVML_USED_BYTES: String(3 * 2 ** 30) });
    const loaded = tryLoadNvml({ path: FAKE_NVML });
    if (!loaded.ok) throw loaded.error;
    const nvml = loaded.nvml;
    expect(nvml.driverVersion()).toBe('580.159.04');
    expect(nvml.deviceCount()).toBe(1);
    const dev = nvml.device(0);
    expect(nvml.deviceName(dev)).toBe('NVIDIA H100 80GB HBM3');
    expect(nvml.deviceUuid(dev)).toBe(FAKE_GPU);
    expect(nvml.memoryInfo(dev)).toEqual({ totalBytes: 80 * 2 ** 30, freeBytes: 80 * 2 ** 30, usedBytes: 0 });
    const procs = nvml.computeProcesses(dev);
    expect(procs.map((p) => p.pid)).toEqual([300, 301, 302, 303, 304, 305]);
    expect(procs[0]).toEqual({ pid: 300, usedGpuMemoryBytes: 3 * 2 ** 30, gpuInstanceId: 0xffffffff, computeInstanceId: 0xffffffff });
    expect(nvml.gpuMemoryByPid().get(305)).toBe(3 * 2 ** 30);
    setFakeEnv({ FAKE_CUDA_PIDS: undefined });
    expect(nvml.computeProcesses(dev)).toEqual([]);
  });

  it('a failing NVML call is NVML_CALL_FAILED with its number and text', async () => {
    const loaded = tryLoadNvml({ path: FAKE_NVML });
    if (!loaded.ok) throw loaded.error;
    setFakeEnv({ FAKE_CUDA_PIDS: '1', FAKE_CUDA_FAIL: 'nvml-procs:timeout' });
    const err = await failure(() => loaded.nvml.computeProcesses(loaded.nvml.device(0)));
    expect(err).toMatchObject({ code: 'NVML_CALL_FAILED', result: 10, resultName: 'Timeout', step: 'list compute processes' });
  });
});

describe('gpuFacts', () => {
  it('gives the manifest GpuConstraints from the driver and NVML', () => {
    setFakeEnv({ FAKE_CUDA_GPUS: `${FAKE_GPU},${OTHER_GPU}` });
    const nvml = tryLoadNvml({ path: FAKE_NVML });
    expect(gpuFacts({ cuda: driver, nvml: nvml.ok ? nvml.nvml : undefined })).toEqual({
      model: 'NVIDIA H100 80GB HBM3',
      uuids: [FAKE_GPU, OTHER_GPU],
      driverVersion: '580.159.04',
      cudaApiVersion: 13000,
      memoryBytes: 80 * 2 ** 30,
    });
  });

  it('is undefined without a driver; without NVML it lacks only the driver version', () => {
    expect(gpuFacts({ cuda: undefined })).toBeUndefined();
    expect(gpuFacts({ cuda: driver })).not.toHaveProperty('driverVersion');
  });

  it('plans a GPU map by position, refusing fewer GPUs than the checkpoint had', async () => {
    expect(planGpuMap([FAKE_GPU], [OTHER_GPU, FAKE_GPU])).toEqual([{ oldUuid: FAKE_GPU, newUuid: OTHER_GPU }]);
    expect((await failure(() => planGpuMap([FAKE_GPU, OTHER_GPU], [FAKE_GPU]))).code).toBe('CUDA_INVALID_ARGUMENT');
  });
});
