/**
 * bench/gpu/check-real-driver.ts (run on the H100 against the real driver) run here against the fake
 * driver, so the script the lead runs there is known to work end to end before it gets there.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { checkRealDriver } from '../../bench/gpu/check-real-driver.js';
import { FAKE_LIBCUDA, FAKE_NVML, buildFakeLibraries, clearFakeEnv, setFakeEnv } from '../helpers/cuda-fake-lib.js';

beforeAll(() => {
  buildFakeLibraries();
  clearFakeEnv();
});

describe('check-real-driver against the fake driver', () => {
  it('passes every step and records what the driver says where the docs are silent', async () => {
    setFakeEnv({ FAKE_CUDA_PIDS: '4242' });
    const report = await checkRealDriver({ pid: 4242, libcudaPath: FAKE_LIBCUDA, nvmlPath: FAKE_NVML, stallCheckMs: 0 });
    expect(report.steps.filter((s) => !s.ok)).toEqual([]);
    expect(report.ok).toBe(true);
    expect(report.driverVersion).toBe(13000);
    expect(report.observed['getState of a non-CUDA pid']).toMatchObject({ resultName: 'CUDA_ERROR_NOT_INITIALIZED' });
    expect(report.observed['getState of this process (it called cuInit)']).toBe('succeeded');
    expect(report.observed['checkpoint of a running process']).toMatchObject({ resultName: 'CUDA_ERROR_ILLEGAL_STATE' });
    expect(report.observed['restore with a map onto an absent GPU']).toMatchObject({ resultName: 'CUDA_ERROR_INVALID_VALUE' });
    expect(report.steps.map((s) => s.name)).toContain('round 2: restore with an explicit identity GPU pair (13.0 args layout)');
  });

  it('reports a missing driver as one failed step', async () => {
    const report = await checkRealDriver({ pid: 1, libcudaPath: '/nonexistent/libcuda.so.1' });
    expect(report.ok).toBe(false);
    expect(report.steps).toEqual([{ name: 'load libcuda', ok: false, error: expect.objectContaining({ code: 'CUDA_UNAVAILABLE' }) }]);
  });
});
