/**
 * What a GPU checkpoint saved against what the worker's tensors hold. The driver's checkpoint copies every byte
 * of GPU memory a process holds — including PyTorch's cached-but-unused blocks — so a worker that skipped
 * `torch.cuda.empty_cache()` (or its engine's sleep/release) pays for its allocator's cache in checkpoint size
 * and restore time. The worker reports its tensor and allocator bytes in its ready-for-checkpoint payload
 * (`sdk/python/thaw_cuda.py` `memory_payload()`); the agent sets them against the GPU memory the driver saved
 * (NVML, per process, at lock time). Pure.
 */

/** Payload keys the SDKs write (bytes). */
export const PAYLOAD_TENSOR_BYTES = 'gpuTensorBytes';
export const PAYLOAD_ALLOCATOR_RESERVED_BYTES = 'gpuAllocatorReservedBytes';
/** Warn when more than this share of the saved GPU memory is allocator cache (reserved but holding no tensor). */
export const ALLOCATOR_CACHE_WARN_SHARE = 0.5;

export interface GpuMemoryReport {
  /** GPU memory the checkpoint saved (NVML's per-process used memory at lock time). */
  savedBytes: number;
  /** What the worker said its tensors hold (absent: it did not say). */
  tensorBytes?: number;
  /** Reserved by the allocator but holding no tensor. */
  allocatorCacheBytes?: number;
  /** allocatorCacheBytes / savedBytes. */
  allocatorCacheShare?: number;
  /** Set when most of what was saved is allocator cache: the fix, in words. */
  warning?: string;
}

const byteCount = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : undefined);

export function gpuMemoryReport(savedBytes: number | undefined, payload: Record<string, unknown> | undefined): GpuMemoryReport | undefined {
  if (savedBytes === undefined || savedBytes <= 0) return undefined;
  const report: GpuMemoryReport = { savedBytes };
  const tensors = byteCount(payload?.[PAYLOAD_TENSOR_BYTES]);
  const reserved = byteCount(payload?.[PAYLOAD_ALLOCATOR_RESERVED_BYTES]);
  if (tensors !== undefined) report.tensorBytes = tensors;
  if (tensors !== undefined && reserved !== undefined) {
    const cache = Math.max(0, reserved - tensors);
    report.allocatorCacheBytes = cache;
    report.allocatorCacheShare = Number((cache / savedBytes).toFixed(3));
    if (cache / savedBytes > ALLOCATOR_CACHE_WARN_SHARE) {
      report.warning =
        `${(cache / 2 ** 30).toFixed(2)} GiB of the ${(savedBytes / 2 ** 30).toFixed(2)} GiB of GPU memory saved is allocator cache holding no tensor: ` +
        'release it before writing ready-for-checkpoint (torch.cuda.empty_cache(); thaw_cuda.release_pytorch_cache(); vLLM sleep(level=1); SGLang release_memory_occupation)';
    }
  }
  return report;
}
