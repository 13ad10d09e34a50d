/**
 * Positional file writes of a pull in a worker thread of their own: the thread writes each segment in pieces
 * of at most `pieceBytes` with synchronous pwrite calls, one after the other, so that a segment costs one
 * message and no round trip through the event loop per piece (through libuv's pool, every 128 KiB piece of a
 * 2 GB pull waited for the event loop to queue the next one, and the event loop is also reading the sockets).
 * One thread: writes to one file are serialized anyway (ext4's inode lock), and ordering across files does
 * not matter.
 *
 * Bytes in shared memory (the pull's slabs) reach the thread without a copy. Failures: a failed write rejects
 * with OCI_IO naming the errno; a thread that exits, or close(), rejects everything pending with OCI_IO.
 */
import { Worker } from 'node:worker_threads';
import { OciError, OciErrorCode } from './errors.js';

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { writeSync } = require('node:fs');
parentPort.on('message', ([seq, fd, data, position, pieceBytes]) => {
  try {
    for (let off = 0; off < data.length; ) {
      const piece = Math.min(data.length - off, pieceBytes - ((position + off) % pieceBytes));
      off += writeSync(fd, data, off, piece, position + off);
    }
    parentPort.postMessage([seq]);
  } catch (err) {
    parentPort.postMessage([seq, String(err && err.message || err), err && err.code]);
  }
});
`;

export class WriteThread {
  private readonly worker: Worker;
  private readonly pending = new Map<number, { resolve: () => void; reject: (err: unknown) => void }>();
  private seq = 0;
  private failure: OciError | undefined;

  constructor(private readonly pieceBytes: number) {
    this.worker = new Worker(WORKER_SOURCE, { eval: true, name: 'thaw-pull-write' });
    this.worker.on('message', ([seq, error, code]: [number, string | undefined, string | undefined]) => {
      const p = this.pending.get(seq);
      if (p === undefined) return;
      this.pending.delete(seq);
      if (error === undefined) p.resolve();
      else p.reject(new OciError(OciErrorCode.IO, `write: ${error}`, { step: 'write layer', evidence: { errno: code } }));
    });
    this.worker.on('error', (err) => this.fail(new OciError(OciErrorCode.IO, `the write thread failed: ${err.message}`, { step: 'write layer', cause: err })));
    this.worker.on('exit', (code) => this.fail(new OciError(OciErrorCode.IO, `the write thread exited (code ${code})`, { step: 'write layer', evidence: { exitCode: code } })));
  }

  private fail(err: OciError): void {
    this.failure ??= err;
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  /** Writes all of `data` at `position` of `fd`; resolves once written (the memory may then be reused). */
  write(fd: number, data: Uint8Array, position: number): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const seq = this.seq++;
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve, reject });
      this.worker.postMessage([seq, fd, data, position, this.pieceBytes]);
    });
  }

  /** Terminates the thread; writes still pending reject with OCI_IO. */
  async close(): Promise<void> {
    this.fail(new OciError(OciErrorCode.IO, 'the write thread was closed', { step: 'write layer' }));
    await this.worker.terminate();
  }
}
