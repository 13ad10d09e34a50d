/**
 * The receive path of a pull, without a registry: blob bodies read from a real socket into shared slabs
 * (blob-stream.ts, slab-pool.ts), and their sha256 in worker threads (hash-pool.ts). Bodies are sent in random
 * pieces to a consumer slower than the socket (so slabs run out and the socket pauses), and must come out byte
 * for byte; positional writes in the write thread; a body cut short, a wrong digest, a failed write, a closed
 * pool each fail with their code.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import { MIN_SLAB_BYTES, openBlobStream, type BodySegment } from '../../src/store/oci/blob-stream.js';
import { OciErrorCode } from '../../src/store/oci/errors.js';
import { HashPool } from '../../src/store/oci/hash-pool.js';
import { SlabPool } from '../../src/store/oci/slab-pool.js';
import { WriteThread } from '../../src/store/oci/write-thread.js';
import { rejection } from '../helpers/rejection.js';

const sha256 = (data: Uint8Array): string => `sha256:${createHash('sha256').update(data).digest('hex')}`;

/** A deterministic generator of piece sizes in [1, max]. */
function pieces(seed: number, max: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return ((x >>> 0) % max) + 1;
  };
}

/** A server that answers every connection with `head` then `body` written in random pieces, then closes. */
async function serve(head: string, body: Buffer, o: { maxPiece?: number; seed?: number } = {}): Promise<{ url: URL; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
    socket.once('data', async () => {
      socket.write(head);
      const next = pieces(o.seed ?? 7, o.maxPiece ?? 256 * 1024);
      for (let off = 0; off < body.length; ) {
        const n = Math.min(next(), body.length - off);
        if (!socket.write(body.subarray(off, off + n))) await new Promise((r) => socket.once('drain', r));
        off += n;
      }
      socket.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: new URL(`http://127.0.0.1:${port}/v2/r/blobs/sha256:x`),
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

/** Reads a body, each segment held for a while (a consumer slower than the socket), released in order. */
async function collect(body: AsyncIterable<BodySegment>, holdMs = 1): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const segment of body) {
    parts.push(Buffer.from(segment.data)); // a copy: the slab is reused after release
    await sleep(holdMs);
    segment.release();
  }
  return Buffer.concat(parts);
}

/** Slabs in the pool that are free now (all of them, when nothing leaked). */
function freeSlabs(pool: SlabPool): number {
  const taken = [];
  for (let s = pool.tryAcquire(); s !== undefined; s = pool.tryAcquire()) taken.push(s);
  for (const s of taken) s.release();
  return taken.length;
}

const closers: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of closers.splice(0)) await c();
});

describe('blob bodies read into slabs', () => {
  it('delivers a body sent in random pieces byte for byte, with fewer slabs than the body needs, and gives every slab back', async () => {
    const body = randomBytes(3 * 1024 * 1024 + 4321);
    const server = await serve(`HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\nX-Pad: ${'p'.repeat(3000)}\r\n\r\n`, body);
    closers.push(server.close);
    const pool = new SlabPool({ slabBytes: MIN_SLAB_BYTES, slabs: 3 });
    const res = await openBlobStream({ url: server.url, headers: {}, timeoutMs: 10_000, step: 'test', pool });
    expect(res.kind).toBe('body');
    if (res.kind !== 'body') return;
    expect(res.contentLength).toBe(body.length);
    const got = await collect(res.body);
    expect(got.length).toBe(body.length);
    expect(sha256(got)).toBe(sha256(body));
    expect(freeSlabs(pool)).toBe(3);
  });

  it('a body cut short: the bytes received, then OCI_REGISTRY_UNAVAILABLE naming what is missing', async () => {
    const sent = randomBytes(700_000);
    const server = await serve(`HTTP/1.1 206 Partial Content\r\nContent-Length: 1000000\r\n\r\n`, sent, { seed: 3 });
    closers.push(server.close);
    const pool = new SlabPool({ slabBytes: MIN_SLAB_BYTES, slabs: 2 });
    const res = await openBlobStream({ url: server.url, headers: {}, timeoutMs: 10_000, step: 'test', pool });
    if (res.kind !== 'body') throw new Error(`expected a body, got ${res.kind}`);
    const parts: Buffer[] = [];
    const err = await rejection(
      (async () => {
        for await (const segment of res.body) {
          parts.push(Buffer.from(segment.data));
          segment.release();
        }
      })(),
    );
    expect(isThawError(err, OciErrorCode.REGISTRY_UNAVAILABLE), String(err)).toBe(true);
    expect(err.evidence).toMatchObject({ missing: 300_000 });
    expect(Buffer.concat(parts).equals(sent)).toBe(true);
    expect(freeSlabs(pool)).toBe(2);
  });

  it('answers other than 200/206 with a Content-Length are left to node:http (kind other), slabs given back', async () => {
    const pool = new SlabPool({ slabBytes: MIN_SLAB_BYTES, slabs: 1 });
    for (const head of ['HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n', 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n']) {
      const server = await serve(head, Buffer.alloc(0));
      closers.push(server.close);
      const res = await openBlobStream({ url: server.url, headers: {}, timeoutMs: 10_000, step: 'test', pool });
      expect(res.kind, head).toBe('other');
      expect(freeSlabs(pool)).toBe(1);
    }
  });

  it('a response head that never ends: OCI_PROTOCOL', async () => {
    const server = await serve(`HTTP/1.1 200 OK\r\nX-Long: ${'x'.repeat(100 * 1024)}`, Buffer.alloc(0));
    closers.push(server.close);
    const pool = new SlabPool({ slabBytes: MIN_SLAB_BYTES, slabs: 1 });
    const err = await rejection(openBlobStream({ url: server.url, headers: {}, timeoutMs: 10_000, step: 'test', pool }));
    expect(isThawError(err, OciErrorCode.PROTOCOL), String(err)).toBe(true);
    expect(freeSlabs(pool)).toBe(1);
  });

  it('a slab pool waits for a release, and an aborted wait rejects with OCI_ABORTED', async () => {
    const pool = new SlabPool({ slabBytes: 16, slabs: 1 });
    const held = pool.tryAcquire()!;
    expect(pool.tryAcquire()).toBeUndefined();
    const controller = new AbortController();
    const aborted = pool.acquire(controller.signal);
    const waiting = pool.acquire();
    controller.abort(new Error('stop'));
    const err = await rejection(aborted);
    expect(isThawError(err, OciErrorCode.ABORTED), String(err)).toBe(true);
    held.retain();
    held.release();
    held.release();
    const next = await waiting;
    expect(next.data.buffer).toBe(held.data.buffer);
    next.release();
    expect(() => next.release()).toThrow(/release of a free slab/);
  });
});

describe('the write thread', () => {
  it('writes shared and ordinary memory at their positions in pieces, and a failed write is OCI_IO with its errno', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-write-'));
    closers.push(() => rm(dir, { recursive: true, force: true }));
    const writer = new WriteThread(64 * 1024);
    closers.push(() => writer.close());
    const data = randomBytes(1024 * 1024 + 999);
    const shared = Buffer.from(new SharedArrayBuffer(data.length));
    data.copy(shared);
    const fh = await open(join(dir, 'f'), 'w+');
    closers.push(() => fh.close());
    // Two halves, written out of order, one from shared memory, at odd positions.
    await writer.write(fh.fd, shared.subarray(500_001), 500_001 + 3);
    await writer.write(fh.fd, data.subarray(0, 500_001), 3);
    const back = await readFile(join(dir, 'f'));
    expect(back.length).toBe(data.length + 3);
    expect(back.subarray(3).equals(data)).toBe(true);
    const ro = await open(join(dir, 'f'), 'r');
    closers.push(() => ro.close());
    const err = await rejection(writer.write(ro.fd, data.subarray(0, 10), 0));
    expect(isThawError(err, OciErrorCode.IO), String(err)).toBe(true);
    expect(err.evidence).toMatchObject({ errno: 'EBADF' });
  });

  it('close() rejects what is pending with OCI_IO', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-write-'));
    closers.push(() => rm(dir, { recursive: true, force: true }));
    const writer = new WriteThread(128 * 1024);
    const fh = await open(join(dir, 'f'), 'w');
    closers.push(() => fh.close());
    const pending = writer.write(fh.fd, Buffer.alloc(64 * 1024 * 1024), 0);
    const closing = writer.close();
    const err = await rejection(pending);
    await closing;
    expect(isThawError(err, OciErrorCode.IO), String(err)).toBe(true);
    expect(isThawError(await rejection(writer.write(fh.fd, Buffer.alloc(1), 0)), OciErrorCode.IO)).toBe(true);
  });
});

describe('sha256 in worker threads', () => {
  it('hashes shared and ordinary memory sent in random pieces, many streams interleaved over two workers', async () => {
    const pool = new HashPool({ threads: 2 });
    closers.push(() => pool.close());
    const blobs = Array.from({ length: 5 }, (_, i) => randomBytes(200_000 + i * 33_333));
    const shared = blobs.map((b) => {
      const s = Buffer.from(new SharedArrayBuffer(b.length));
      b.copy(s);
      return s;
    });
    const streams = blobs.map(() => pool.open());
    const offsets = blobs.map(() => 0);
    const next = pieces(11, 50_000);
    while (offsets.some((o, i) => o < blobs[i]!.length)) {
      await Promise.all(
        streams.map((stream, i) => {
          const start = offsets[i]!;
          if (start >= blobs[i]!.length) return undefined;
          const end = Math.min(blobs[i]!.length, start + next());
          offsets[i] = end;
          // Even streams from shared memory (no copy), odd ones from ordinary buffers (copied by postMessage).
          return stream.update((i % 2 === 0 ? shared[i]! : blobs[i]!).subarray(start, end));
        }),
      );
    }
    expect(await Promise.all(streams.map((s) => s.digest()))).toEqual(blobs.map(sha256));
  });

  it('a byte changed on the way gives another digest (what the pull reports as OCI_DIGEST_MISMATCH)', async () => {
    const pool = new HashPool({ threads: 1 });
    closers.push(() => pool.close());
    const blob = randomBytes(100_000);
    const tampered = Buffer.from(blob);
    tampered[54_321] = (tampered[54_321]! + 1) % 256;
    const stream = pool.open();
    await stream.update(tampered.subarray(0, 60_000));
    await stream.update(tampered.subarray(60_000));
    const actual = await stream.digest();
    expect(actual).toBe(sha256(tampered));
    expect(actual).not.toBe(sha256(blob));
  });

  it('takes bytes from a file the worker reads itself, after bytes sent before, and a range past the end is OCI_IO', async () => {
    const pool = new HashPool({ threads: 1 });
    closers.push(() => pool.close());
    const dir = await mkdtemp(join(tmpdir(), 'thaw-hash-'));
    closers.push(() => rm(dir, { recursive: true, force: true }));
    const data = randomBytes(3 * 1024 * 1024 + 77);
    await writeFile(join(dir, 'f'), data);
    const fh = await open(join(dir, 'f'), 'r');
    closers.push(() => fh.close());
    const stream = pool.open();
    await stream.update(data.subarray(0, 1000));
    await stream.updateFromFile(fh.fd, 1000, 2 * 1024 * 1024);
    await stream.updateFromFile(fh.fd, 1000 + 2 * 1024 * 1024, data.length - 1000 - 2 * 1024 * 1024);
    expect(await stream.digest()).toBe(sha256(data));
    const err = await rejection(pool.open().updateFromFile(fh.fd, data.length - 10, 20));
    expect(isThawError(err, OciErrorCode.IO), String(err)).toBe(true);
    expect(err.message).toMatch(/ends at/);
  });

  it('close() rejects what is pending with OCI_IO, and an abandoned stream leaves the others alone', async () => {
    const pool = new HashPool({ threads: 1 });
    const dropped = pool.open();
    const kept = pool.open();
    await dropped.update(Buffer.from('partial'));
    dropped.abandon();
    await kept.update(Buffer.from('abc'));
    expect(await kept.digest()).toBe(sha256(Buffer.from('abc')));
    const pending = pool.open().update(randomBytes(8 * 1024 * 1024));
    const closing = pool.close();
    const err = await rejection(pending);
    await closing;
    expect(isThawError(err, OciErrorCode.IO), String(err)).toBe(true);
    expect(() => pool.open()).toThrow(/closed/);
  });
});
