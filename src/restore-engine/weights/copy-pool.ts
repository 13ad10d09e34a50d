/**
 * The weights load's readers: worker threads, each with its own pinned host buffer and the device's primary
 * context current on its thread, that read a source range (pread), hash it when asked (sha256 of the whole
 * file, inline with the read: the head before the range and the tail after it are read for the hash only)
 * and copy it to the GPU (cuMemcpyHtoD from the pinned buffer). Nothing of that runs on the event loop: a
 * 16 GB load holds it for neither the copies nor the hashing.
 *
 * The fds are the main thread's (descriptors are per process); a task never outlives the load that made
 * it. The worker is given as source text (eval): the same code runs from dist/ and under vitest, which
 * cannot start a .ts worker.
 */
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';

/** One piece of a task: [from, from+length) of the file, copied to `va` (hex) or, null, only hashed. */
export interface CopySegment {
  from: number;
  length: number;
  va: string | null;
}

export interface CopyTask {
  fd: number;
  segments: CopySegment[];
  /** Hash every segment, in order, and resolve the sha256 hex. */
  hash: boolean;
}

export interface CopyResult {
  sha256?: string;
  /** Bytes copied to the GPU. */
  copied: number;
}

const WORKER_SOURCE = String.raw`
(function main() {
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const koffi = require(workerData.koffiPath);
const lib = koffi.load(workerData.libcudaPath);
const cuInit = lib.func('cuInit', 'int', ['uint32_t']);
const cuDeviceGet = lib.func('cuDeviceGet', 'int', [koffi.out(koffi.pointer('int')), 'int']);
const cuDevicePrimaryCtxRetain = lib.func('cuDevicePrimaryCtxRetain', 'int', [koffi.out(koffi.pointer('void *')), 'int']);
const cuCtxSetCurrent = lib.func('cuCtxSetCurrent', 'int', ['void *']);
const cuMemHostAlloc = lib.func('cuMemHostAlloc', 'int', [koffi.out(koffi.pointer('void *')), 'size_t', 'uint32_t']);
const cuMemFreeHost = lib.func('cuMemFreeHost', 'int', ['void *']);
const cuMemcpyHtoD = lib.func('cuMemcpyHtoD_v2', 'int', ['uint64_t', 'void *', 'size_t']);
const cuCtxSynchronize = lib.func('cuCtxSynchronize', 'int', []);
const check = (r, step) => { if (r !== 0) { const e = new Error(step + ' failed: CUresult ' + r); e.cuResult = r; throw e; } };
let host;
try {
  check(cuInit(0), 'cuInit');
  const dev = [0];
  check(cuDeviceGet(dev, workerData.device), 'cuDeviceGet');
  const ctx = [null];
  check(cuDevicePrimaryCtxRetain(ctx, dev[0]), 'cuDevicePrimaryCtxRetain');
  check(cuCtxSetCurrent(ctx[0]), 'cuCtxSetCurrent');
  const out = [null];
  check(cuMemHostAlloc(out, workerData.chunkBytes, 0), 'cuMemHostAlloc');
  host = out[0];
} catch (err) {
  parentPort.postMessage({ type: 'fatal', message: String(err && err.message || err), cuResult: err && err.cuResult });
  return;
}
const view = Buffer.from(koffi.view(host, workerData.chunkBytes));
parentPort.on('message', (m) => {
  if (m.type === 'stop') { cuMemFreeHost(host); parentPort.close(); return; }
  const hash = m.hash ? createHash('sha256') : undefined;
  let copied = 0;
  try {
    for (const s of m.segments) {
      let done = 0;
      const va = s.va === null ? null : BigInt(s.va);
      while (done < s.length) {
        const want = Math.min(workerData.chunkBytes, s.length - done);
        const n = readSync(m.fd, view, 0, want, s.from + done);
        if (n === 0) { const e = new Error('the file ended early'); e.ended = true; throw e; }
        if (hash) hash.update(view.subarray(0, n));
        if (va !== null) { check(cuMemcpyHtoD(va + BigInt(done), host, n), 'cuMemcpyHtoD'); copied += n; }
        done += n;
      }
    }
    if (m.hash) {
      // The file must end where the task does: a longer one is another file.
      if (readSync(m.fd, view, 0, 1, m.segments.length ? m.segments[m.segments.length - 1].from + m.segments[m.segments.length - 1].length : 0) !== 0) {
        const e = new Error('the file is longer than recorded'); e.ended = true; throw e;
      }
    }
    check(cuCtxSynchronize(), 'cuCtxSynchronize');
    parentPort.postMessage({ type: 'done', id: m.id, copied, sha256: hash ? hash.digest('hex') : undefined });
  } catch (err) {
    parentPort.postMessage({ type: 'error', id: m.id, message: String(err && err.message || err), cuResult: err && err.cuResult, ended: !!(err && err.ended) });
  }
});
parentPort.postMessage({ type: 'ready' });
})();
`;

/** A failed task: `ended` (the file is shorter or longer than recorded), `cuResult` (a CUDA call), else I/O. */
export class CopyTaskError extends Error {
  constructor(
    message: string,
    readonly ended: boolean,
    readonly cuResult: number | undefined,
  ) {
    super(message);
    this.name = 'CopyTaskError';
  }
}

export interface CopyPool {
  run(task: CopyTask): Promise<CopyResult>;
  /** Stops the threads (after the tasks in flight); frees their pinned buffers. */
  close(): Promise<void>;
}

type Reply = { type: 'ready' } | { type: 'fatal'; message: string; cuResult?: number } | { type: 'done'; id: number; copied: number; sha256?: string } | { type: 'error'; id: number; message: string; cuResult?: number; ended: boolean };

/** Starts `threads` readers for device `device` of the driver at `libcudaPath`; resolves once every one is ready. */
export async function startCopyPool(o: { libcudaPath: string; device: number; threads: number; chunkBytes: number }): Promise<CopyPool> {
  const koffiPath = createRequire(import.meta.url).resolve('koffi');
  const queue: Array<{ id: number; task: CopyTask; resolve: (r: CopyResult) => void; reject: (e: Error) => void }> = [];
  const pending = new Map<number, { resolve: (r: CopyResult) => void; reject: (e: Error) => void }>();
  const idle: Worker[] = [];
  const workers: Worker[] = [];
  let nextId = 1;
  let closed = false;
  const dispatch = (): void => {
    while (idle.length > 0 && queue.length > 0) {
      const w = idle.pop()!;
      const job = queue.shift()!;
      pending.set(job.id, job);
      w.postMessage({ type: 'task', id: job.id, ...job.task });
    }
  };
  const started = Array.from({ length: Math.max(1, o.threads) }, () => {
    const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { koffiPath, libcudaPath: o.libcudaPath, device: o.device, chunkBytes: o.chunkBytes } });
    workers.push(w);
    return new Promise<void>((resolve, reject) => {
      w.on('message', (m: Reply) => {
        if (m.type === 'ready') {
          resolve();
          idle.push(w);
          dispatch();
          return;
        }
        if (m.type === 'fatal') {
          reject(new CopyTaskError(m.message, false, m.cuResult));
          return;
        }
        const job = pending.get(m.id);
        pending.delete(m.id);
        if (m.type === 'done') job?.resolve({ copied: m.copied, ...(m.sha256 !== undefined ? { sha256: m.sha256 } : {}) });
        else job?.reject(new CopyTaskError(m.message, m.ended, m.cuResult));
        idle.push(w);
        dispatch();
      });
      w.on('error', (err) => {
        reject(err);
        for (const [id, job] of pending) {
          pending.delete(id);
          job.reject(err);
        }
      });
    });
  });
  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    for (const job of queue.splice(0)) job.reject(new Error('the copy pool closed'));
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            w.once('exit', () => resolve());
            w.postMessage({ type: 'stop' });
            // A thread stuck in a read: terminate (its pinned buffer goes with the process's context).
            setTimeout(() => void w.terminate(), 5_000).unref();
          }),
      ),
    );
  };
  try {
    await Promise.all(started);
  } catch (err) {
    await Promise.all(workers.map((w) => w.terminate()));
    throw err;
  }
  return {
    run(task) {
      if (closed) return Promise.reject(new Error('the copy pool is closed'));
      return new Promise((resolve, reject) => {
        queue.push({ id: nextId++, task, resolve, reject });
        dispatch();
      });
    },
    close,
  };
}
