/**
 * Calls to one worker thread that answers them (the pull's write thread and sha256 workers): each call carries
 * a sequence number, the thread replies `[seq, result?, error?, errno?]`, and the call settles with it. A
 * thread that throws or exits, or terminate(), rejects every pending call with OCI_IO; so does every later call.
 */
import { Worker } from 'node:worker_threads';
import { OciError, OciErrorCode } from './errors.js';

export interface WorkerCallsNames {
  /** The thread's name (`worker.threadName`). */
  name: string;
  /** How errors name it: "the <thread> failed: ...", "the <thread> exited (code N)". */
  thread: string;
  /** The prefix of a call's own error: "<what>: <the thread's message>". */
  what: string;
  /** The step of every error. */
  step: string;
}

export class WorkerCalls {
  private readonly worker: Worker;
  private readonly pending = new Map<number, { resolve: (result: unknown) => void; reject: (err: unknown) => void }>();
  private seq = 0;
  private failure: OciError | undefined;

  /** `source`: the thread's code (`eval`, so the same module works from the build and from the TypeScript sources). */
  constructor(source: string, names: WorkerCallsNames) {
    this.worker = new Worker(source, { eval: true, name: names.name });
    this.worker.on('message', ([seq, result, error, code]: [number, unknown, string | undefined, string | undefined]) => {
      const p = this.pending.get(seq);
      if (p === undefined) return;
      this.pending.delete(seq);
      if (error === undefined) p.resolve(result);
      else p.reject(new OciError(OciErrorCode.IO, `${names.what}: ${error}`, { step: names.step, ...(code !== undefined ? { evidence: { errno: code } } : {}) }));
    });
    this.worker.on('error', (err) => this.fail(new OciError(OciErrorCode.IO, `the ${names.thread} failed: ${err.message}`, { step: names.step, cause: err })));
    this.worker.on('exit', (code) => this.fail(new OciError(OciErrorCode.IO, `the ${names.thread} exited (code ${code})`, { step: names.step, evidence: { exitCode: code } })));
  }

  /** Rejects what is pending, and every later call, with `err` (the first failure stays). */
  fail(err: OciError): void {
    this.failure ??= err;
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  /** Posts `message(seq)`; settles with the thread's answer to that sequence number. */
  call(message: (seq: number) => unknown): Promise<unknown> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const seq = this.seq++;
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve, reject });
      this.worker.postMessage(message(seq));
    });
  }

  /** Posts a message the thread does not answer (nothing is sent after a failure). */
  post(message: unknown): void {
    if (this.failure === undefined) this.worker.postMessage(message);
  }

  /** Fails what is pending with `reason`, then terminates the thread. */
  async terminate(reason: OciError): Promise<void> {
    this.fail(reason);
    await this.worker.terminate();
  }
}
