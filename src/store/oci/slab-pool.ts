/**
 * The receive buffers of a pull: a fixed set of equal slabs of shared memory (SharedArrayBuffer), allocated once
 * per pull and reused for every blob it fetches.
 *
 * A blob body is received straight into a slab (`net.Socket`'s `onread`, blob-stream.ts), and the filled part
 * is then read by two consumers at once without a copy: the sha256 worker thread (hash-pool.ts; shared memory
 * crosses to it without a copy or a transfer) and the positional file write. A slab goes back to the pool when
 * its last holder releases it (a reference count: the receiver while it fills the slab, plus one per segment
 * handed out). Waiting for a free slab is the pull's backpressure: a receiver that finds none pauses its socket.
 *
 * Measured on the 2-core machine (bench/RESULTS.md, bench:registry): a fresh 2 x 4 MiB write buffer per
 * transfer, a 64 KiB socket buffer per read and a copy of every byte into the write buffer cost CPU that the
 * registry and the page cache need; reusing a few slabs costs none of that.
 */
import { OciError, OciErrorCode } from './errors.js';

/** One slab: `data` spans the whole slab; holders call release() once each. */
export interface Slab {
  readonly data: Buffer;
  /** One more holder (a segment handed to a consumer). */
  retain(): void;
  /** A holder is done with the slab; the last one returns it to the pool. Throws when released too often. */
  release(): void;
}

export interface SlabPoolOptions {
  slabBytes: number;
  slabs: number;
}

export class SlabPool {
  readonly slabBytes: number;
  private readonly free: SlabImpl[] = [];
  private readonly waiters: Array<{ resolve: (slab: Slab) => void; reject: (err: unknown) => void; signal?: AbortSignal; onAbort?: () => void }> = [];

  constructor(o: SlabPoolOptions) {
    if (!Number.isSafeInteger(o.slabBytes) || o.slabBytes < 1) throw new RangeError(`slabBytes must be a positive integer (got ${o.slabBytes})`);
    if (!Number.isSafeInteger(o.slabs) || o.slabs < 1) throw new RangeError(`slabs must be a positive integer (got ${o.slabs})`);
    this.slabBytes = o.slabBytes;
    for (let i = 0; i < o.slabs; i++) this.free.push(new SlabImpl(Buffer.from(new SharedArrayBuffer(o.slabBytes)), (s) => this.giveBack(s)));
  }

  /** A free slab (one holder: the caller), or undefined when all are held. */
  tryAcquire(): Slab | undefined {
    const slab = this.free.pop();
    slab?.take();
    return slab;
  }

  /** A free slab, waiting (first come, first served) until one is released; rejects with OCI_ABORTED on `signal`. */
  acquire(signal?: AbortSignal): Promise<Slab> {
    if (signal?.aborted) return Promise.reject(new OciError(OciErrorCode.ABORTED, 'aborted by the caller', { step: 'wait for a receive buffer', cause: signal.reason }));
    if (this.waiters.length === 0) {
      const slab = this.tryAcquire();
      if (slab !== undefined) return Promise.resolve(slab);
    }
    return new Promise((resolve, reject) => {
      const waiter: (typeof this.waiters)[number] = { resolve, reject, ...(signal ? { signal } : {}) };
      if (signal !== undefined) {
        waiter.onAbort = () => {
          const i = this.waiters.indexOf(waiter);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(new OciError(OciErrorCode.ABORTED, 'aborted by the caller', { step: 'wait for a receive buffer', cause: signal.reason }));
        };
        signal.addEventListener('abort', waiter.onAbort, { once: true });
      }
      this.waiters.push(waiter);
    });
  }

  private giveBack(slab: SlabImpl): void {
    const waiter = this.waiters.shift();
    if (waiter === undefined) {
      this.free.push(slab);
      return;
    }
    if (waiter.onAbort !== undefined) waiter.signal?.removeEventListener('abort', waiter.onAbort);
    slab.take();
    waiter.resolve(slab);
  }
}

class SlabImpl implements Slab {
  private holders = 0;

  constructor(
    readonly data: Buffer,
    private readonly onFree: (slab: SlabImpl) => void,
  ) {}

  take(): void {
    this.holders = 1;
  }

  retain(): void {
    if (this.holders === 0) throw new Error('internal error: retain of a free slab');
    this.holders++;
  }

  release(): void {
    if (this.holders === 0) throw new Error('internal error: release of a free slab');
    if (--this.holders === 0) this.onFree(this);
  }
}
