/**
 * One CUDA checkpoint cycle of a live process through src/cuda, as the restore engine runs it on a
 * source that goes on serving: find the CUDA pids, lock, checkpoint, restore, unlock; prints the
 * timings and NVML's per-process GPU memory before and after the checkpoint as JSON. No CRIU.
 *
 *   node dist/bench/gpu/cuda-cycle.js --pid PID [--pid PID ...] [--lock-timeout-ms 10000]
 */
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { CudaCheckpointApi, loadCuda, tryLoadNvml } from '../../src/cuda/index.js';

export async function cudaCycle(pids: number[], lockTimeoutMs: number, libcudaPath?: string): Promise<Record<string, unknown>> {
  const api = new CudaCheckpointApi(loadCuda(libcudaPath !== undefined ? { path: libcudaPath } : {}));
  const nvml = tryLoadNvml();
  const memory = (): Record<number, number | undefined> => {
    const byPid = nvml.ok ? nvml.nvml.gpuMemoryByPid() : new Map<number, number>();
    return Object.fromEntries(pids.map((p) => [p, byPid.get(p)]));
  };
  const cudaPids = api.findCudaProcesses(pids);
  const gpuBytesBefore = memory();
  const lock = await api.lockAll(cudaPids, { timeoutMs: lockTimeoutMs });
  const checkpoint = await api.checkpointAll(cudaPids);
  const gpuBytesCheckpointed = memory();
  const { restore, unlock } = await api.restoreAndUnlockAll(cudaPids);
  return { cudaPids, gpuBytesBefore, gpuBytesCheckpointed, gpuBytesAfter: memory(), lock, checkpoint, restore, unlock };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { pid: { type: 'string', multiple: true }, 'lock-timeout-ms': { type: 'string' }, libcuda: { type: 'string' } },
  });
  const pids = (values.pid ?? []).map(Number);
  if (pids.length === 0) throw new Error('--pid is required');
  const result = await cudaCycle(pids, Number(values['lock-timeout-ms'] ?? 10_000), values.libcuda);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main().catch((err: unknown) => {
    process.stderr.write(`cuda-cycle: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 1;
  });
}
