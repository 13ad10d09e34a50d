/**
 * sha256 of received blobs in worker threads, so that hashing every byte of a pull does not take the event
 * loop's core from the socket reads (bench/RESULTS.md, bench:registry: hashing on the event loop cost about
 * 30% of the pull rate on the 2-core machine).
 *
 * A stream is bound to one worker, which hashes its updates in the order they were sent. Bytes in shared
 * memory (the pull's slabs, slab-pool.ts) reach the worker without a copy; other bytes are copied by
 * postMessage. update() resolves when the worker has hashed the bytes, and only then may their memory be
 * reused. The worker's code is given as a string (`eval`), so the same module works from the build and from
 * the TypeScript sources the tests run.
 *
 * A stream can also take bytes from a file the worker reads itself (the whole-file sha256 of a pulled file,
 * computed from the page cache as its chunks complete, off the event loop).
 *
 * Failures: a worker that exits or throws rejects every pending call of every stream bound to it with OCI_IO;
 * close() terminates the workers and rejects what is pending the same way. A digest is never guessed.
 */
import { availableParallelism } from 'node:os';
import { OciError, OciErrorCode } from './errors.js';
import { WorkerCalls } from './worker-calls.js';

/** Worker threads by default: a core is left to the event loop, and more than 4 gain nothing at registry rates. */
export function defaultHashThreads(): number {
  return Math.max(1, Math.min(4, availableParallelism() - 1));
}

/** One blob's running sha256. */
export interface Sha256Stream {
  /** Hashes `data` after what was sent before; resolves when the worker is done reading it. */
  update(data: Uint8Array): Promise<void>;
  /**
   * Hashes bytes [offset, offset + length) of an open file after what was sent before, read by the worker
   * itself (pread: the descriptor's position is untouched); resolves when they are hashed.
   */
  updateFromFile(fd: number, offset: number, length: number): Promise<void>;
  /** `sha256:<hex>` of everything sent; the stream is done after it. */
  digest(): Promise<string>;
  /** Forgets the stream without a digest (a failed transfer). */
  abandon(): void;
}

/** Read size of updateFromFile. */
const FILE_READ_BYTES = 1024 * 1024;

// Messages to a worker: [op, stream id, sequence number, bytes?]. Replies: [sequence number, hex digest?, error?]
// (worker-calls.ts).
const OPEN = 0;
const UPDATE = 1;
const DIGEST = 2;
const DROP = 3;
const UPDATE_FROM_FILE = 4;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { readSync } = require('node:fs');
const hashes = new Map();
let buffer;
parentPort.on('message', ([op, id, seq, data]) => {
  try {
    if (op === ${OPEN}) { hashes.set(id, createHash('sha256')); return; }
    if (op === ${DROP}) { hashes.delete(id); return; }
    const hash = hashes.get(id);
    if (hash === undefined) throw new Error('no stream ' + id);
    if (op === ${UPDATE}) { hash.update(data); parentPort.postMessage([seq]); return; }
    if (op === ${UPDATE_FROM_FILE}) {
      buffer ??= Buffer.allocUnsafe(${FILE_READ_BYTES});
      const { fd, offset, length } = data;
      for (let pos = 0; pos < length; ) {
        const n = readSync(fd, buffer, 0, Math.min(buffer.length, length - pos), offset + pos);
        if (n === 0) throw new Error('fd ' + fd + ' ends at ' + (offset + pos) + ', before ' + (offset + length));
        hash.update(buffer.subarray(0, n));
        pos += n;
      }
      parentPort.postMessage([seq]);
      return;
    }
    hashes.delete(id);
    parentPort.postMessage([seq, hash.digest('hex')]);
  } catch (err) {
    parentPort.postMessage([seq, undefined, String(err && err.message || err)]);
  }
});
`;

class HashWorker {
  private readonly calls = new WorkerCalls(WORKER_SOURCE, { name: 'thaw-sha256', thread: 'sha256 worker thread', what: 'sha256 worker thread', step: 'hash received bytes' });
  /** Streams bound to it that are not done yet (the pool binds a new stream to the least busy worker). */
  open = 0;

  /** Sends a message; resolves with the worker's answer (ops that answer: UPDATE, UPDATE_FROM_FILE, DIGEST). */
  async call(op: number, id: number, data?: Uint8Array | { fd: number; offset: number; length: number }): Promise<string | undefined> {
    return (await this.calls.call((seq) => [op, id, seq, data])) as string | undefined;
  }

  send(op: number, id: number): void {
    this.calls.post([op, id, -1]);
  }

  terminate(reason: OciError): Promise<void> {
    return this.calls.terminate(reason);
  }
}

export class HashPool {
  private readonly workers: HashWorker[];
  private nextId = 0;
  private closed = false;

  constructor(o: { threads?: number } = {}) {
    const threads = o.threads ?? defaultHashThreads();
    if (!Number.isSafeInteger(threads) || threads < 1) throw new RangeError(`threads must be a positive integer (got ${threads})`);
    this.workers = Array.from({ length: threads }, () => new HashWorker());
  }

  /** A new stream, bound to the worker with the fewest open streams. */
  open(): Sha256Stream {
    if (this.closed) throw new OciError(OciErrorCode.IO, 'the sha256 workers are closed', { step: 'hash received bytes' });
    const worker = this.workers.reduce((a, b) => (b.open < a.open ? b : a));
    const id = this.nextId++;
    worker.open++;
    worker.send(OPEN, id);
    let done = false;
    const finish = (): void => {
      if (!done) worker.open--;
      done = true;
    };
    return {
      update: async (data) => {
        if (done) throw new Error('internal error: update of a finished sha256 stream');
        await worker.call(UPDATE, id, data);
      },
      updateFromFile: async (fd, offset, length) => {
        if (done) throw new Error('internal error: update of a finished sha256 stream');
        await worker.call(UPDATE_FROM_FILE, id, { fd, offset, length });
      },
      digest: async () => {
        if (done) throw new Error('internal error: digest of a finished sha256 stream');
        finish();
        return `sha256:${(await worker.call(DIGEST, id))!}`;
      },
      abandon: () => {
        if (done) return;
        finish();
        worker.send(DROP, id);
      },
    };
  }

  /** Terminates the workers; calls still pending reject with OCI_IO. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const reason = new OciError(OciErrorCode.IO, 'the sha256 workers were closed', { step: 'hash received bytes' });
    await Promise.all(this.workers.map((w) => w.terminate(reason)));
  }
}
