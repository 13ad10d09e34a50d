import { describe, expect, it } from 'vitest';
import { ALLOCATOR_CACHE_WARN_SHARE, gpuMemoryReport } from '../../src/agent/gpu-memory-report.js';

const GiB = 2 ** 30;

describe('gpuMemoryReport', () => {
  it('nothing without GPU memory saved (a CPU-only checkpoint)', () => {
    expect(gpuMemoryReport(undefined, { gpuTensorBytes: 1 })).toBeUndefined();
    expect(gpuMemoryReport(0, {})).toBeUndefined();
  });

  it('saved bytes alone when the worker did not say what its tensors hold', () => {
    expect(gpuMemoryReport(2 * GiB, undefined)).toEqual({ savedBytes: 2 * GiB });
    expect(gpuMemoryReport(2 * GiB, { gpuTensorBytes: 'lots' })).toEqual({ savedBytes: 2 * GiB });
  });

  it('a released worker: cache is a small share, no warning', () => {
    const r = gpuMemoryReport(2.1 * GiB, { gpuTensorBytes: 1.26 * GiB, gpuAllocatorReservedBytes: 1.31 * GiB });
    expect(r?.tensorBytes).toBe(1.26 * GiB);
    expect(r?.allocatorCacheBytes).toBeCloseTo(0.05 * GiB, 0);
    expect(r?.allocatorCacheShare).toBeLessThan(ALLOCATOR_CACHE_WARN_SHARE);
    expect(r?.warning).toBeUndefined();
  });

  it('a worker that kept its allocator cache: warned, with the fix named', () => {
    const r = gpuMemoryReport(20 * GiB, { gpuTensorBytes: 2 * GiB, gpuAllocatorReservedBytes: 19 * GiB });
    expect(r?.allocatorCacheBytes).toBe(17 * GiB);
    expect(r?.allocatorCacheShare).toBe(0.85);
    expect(r?.warning).toMatch(/17\.00 GiB of the 20\.00 GiB .* allocator cache/);
    expect(r?.warning).toMatch(/torch\.cuda\.empty_cache\(\)/);
  });

  it('reserved below allocated (bad numbers) counts as no cache', () => {
    expect(gpuMemoryReport(GiB, { gpuTensorBytes: 10, gpuAllocatorReservedBytes: 5 })?.allocatorCacheBytes).toBe(0);
  });
});
