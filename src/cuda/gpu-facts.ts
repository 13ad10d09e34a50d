/**
 * The node's GPU facts: what a checkpoint's manifest records (src/store/manifest.ts GpuConstraints, which
 * this shape matches field for field) and what a restore compares against it. From the CUDA driver
 * (model, UUIDs, CUDA API version, memory) and NVML (the kernel driver's version, which libcuda does not
 * report). Without a GPU: undefined.
 */
import { CudaError, CudaErrorCode } from './errors.js';
import type { GpuMapping } from './checkpoint-api.js';
import { formatGpuUuid, type CudaDriver } from './libcuda.js';
import type { Nvml } from './nvml.js';

export interface GpuFacts {
  /** The GPUs' model name ("NVIDIA H100 80GB HBM3"); distinct names joined by " + " on a mixed node. */
  model: string;
  /** Every GPU the driver shows this process, in CUDA ordinal order, "GPU-…" form. */
  uuids: string[];
  /** The kernel driver's version ("580.159.04"), from NVML; absent when NVML is not loaded. */
  driverVersion?: string;
  /** cuDriverGetVersion (13000 = CUDA 13.0). */
  cudaApiVersion: number;
  /** The smallest GPU's memory: what a restore onto any of them can count on. */
  memoryBytes: number;
}

export function gpuFacts(sources: { cuda: CudaDriver | undefined; nvml?: Nvml | undefined }): GpuFacts | undefined {
  const { cuda, nvml } = sources;
  if (!cuda) return undefined;
  const count = cuda.deviceCount();
  if (count === 0) return undefined;
  const names = new Set<string>();
  const uuids: string[] = [];
  let memoryBytes = Number.POSITIVE_INFINITY;
  for (let i = 0; i < count; i++) {
    const dev = cuda.device(i);
    names.add(cuda.deviceName(dev));
    uuids.push(formatGpuUuid(cuda.deviceUuid(dev)));
    memoryBytes = Math.min(memoryBytes, cuda.deviceTotalMemBytes(dev));
  }
  const facts: GpuFacts = { model: [...names].join(' + '), uuids, cudaApiVersion: cuda.driverVersion, memoryBytes };
  if (nvml) facts.driverVersion = nvml.driverVersion();
  return facts;
}

/**
 * The GPU map for restoring a checkpoint taken on `checkpointUuids` onto `nodeUuids`: pairs by position
 * (the process's CUDA ordinal i was checkpointUuids[i]; it becomes nodeUuids[i]), identity pairs included
 * (gpuPairsFor drops an all-identity map). The driver needs every checkpointed GPU in the map, so fewer
 * GPUs here than at checkpoint is an error.
 */
export function planGpuMap(checkpointUuids: readonly string[], nodeUuids: readonly string[]): GpuMapping[] {
  if (nodeUuids.length < checkpointUuids.length) {
    throw new CudaError(
      CudaErrorCode.INVALID_ARGUMENT,
      `the checkpoint ran on ${checkpointUuids.length} GPU(s), this container sees ${nodeUuids.length}`,
      { step: 'plan GPU map', evidence: { checkpointUuids: [...checkpointUuids], nodeUuids: [...nodeUuids] } },
    );
  }
  return checkpointUuids.map((oldUuid, i) => ({ oldUuid, newUuid: nodeUuids[i]! }));
}
