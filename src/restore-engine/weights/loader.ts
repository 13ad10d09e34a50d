/**
 * The weights load of a restore: every "file" allocation of the checkpoint's weights regions is read from
 * its source (several readers in parallel, each through its own pinned host buffer) into a GPU allocation
 * made with a POSIX-fd shareable handle, and exported as an fd for the worker (handover.ts). It runs while
 * CRIU and the CUDA restore run; the worker maps the fds at its recorded addresses after restore-complete.
 *
 * All or nothing: a source missing, of another size or another sha256, a CUDA call that fails, a GPU whose
 * granularity differs - the load rejects with its WeightsError and everything it made is released (no fd,
 * no allocation, no mapping left). The sources are opened by the caller's `openSource`, which must resolve
 * each path inside the container's rootfs or an allowed host model directory (never following a link out).
 */
import { closeSync } from 'node:fs';

import type { CudaVmm, CuU64, HostPointer } from '../../cuda/index.js';
import { WeightsError, WeightsErrorCode } from './errors.js';
import type { HandoverRegion } from './handover.js';
import type { WeightsRegionSpec, WeightsSource } from './regions-file.js';
import type { SourceDigests } from './source-digests.js';
import type { SourceFile } from './sources.js';

/** What openSource gives: a OpenedSource or a SourceFile (sources.ts, opened inside the rootfs). */
export type OpenedSource = Pick<SourceFile, 'fd' | 'stat' | 'read' | 'close'>;

/** Parallel readers: enough to keep NVMe queues and several page-cache copy threads busy. */
export const WEIGHTS_READERS_DEFAULT = 8;
/** Bytes per read/copy: large enough that per-call overheads vanish, small enough for 8 pinned buffers. */
export const WEIGHTS_CHUNK_BYTES_DEFAULT = 32 << 20;

export interface LoadWeightsOptions {
  regions: readonly WeightsRegionSpec[];
  vmm: CudaVmm;
  /** This node's CUDA ordinal for each region's recorded device (the restore's GPU map). */
  deviceFor: (recordedDevice: number) => number;
  /** Opens a source read-only, resolved inside the allowed roots; rejects (any error) when it cannot. */
  openSource: (path: string) => Promise<OpenedSource>;
  digests: SourceDigests;
  readers?: number;
  chunkBytes?: number;
  signal?: AbortSignal;
}

export interface LoadedWeights {
  /** One entry per region, fds in allocation order (file allocations only). */
  regions: HandoverRegion[];
  bytes: number;
  /** Closes the fds and releases the allocations (after the handover, or to abandon it). Idempotent. */
  release(): void;
}

interface Job {
  source: WeightsSource;
  fh: OpenedSource;
  va: CuU64;
  from: number;
  length: number;
}

interface Made {
  handle: CuU64;
  size: number;
  va?: CuU64;
  mapped: boolean;
  fd?: number;
  fh?: OpenedSource;
}

export async function loadWeights(options: LoadWeightsOptions): Promise<LoadedWeights> {
  const { vmm, digests } = options;
  const readers = Math.max(1, options.readers ?? WEIGHTS_READERS_DEFAULT);
  const chunk = Math.max(1 << 20, options.chunkBytes ?? WEIGHTS_CHUNK_BYTES_DEFAULT);
  const made: Made[] = [];
  const hosts: HostPointer[] = [];
  let released = false;
  const releaseAll = (): void => {
    if (released) return;
    released = true;
    for (const m of made) {
      try {
        if (m.fd !== undefined) vmmClose(m.fd);
        if (m.mapped && m.va !== undefined) vmm.unmap(m.va, m.size);
        if (m.va !== undefined) vmm.addressFree(m.va, m.size);
        if (m.handle !== 0) vmm.release(m.handle);
      } catch {
        // best effort: a failure here leaves GPU memory to the driver's process teardown
      }
    }
    for (const h of hosts) {
      try {
        vmm.freeHost(h);
      } catch {
        // as above
      }
    }
  };
  const closeFiles = async (): Promise<void> => {
    await Promise.all(made.map((m) => m.fh?.close().catch(() => undefined)));
  };
  try {
    const jobs: Job[] = [];
    const verifies: Array<Promise<void>> = [];
    const out: HandoverRegion[] = [];
    let bytes = 0;
    for (const region of options.regions) {
      const device = options.deviceFor(region.device);
      vmm.useDevice(device);
      const granularity = vmm.granularity(device);
      if (region.size % granularity !== 0 || region.allocations.some((a) => a.offset % granularity !== 0 || a.size % granularity !== 0)) {
        throw new WeightsError(WeightsErrorCode.GPU_MISMATCH, `GPU ${device} allocates in ${granularity}-byte granules; the region does not fit them`, {
          step: 'check the GPU',
          evidence: { region: region.name, granularity, recorded: region.granularity },
        });
      }
      const regionFds: number[] = [];
      for (const alloc of region.allocations) {
        if (alloc.kind !== 'file' || !alloc.source) continue;
        const src = alloc.source;
        let fh: OpenedSource;
        try {
          fh = await options.openSource(src.path);
        } catch (err) {
          throw new WeightsError(WeightsErrorCode.SOURCE_MISSING, `cannot open ${src.path}`, { step: 'open a weights source', cause: err, evidence: { path: src.path } });
        }
        const m: Made = { handle: 0, size: alloc.size, mapped: false, fh };
        made.push(m);
        const st = await fh.stat();
        if (!st.isFile() || st.size !== src.fileSize) {
          throw new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `${src.path} is not the recorded ${src.fileSize}-byte file`, {
            step: 'check a weights source',
            evidence: { path: src.path, size: st.size, recorded: src.fileSize },
          });
        }
        m.handle = vmm.createShareable(device, alloc.size);
        m.va = vmm.reserve(alloc.size);
        vmm.map(m.va, alloc.size, m.handle, device);
        m.mapped = true;
        if (src.length < alloc.size) vmm.memset(addVa(m.va, src.length), 0, alloc.size - src.length);
        for (let from = 0; from < src.length; from += chunk) {
          jobs.push({ source: src, fh, va: m.va, from, length: Math.min(chunk, src.length - from) });
        }
        verifies.push(
          digests.digest(fh).then((sha) => {
            if (sha !== src.sha256) {
              throw new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `${src.path} has another sha256 than the checkpoint recorded`, {
                step: 'check a weights source',
                evidence: { path: src.path, sha256: sha, recorded: src.sha256 },
              });
            }
          }),
        );
        bytes += src.length;
        regionFds.push(-1);
      }
      out.push({ name: region.name, fds: regionFds });
    }
    // The readers share one queue of chunks over all files; each owns one pinned buffer.
    let next = 0;
    const reader = async (): Promise<void> => {
      const host = vmm.hostAlloc(chunk);
      hosts.push(host);
      for (;;) {
        options.signal?.throwIfAborted();
        const job = jobs[next++];
        if (!job) return;
        let got = 0;
        while (got < job.length) {
          const n = await vmm.preadInto(job.fh.fd, host, job.length - got, job.source.fileOffset + job.from + got);
          if (n === 0) {
            throw new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `${job.source.path} ended early`, { step: 'read a weights source', evidence: { path: job.source.path } });
          }
          // pread into the buffer's start each time: a short read is copied before the next one.
          vmm.copyHtoD(addVa(job.va, job.from + got), host, n);
          got += n;
        }
      }
    };
    const settled = await Promise.allSettled([...Array.from({ length: Math.min(readers, Math.max(1, jobs.length)) }, reader), ...verifies]);
    const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed) throw failed.reason instanceof WeightsError ? failed.reason : cudaError(failed.reason);
    vmm.synchronize();
    // Export, then drop the agent's own mappings: the worker maps the memory at its VA.
    let i = 0;
    for (const r of out) {
      const fds = r.fds as number[];
      for (let j = 0; j < fds.length; j++, i++) {
        const m = made[i]!;
        m.fd = vmm.exportFd(m.handle);
        fds[j] = m.fd;
        vmm.unmap(m.va!, m.size);
        m.mapped = false;
        vmm.addressFree(m.va!, m.size);
        m.va = undefined;
      }
    }
    for (const h of hosts.splice(0)) vmm.freeHost(h);
    await closeFiles();
    return { regions: out, bytes, release: releaseAll };
  } catch (err) {
    await closeFiles();
    releaseAll();
    throw err instanceof WeightsError ? err : cudaError(err);
  }
}

function cudaError(err: unknown): WeightsError {
  if (err instanceof WeightsError) return err;
  return new WeightsError(WeightsErrorCode.CUDA, (err as Error)?.message ?? String(err), { step: 'load the weights', cause: err });
}

function addVa(va: CuU64, n: number): CuU64 {
  return typeof va === 'bigint' ? va + BigInt(n) : va + n;
}

function vmmClose(fd: number): void {
  closeSync(fd);
}
