/**
 * The weights load of a restore: every "file" allocation of the checkpoint's weights regions is read from
 * its source into a GPU allocation made with a POSIX-fd shareable handle, and exported as an fd for the
 * worker (handover.ts). It runs while CRIU and the CUDA restore run; the worker maps the fds at its
 * recorded addresses. The reads, hashes and copies run on reader threads (copy-pool.ts), each with its own
 * pinned buffer, never on the event loop. A source whose digest this node stamped (SourceDigests, by file
 * identity) is split into chunks that every reader takes in parallel; one not hashed here yet is read by
 * one reader in order and hashed inline with the copy (its bytes are read once, not once more to hash).
 *
 * All or nothing: a source missing, of another size or another sha256, a CUDA call that fails, a GPU whose
 * granularity differs - the load rejects with its WeightsError and everything it made is released (no fd,
 * no allocation, no mapping left). The sources are opened by the caller's `openSource`, which must resolve
 * each path inside the container's rootfs or an allowed host model directory (never following a link out).
 */
import { WEIGHTS_READERS_DEFAULT } from '../../defaults.js';
import { closeSync } from 'node:fs';
import { untilOrAborted } from '../../util.js';

import type { CudaVmm, CuU64 } from '../../cuda/index.js';
import { CopyTaskError, startCopyPool, type CopyPool, type CopySegment } from './copy-pool.js';
import { WeightsError, WeightsErrorCode } from './errors.js';
import type { HandoverRegion } from './handover.js';
import type { WeightsRegionSpec } from './regions-file.js';
import type { DigestSource, SourceDigests } from './source-digests.js';
import type { SourceFile } from './sources.js';

/** What openSource gives: a OpenedSource or a SourceFile (sources.ts, opened inside the rootfs). */
export type OpenedSource = Pick<SourceFile, 'fd' | 'stat' | 'read' | 'close'>;

/** Bytes per read/copy: large enough that per-call overheads vanish, small enough for 8 pinned buffers. */
export const WEIGHTS_CHUNK_BYTES_DEFAULT = 32 << 20;

export interface LoadWeightsOptions {
  regions: readonly WeightsRegionSpec[];
  vmm: CudaVmm;
  /** This node's CUDA ordinal for each region's recorded device (the restore's GPU map). */
  deviceFor: (recordedDevice: number) => number;
  /** Opens a source read-only, resolved inside the allowed roots; rejects (any error) when it cannot. */
  /** The source's sha256 and size come with the path: a content-addressed place (the weights cache) needs them. */
  openSource: (path: string, want: { sha256: string; fileSize: number }) => Promise<OpenedSource>;
  digests: SourceDigests;
  readers?: number;
  chunkBytes?: number;
  /**
   * Awaited after the allocations and the readers' start, before the first read (never rejects): a restore whose
   * weights share a disk with its checkpoint lets the checkpoint's read go first, since CRIU and the CUDA restore
   * wait for it and the weights are handed over only after them.
   */
  readsAfter?: Promise<void>;
  signal?: AbortSignal;
}

export interface LoadedWeights {
  /** One entry per region, fds in allocation order (file allocations only). */
  regions: HandoverRegion[];
  bytes: number;
  /** The read/hash/copy phase alone (after the allocations were made; the reader threads' start included). */
  copyMs: number;
  /** Opening, checking and allocating before it (cuMemCreate of every allocation). */
  setupMs: number;
  /** Of copyMs, the wait for `readsAfter` before the first read (0 without it). */
  readWaitMs: number;
  /** Closes the fds and releases the allocations (after the handover, or to abandon it). Idempotent. */
  release(): void;
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
  let pool: CopyPool | undefined;
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
  };
  const closeFiles = async (): Promise<void> => {
    await Promise.all(made.map((m) => m.fh?.close().catch(() => undefined)));
  };
  const t0 = performance.now();
  let copyMs = 0;
  let readWaitMs = 0;
  try {
    const tasks: Array<() => Promise<void>> = [];
    const out: HandoverRegion[] = [];
    let bytes = 0;
    let device: number | undefined;
    for (const region of options.regions) {
      const dev = options.deviceFor(region.device);
      if (device !== undefined && dev !== device) {
        throw new WeightsError(WeightsErrorCode.GPU_MISMATCH, 'weights regions on more than one GPU are not loaded yet', { step: 'check the GPU', evidence: { devices: [device, dev] } });
      }
      device = dev;
      vmm.useDevice(dev);
      const granularity = vmm.granularity(dev);
      if (region.size % granularity !== 0 || region.allocations.some((a) => a.offset % granularity !== 0 || a.size % granularity !== 0)) {
        throw new WeightsError(WeightsErrorCode.GPU_MISMATCH, `GPU ${dev} allocates in ${granularity}-byte granules; the region does not fit them`, {
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
          fh = await options.openSource(src.path, { sha256: src.sha256, fileSize: src.fileSize });
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
        m.handle = vmm.createShareable(dev, alloc.size);
        m.va = vmm.reserve(alloc.size);
        vmm.map(m.va, alloc.size, m.handle, dev);
        m.mapped = true;
        if (src.length < alloc.size) vmm.memset(addVa(m.va, src.length), 0, alloc.size - src.length);
        const base = BigInt(m.va);
        const changed = (sha: string): WeightsError =>
          new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `${src.path} has another sha256 than the checkpoint recorded`, {
            step: 'check a weights source',
            evidence: { path: src.path, sha256: sha, recorded: src.sha256 },
          });
        const known = await digests.stamped(fh as DigestSource);
        if (known.sha256 !== undefined) {
          // Hashed on this node before and unchanged since: the chunks go to every reader in parallel.
          if (known.sha256 !== src.sha256) throw changed(known.sha256);
          for (let from = 0; from < src.length; from += chunk) {
            const length = Math.min(chunk, src.length - from);
            const segment: CopySegment = { from: src.fileOffset + from, length, va: `0x${(base + BigInt(from)).toString(16)}` };
            tasks.push(async () => void (await pool!.run({ fd: fh.fd, segments: [segment], hash: false })));
          }
        } else {
          // Not hashed here yet: one reader takes the file in order and hashes it inline with the copy (the head
          // before the range and the tail after it are read for the hash only).
          const segments: CopySegment[] = [{ from: 0, length: src.fileOffset, va: null }];
          for (let from = 0; from < src.length; from += chunk) segments.push({ from: src.fileOffset + from, length: Math.min(chunk, src.length - from), va: `0x${(base + BigInt(from)).toString(16)}` });
          const end = src.fileOffset + src.length;
          if (end < src.fileSize) segments.push({ from: end, length: src.fileSize - end, va: null });
          tasks.push(async () => {
            const r = await pool!.run({ fd: fh.fd, segments: segments.filter((x) => x.length > 0), hash: true });
            if (r.sha256 !== src.sha256) throw changed(r.sha256 ?? '');
            await digests.stamp(fh as DigestSource, known.identity, r.sha256);
          });
        }
        bytes += src.length;
        regionFds.push(-1);
      }
      out.push({ name: region.name, fds: regionFds });
    }
    const t1 = performance.now();
    if (tasks.length > 0) {
      options.signal?.throwIfAborted();
      pool = await startCopyPool({ libcudaPath: vmm.libraryPath, device: device ?? 0, threads: Math.min(readers, tasks.length), chunkBytes: chunk });
      const onAbort = (): void => void pool?.close();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      try {
        if (options.readsAfter !== undefined) {
          const tw = performance.now();
          await untilOrAborted(options.readsAfter, options.signal);
          readWaitMs = performance.now() - tw;
          options.signal?.throwIfAborted();
        }
        const settled = await Promise.allSettled(tasks.map((t) => t()));
        options.signal?.throwIfAborted();
        const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
        if (failed) throw readerError(failed.reason);
      } finally {
        options.signal?.removeEventListener('abort', onAbort);
        await pool.close();
      }
    }
    vmm.synchronize();
    copyMs = performance.now() - t1;
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
    await closeFiles();
    return { regions: out, bytes, copyMs: Math.round(copyMs), setupMs: Math.round(t1 - t0), readWaitMs: Math.round(readWaitMs), release: releaseAll };
  } catch (err) {
    await pool?.close().catch(() => undefined);
    await closeFiles();
    releaseAll();
    throw err instanceof WeightsError ? err : cudaError(err);
  }
}

/** A reader's failure as the load reports it: a file of another length is a changed source. */
function readerError(err: unknown): WeightsError {
  if (err instanceof WeightsError) return err;
  if (err instanceof CopyTaskError && err.ended) {
    return new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `a weights source is not the recorded length: ${err.message}`, { step: 'read a weights source', cause: err });
  }
  return cudaError(err);
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
