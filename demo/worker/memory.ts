/**
 * The demo worker's "weights": WORKER_MEMORY_MB of Buffers (outside the V8 heap) filled from a seed
 * with xorshift32, one independent stream per 64 MiB chunk. Pure and deterministic on one CPU
 * architecture (the words are stored in native byte order), so a test on the host computes the digest
 * a worker in a pod must report, before and after a checkpoint/restore.
 */
import { createHash } from 'node:crypto';

export const MIB = 1024 * 1024;
/** Chunk size: big enough that per-chunk overhead is nothing, small enough to fill one at a time. */
export const CHUNK_BYTES = 64 * MIB;
/** How many bytes /compute sums per answer. */
export const COMPUTE_PROBES = 64;

/** A non-zero 32-bit start state for chunk `index` of `seed` (xorshift32 must not start at 0). */
export function chunkSeed(seed: number, index: number): number {
  let h = Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(index + 1, 0xc2b2ae35);
  h ^= h >>> 16;
  h = Math.imul(h, 0x27d4eb2f);
  h ^= h >>> 15;
  return h === 0 ? 0x6d2b79f5 : h;
}

/** Fills `buf` (length a multiple of 4) with the xorshift32 stream of chunk `index` of `seed`. */
export function fillChunk(buf: Buffer, seed: number, index: number): void {
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  let x = chunkSeed(seed, index);
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
}

/** Sizes of the chunks of `memoryMb` MiB: full 64 MiB chunks and a smaller last one. */
export function chunkSizes(memoryMb: number): number[] {
  const total = memoryMb * MIB;
  const sizes: number[] = [];
  for (let off = 0; off < total; off += CHUNK_BYTES) sizes.push(Math.min(CHUNK_BYTES, total - off));
  return sizes;
}

/** Allocates and fills the worker's memory (allocUnsafeSlow: its own ArrayBuffer each, not pooled). */
export function allocateMemory(memoryMb: number, seed: number): Buffer[] {
  return chunkSizes(memoryMb).map((size, index) => {
    const buf = Buffer.allocUnsafeSlow(size);
    fillChunk(buf, seed, index);
    return buf;
  });
}

/** sha256 (hex) over the chunks in order. */
export function digestOf(chunks: readonly Buffer[]): string {
  const hash = createHash('sha256');
  for (const c of chunks) hash.update(c);
  return hash.digest('hex');
}

/** The digest a worker with this size and seed must report, computed with one reused chunk buffer. */
export function expectedDigest(memoryMb: number, seed: number): string {
  const hash = createHash('sha256');
  const sizes = chunkSizes(memoryMb);
  const scratch = Buffer.allocUnsafeSlow(sizes[0] ?? 0);
  sizes.forEach((size, index) => {
    const view = scratch.subarray(0, size);
    fillChunk(view, seed, index);
    hash.update(view);
  });
  return hash.digest('hex');
}

function mix32(a: number, b: number): number {
  let h = Math.imul(a ^ 0x85ebca6b, 0xcc9e2d51) ^ Math.imul(b + 0x165667b1, 0x1b873593);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The byte offsets /compute?x=N reads: COMPUTE_PROBES positions spread over all the memory by a hash of N. */
export function probeOffsets(x: number, totalBytes: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < COMPUTE_PROBES; i++) {
    // 52 bits from two 32-bit hashes, so every byte of memories above 4 GiB is reachable too.
    const wide = mix32(x, i) * 0x100000 + (mix32(x, i + COMPUTE_PROBES) & 0xfffff);
    out.push(wide % totalBytes);
  }
  return out;
}

/** The answer to /compute?x=N: the sum of the bytes at probeOffsets(N). Reads the live buffers. */
export function computeAnswer(chunks: readonly Buffer[], x: number): number {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  let sum = 0;
  for (const off of probeOffsets(x, total)) {
    const chunk = chunks[Math.floor(off / CHUNK_BYTES)];
    sum += chunk?.[off % CHUNK_BYTES] ?? 0;
  }
  return sum;
}

/** computeAnswer for a worker of this size and seed, without allocating its memory (for tests). */
export function expectedAnswer(memoryMb: number, seed: number, x: number): number {
  const sizes = chunkSizes(memoryMb);
  const total = sizes.reduce((n, s) => n + s, 0);
  const filled = new Map<number, Buffer>();
  let sum = 0;
  for (const off of probeOffsets(x, total)) {
    const index = Math.floor(off / CHUNK_BYTES);
    let chunk = filled.get(index);
    if (!chunk) {
      chunk = Buffer.allocUnsafeSlow(sizes[index] ?? 0);
      fillChunk(chunk, seed, index);
      filled.set(index, chunk);
    }
    sum += chunk[off % CHUNK_BYTES] ?? 0;
  }
  return sum;
}
