/**
 * The engine's CUDA steps (design.md, Checkpoint step 3 and Restore step 3), built on src/cuda:
 *
 *   loadNodeCuda            the driver and NVML, loaded once per process; none → workers are CPU-only
 *   checkpointHooksFactory  a fresh CheckpointCudaHooks per checkpoint: lock + checkpoint before the dump,
 *                           restore + unlock after it, and the manifest's `constraints.gpu` when the
 *                           container had CUDA processes
 *   cudaRestoreStep         after the CRIU restore: restore + unlock every CUDA process of the restored tree,
 *                           onto this node's GPUs (a GPU map when they differ from the checkpoint's)
 *
 * The agent's own pid is never handed to the driver: a process that called cuInit counts as a CUDA process
 * (driver 580 on the H100), and locking the caller itself would hang the checkpoint.
 *
 * Tensor-parallel workers (one CUDA process per GPU in one container) are one set: every rank is locked
 * before any is checkpointed, and a lock that fails or times out on one unlocks the others (lockAll), so the
 * worker keeps serving; every rank is restored before any is unlocked, and a rank that fails makes the whole
 * restore throw (a cold start). A lock cannot deadlock on a collective because the SDK quiesces every rank's
 * communicators before the container's one ready-for-checkpoint (sdk/python/thaw_worker.py), and a rank
 * that did not is bounded by the driver's lock timeout. The manifest records the GPU count and the rank
 * count; a node with fewer GPUs refuses the checkpoint at CreateContainer (checkCompatibility, gpu.count).
 *
 * GPU identity: the UUIDs are the GPUs this process sees, in CUDA ordinal order. On a node whose containers
 * see a subset of the GPUs, that is more than the container used; resolving the container's own GPUs (DRA,
 * kubelet PodResources, as Dynamo does) is left for multi-GPU nodes.
 */
import type { Logger } from '../log.js';
import {
  CudaCheckpointApi,
  CudaError,
  CudaErrorCode,
  CudaVmm,
  checkpointCudaHooks,
  gpuFacts,
  planGpuMap,
  tryLoadCuda,
  tryLoadNvml,
  type GpuFacts,
  type Nvml,
} from '../cuda/index.js';
import type { CheckpointCudaHooks } from '../restore-engine/index.js';
import { processTree } from '../restore-engine/index.js';
import type { GpuConstraints } from '../store/index.js';
import type { CudaRestoreStep } from '../restore-engine/index.js';

/** Every pid of the tree under `pid`, from the host's /proc. */
const hostProcessTree = (pid: number): Promise<number[]> => processTree('/proc', pid);

/** What the engine holds when the node has a usable driver. */
export interface NodeCuda {
  api: CudaCheckpointApi;
  /** The driver's VMM calls, for the weights service (shareable allocations, export); absent when it lacks them. */
  vmm?: CudaVmm;
  /** NVML, for the GPU memory of a container's processes and the driver version; absent when it did not load. */
  nvml?: Nvml;
  /** This node's GPUs as a manifest records them; undefined when the driver shows no GPU. */
  facts: GpuFacts | undefined;
}

export interface LoadNodeCudaOptions {
  /** libcuda to load (default the soname the loader finds); tests pass the fake's path. */
  libcudaPath?: string;
  libnvmlPath?: string;
  logger: Logger;
}

/**
 * Loads the driver and NVML once. No driver (or no checkpoint API, or cuInit failing) is normal on a CPU
 * node: one info line, and undefined.
 */
export function loadNodeCuda(o: LoadNodeCudaOptions): NodeCuda | undefined {
  const cuda = tryLoadCuda(o.libcudaPath !== undefined ? { path: o.libcudaPath } : {});
  if (!cuda.ok) {
    o.logger.info('no CUDA driver: workers are checkpointed as CPU-only', { reason: cuda.reason });
    return undefined;
  }
  const loadedNvml = tryLoadNvml(o.libnvmlPath !== undefined ? { path: o.libnvmlPath } : {});
  if (!loadedNvml.ok) o.logger.warn('NVML unavailable: manifests record no driver version nor GPU memory', { reason: loadedNvml.reason });
  const nvml = loadedNvml.ok ? loadedNvml.nvml : undefined;
  const facts = gpuFacts({ cuda: cuda.driver, nvml });
  const api = new CudaCheckpointApi(cuda.driver, { logger: o.logger.child({ component: 'cuda' }) });
  o.logger.info('CUDA driver loaded', { path: cuda.driver.path, cudaApiVersion: cuda.driver.driverVersion, gpus: facts?.uuids ?? [], model: facts?.model });
  let vmm: CudaVmm | undefined;
  try {
    vmm = new CudaVmm(cuda.driver);
  } catch (err) {
    // A driver without the VMM calls: checkpoints whose weights are outside them cold-start (WEIGHTS_UNAVAILABLE).
    o.logger.warn('the CUDA driver has no VMM calls: no weights service', { error: err });
  }
  return { api, facts, ...(vmm ? { vmm } : {}), ...(nvml ? { nvml } : {}) };
}

/** `pids` without the agent's own pid (see the file comment). */
export function withoutOwnPid(pids: readonly number[], ownPid: number): number[] {
  return pids.filter((p) => p !== ownPid);
}

/** The manifest's GPU constraints for a container whose CUDA processes are `cudaPids`. */
export function gpuConstraintsFor(facts: GpuFacts, cudaPids: readonly number[], nvml: Nvml | undefined, logger: Logger): GpuConstraints {
  const gpu: GpuConstraints = {
    model: facts.model,
    uuids: [...facts.uuids],
    cudaApiVersion: facts.cudaApiVersion,
    count: facts.uuids.length,
    cudaProcesses: cudaPids.length,
  };
  if (facts.driverVersion !== undefined) gpu.driverVersion = facts.driverVersion;
  if (nvml) {
    try {
      const byPid = nvml.gpuMemoryByPid();
      gpu.memoryBytes = cudaPids.reduce((sum, p) => sum + (byPid.get(p) ?? 0), 0);
    } catch (err) {
      // The size is informative; a checkpoint does not fail for want of it.
      logger.warn('NVML could not list GPU processes; the manifest records no GPU memory', { error: err });
    }
  }
  return gpu;
}

export interface CheckpointHooksOptions {
  node: NodeCuda;
  lockTimeoutMs?: number;
  logger: Logger;
  /** Default process.pid; tests pass another. */
  ownPid?: number;
}

/**
 * A factory of CheckpointCudaHooks, one per checkpoint (each records its own GPU constraints and timings).
 * The GPU constraints are taken at lock time, while the processes still hold their GPU memory.
 */
export function checkpointHooksFactory(o: CheckpointHooksOptions): () => CheckpointCudaHooks {
  const ownPid = o.ownPid ?? process.pid;
  return () => {
    const inner = checkpointCudaHooks(o.node.api, o.lockTimeoutMs !== undefined ? { lockTimeoutMs: o.lockTimeoutMs } : {});
    let gpu: GpuConstraints | undefined;
    return {
      async lock(pids, signal) {
        const mine = withoutOwnPid(pids, ownPid);
        const cudaPids = o.node.api.findCudaProcesses(mine);
        gpu = cudaPids.length > 0 && o.node.facts ? gpuConstraintsFor(o.node.facts, cudaPids, o.node.nvml, o.logger) : undefined;
        await inner.lock(mine, signal);
      },
      checkpoint: (pids, signal) => inner.checkpoint(withoutOwnPid(pids, ownPid), signal),
      restoreAndUnlock: (pids, signal) => inner.restoreAndUnlock(withoutOwnPid(pids, ownPid), signal),
      gpuConstraints: () => gpu,
    };
  };
}

export interface CudaRestoreStepOptions {
  node: NodeCuda;
  logger: Logger;
  ownPid?: number;
  /** The host pids of the restored tree (default: /proc children from its root). */
  treePids?: (rootHostPid: number) => Promise<number[]>;
}

/**
 * The restore coordinator's CUDA step. A checkpoint without `constraints.gpu` had no CUDA process: nothing to
 * do. Otherwise the restored tree must hold CUDA processes, and every one of them is restored (with a GPU
 * map from the checkpoint's GPUs to this node's; all-identity → no map) and unlocked. Any failure throws;
 * the coordinator turns it into a cold start with cause RESTORE_DEVICES.
 */
export function cudaRestoreStep(o: CudaRestoreStepOptions): CudaRestoreStep {
  const ownPid = o.ownPid ?? process.pid;
  const treePids = o.treePids ?? hostProcessTree;
  return async (tree, ctx) => {
    const wanted = ctx.checkpoint.manifest.constraints.gpu;
    if (wanted === undefined) return;
    const treeHostPids = withoutOwnPid(await treePids(tree.hostPid), ownPid);
    const pids = o.node.api.findCudaProcesses(treeHostPids);
    if (pids.length === 0) {
      // The source had CUDA processes; a tree without any would be called restored while its GPU state is lost.
      throw new CudaError(CudaErrorCode.CALL_FAILED, 'the checkpoint holds GPU state but the driver sees no CUDA process in the restored tree', {
        step: 'find the restored CUDA processes',
        evidence: { pids: treeHostPids },
      });
    }
    if (wanted.cudaProcesses !== undefined && pids.length !== wanted.cudaProcesses) {
      // A tensor-parallel worker is restored as a set: a rank missing (or one more than checkpointed) would
      // hang its peers' first collective, so no rank is restored and the restore falls back.
      throw new CudaError(
        CudaErrorCode.CALL_FAILED,
        `the checkpoint held ${wanted.cudaProcesses} CUDA process(es), the restored tree has ${pids.length}`,
        { step: 'find the restored CUDA processes', evidence: { pids, expected: wanted.cudaProcesses } },
      );
    }
    const gpuMap = wanted.uuids !== undefined && wanted.uuids.length > 0 ? planGpuMap(wanted.uuids, o.node.facts?.uuids ?? []) : undefined;
    const timing = await o.node.api.restoreAndUnlockAll(pids, gpuMap !== undefined ? { gpuMap } : {});
    o.logger.info('cuda restore and unlock', { containerId: ctx.container.containerId, pids, restoreMs: timing.restore.totalMs, unlockMs: timing.unlock.totalMs });
  };
}

/**
 * A checkpoint source found by a restarted agent (NRI Synchronize) may have CUDA processes its predecessor left
 * locked or checkpointed: killed between the driver's checkpoint and its restore, the agent took CRIU with it
 * (parentDeathWrapper) but the worker's GPU state stayed in host memory and its CUDA calls block. Brings every
 * such process of the container's tree back to running; returns the pids it found stuck. Never throws: a
 * failure is logged and the source's flow goes on (its next checkpoint fails cleanly if the driver refuses).
 */
export async function recoverCudaProcesses(
  node: NodeCuda,
  initPid: number,
  logger: Logger,
  options: { ownPid?: number; treePids?: (pid: number) => Promise<number[]> } = {},
): Promise<number[]> {
  try {
    const tree = await (options.treePids ?? hostProcessTree)(initPid);
    const cudaPids = node.api.findCudaProcesses(withoutOwnPid(tree, options.ownPid ?? process.pid));
    const states = new Map(cudaPids.map((p) => [p, node.api.getState(p)] as const));
    const stuck = cudaPids.filter((p) => states.get(p) === 'locked' || states.get(p) === 'checkpointed');
    if (stuck.length === 0) return [];
    logger.warn('CUDA processes left locked or checkpointed by a previous agent: restoring and unlocking them', {
      initPid,
      pids: stuck,
      states: Object.fromEntries(stuck.map((p) => [p, states.get(p)])),
    });
    await node.api.restoreAndUnlockAll(stuck);
    logger.info('CUDA processes restored and unlocked', { initPid, pids: stuck });
    return stuck;
  } catch (err) {
    logger.error('recovering CUDA processes left by a previous agent failed', { initPid, error: err });
    return [];
  }
}
