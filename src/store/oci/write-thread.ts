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
import { OciError, OciErrorCode } from './errors.js';
import { WorkerCalls } from './worker-calls.js';

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
    parentPort.postMessage([seq, undefined, String(err && err.message || err), err && err.code]);
  }
});
`;

export class WriteThread {
  private readonly calls: WorkerCalls;

  constructor(private readonly pieceBytes: number) {
    this.calls = new WorkerCalls(WORKER_SOURCE, { name: 'thaw-pull-write', thread: 'write thread', what: 'write', step: 'write layer' });
  }

  /** Writes all of `data` at `position` of `fd`; resolves once written (the memory may then be reused). */
  async write(fd: number, data: Uint8Array, position: number): Promise<void> {
    await this.calls.call((seq) => [seq, fd, data, position, this.pieceBytes]);
  }

  /** Terminates the thread; writes still pending reject with OCI_IO. */
  async close(): Promise<void> {
    await this.calls.terminate(new OciError(OciErrorCode.IO, 'the write thread was closed', { step: 'write layer' }));
  }
}
