/**
 * Fuzz: thousands of random and mutated frames thrown at the plugin side of the transport (mux + ttrpc
 * server on conn 1 + ttrpc client on conn 2) over a real unix socket. Asserts: no crash, no unhandled
 * rejection, bounded time, and after each batch the connection either still answers a valid request or
 * was closed cleanly with a log line.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { Mux } from '../../src/nri-plugin/mux.js';
import { MuxDecoder, encodeMuxFrames } from '../../src/nri-plugin/mux-framing.js';
import { TtrpcClient } from '../../src/nri-plugin/ttrpc-client.js';
import { encodeRequest } from '../../src/nri-plugin/ttrpc-codec.js';
import { TtrpcDecoder, TtrpcMessageType, encodeTtrpcMessage } from '../../src/nri-plugin/ttrpc-framing.js';
import { TtrpcServer } from '../../src/nri-plugin/ttrpc-server.js';

let seed = 0x5eed;
const rnd = (): number => {
  seed = (seed * 1664525 + 1013904223) >>> 0;
  return seed / 2 ** 32;
};
const int = (n: number): number => Math.floor(rnd() * n);
const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => int(256)));
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)] as T;

/** A complete, honestly-framed ttrpc message with mutated content. */
function mutatedMessage(): Buffer {
  const kind = int(6);
  const streamId = pick([1, 2, 3, 5, 0, 0xffffffff - 2, int(2 ** 32)]);
  const type = pick([1, 1, 1, 2, 3, 0, int(256)]);
  const flags = pick([0, 0, 1, 2, 4, int(256)]);
  let body: Buffer;
  if (kind === 0) body = bytes(int(64));
  else if (kind === 1) {
    const valid = encodeRequest({ service: pick(['nri.pkg.api.v1alpha1.Plugin', 'x', '']), method: pick(['Echo', 'Configure', 'Nope', '']), payload: bytes(int(32)), timeoutNano: pick([0, 1, 1e6, 2e9]) });
    body = valid.subarray(0, int(valid.length + 1)); // truncated
  } else if (kind === 2) {
    const valid = encodeRequest({ service: 'nri.pkg.api.v1alpha1.Plugin', method: 'Echo', payload: bytes(int(16)) });
    body = Buffer.from(valid);
    for (let i = 0; i < 1 + int(3); i++) if (body.length) body[int(body.length)] = int(256); // bit rot
  } else if (kind === 3) body = encodeRequest({ service: 'nri.pkg.api.v1alpha1.Plugin', method: 'Echo', payload: bytes(int(5000)) });
  else if (kind === 4) body = Buffer.alloc(0);
  else body = bytes(int(300));
  return encodeTtrpcMessage(streamId, type as 1, body, flags, 1 << 30);
}

/** A mux frame for any ConnID, 0 and unopened ones included (our encoder refuses 0). */
function rawFrame(connId: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(8);
  h.writeUInt32BE(connId >>> 0, 0);
  h.writeUInt32BE(payload.length, 4);
  return Buffer.concat([h, payload]);
}

/** Frames carrying whole messages, on random ConnIDs, sometimes split at a random point into two frames. */
function alignedFrames(): Buffer {
  const msg = mutatedMessage();
  const connId = pick([1, 1, 1, 2, 2, 0, 3, 0xffffffff]);
  if (msg.length > 20 && rnd() < 0.3) {
    const cut = 1 + int(msg.length - 1);
    return Buffer.concat([rawFrame(connId, msg.subarray(0, cut)), rawFrame(connId, msg.subarray(cut))]);
  }
  return rawFrame(connId, msg);
}

/** Anything: random bytes, frames with lying lengths, huge lengths, a bad ttrpc first byte. */
function unalignedBytes(): Buffer {
  switch (int(4)) {
    case 0:
      return bytes(1 + int(100));
    case 1: {
      const f = Buffer.concat(encodeMuxFrames(1, mutatedMessage()));
      f.writeUInt32BE(int(2 ** 32), 4);
      return f.subarray(0, Math.min(f.length, 8 + int(64)));
    }
    case 2:
      return Buffer.concat(encodeMuxFrames(1, Buffer.concat([Buffer.from([1 + int(255)]), bytes(9 + int(20))])));
    default: {
      const f = Buffer.concat(encodeMuxFrames(pick([1, 2]), mutatedMessage()));
      return f.subarray(0, 1 + int(f.length));
    }
  }
}

const HEALTH_STREAM = 0xffffffff;

describe('transport fuzz over a real unix socket', () => {
  let dir: string;
  let socketPath: string;
  let server: net.Server;
  const logger = createCollectingLogger();
  const muxes: Mux[] = [];
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown): void => void unhandled.push(e);

  beforeAll(async () => {
    process.on('unhandledRejection', onUnhandled);
    process.on('uncaughtException', onUnhandled);
    dir = mkdtempSync('/tmp/nri-fz-');
    socketPath = join(dir, 's');
    expect(Buffer.byteLength(socketPath)).toBeLessThan(108);
    server = net.createServer((socket) => {
      const mux = new Mux(socket, { logger });
      muxes.push(mux);
      let srv!: TtrpcServer;
      let cli!: TtrpcClient;
      const c1 = mux.open(1, { onData: (b) => srv.receive(b), onClose: (e) => srv.close(e) });
      const c2 = mux.open(2, { onData: (b) => cli.receive(b), onClose: (e) => cli.close(e) });
      srv = new TtrpcServer(c1, {
        logger,
        onFatal: (e) => mux.fail(e),
        services: new Map([['nri.pkg.api.v1alpha1.Plugin', new Map([['Echo', (c) => c.payload]])]]),
      });
      cli = new TtrpcClient(c2, { logger, onFatal: (e) => mux.fail(e) });
      // keep a pending client call so that conn-2 garbage meets a live pending map
      cli.call('nri.pkg.api.v1alpha1.Runtime', 'RegisterPlugin', Buffer.alloc(0), { timeoutMs: 60_000 }).catch(() => undefined);
    });
    await new Promise<void>((r) => server.listen(socketPath, r));
  });

  afterAll(async () => {
    process.off('unhandledRejection', onUnhandled);
    process.off('uncaughtException', onUnhandled);
    for (const m of muxes) m.close();
    await new Promise((r) => server.close(r));
    rmSync(dir, { recursive: true, force: true });
  });

  /** Sends `garbage` then a valid Echo on conn 1; resolves 'answered', 'closed' or 'silent' (after waitMs). */
  async function probe(garbage: Buffer[], waitMs: number): Promise<{ outcome: 'answered' | 'closed' | 'silent'; mux: Mux | undefined }> {
    const before = muxes.length;
    const sock = net.createConnection(socketPath);
    await new Promise((r) => sock.once('connect', r));
    const mux = await new Promise<Mux | undefined>((resolve) => {
      const t = setInterval(() => {
        if (muxes.length > before) {
          clearInterval(t);
          resolve(muxes[before]);
        }
      }, 1);
    });
    const md = new MuxDecoder({ maxPayloadBytes: 1 << 30 });
    const td = new TtrpcDecoder();
    const outcome = await new Promise<'answered' | 'closed' | 'silent'>((resolve) => {
      const timer = setTimeout(() => resolve('silent'), waitMs);
      sock.on('data', (d) => {
        try {
          for (const f of md.push(d)) {
            if (f.connId !== 1) continue;
            for (const m of td.push(f.payload)) if (m.header.streamId === HEALTH_STREAM && m.header.type === TtrpcMessageType.RESPONSE) {
              clearTimeout(timer);
              resolve('answered');
            }
          }
        } catch {
          /* our probe decoder may itself be confused by garbage replies; irrelevant */
        }
      });
      sock.on('close', () => {
        clearTimeout(timer);
        resolve('closed');
      });
      sock.on('error', () => undefined);
      for (const g of garbage) sock.write(g);
      const health = encodeTtrpcMessage(HEALTH_STREAM, TtrpcMessageType.REQUEST, encodeRequest({ service: 'nri.pkg.api.v1alpha1.Plugin', method: 'Echo', payload: Buffer.from('ping') }));
      sock.write(Buffer.concat(encodeMuxFrames(1, health)));
    });
    sock.destroy();
    return { outcome, mux };
  }

  it('aligned but mutated frames: every connection stays healthy or closes cleanly with a log line', async () => {
    let frames = 0;
    const outcomes = { answered: 0, closed: 0, silent: 0 };
    for (let i = 0; i < 150; i++) {
      const garbage = Array.from({ length: 1 + int(20) }, alignedFrames);
      frames += garbage.length;
      const { outcome, mux } = await probe(garbage, 2000);
      outcomes[outcome]++;
      if (outcome === 'closed') {
        expect(mux?.isClosed).toBe(true);
      }
    }
    expect(frames).toBeGreaterThan(1000);
    expect(outcomes.silent).toBe(0);
    expect(outcomes.answered).toBeGreaterThan(0);
    if (outcomes.closed > 0) expect(logger.lines.some((l) => l.level === 'error' && /connection-fatal|undecodable frame/.test(l.msg))).toBe(true);
    expect(unhandled).toEqual([]);
  }, 60_000);

  it('random and lying bytes: no crash, no unhandled rejection; the trunk closes when its peer goes away', async () => {
    let total = 0;
    for (let i = 0; i < 120; i++) {
      const garbage = Array.from({ length: 1 + int(20) }, () => (rnd() < 0.5 ? alignedFrames() : unalignedBytes()));
      total += garbage.length;
      const { mux } = await probe(garbage, 100);
      // whatever happened, the server side's trunk ends once our end is gone
      await Promise.race([mux?.closed, new Promise((_, rej) => setTimeout(() => rej(new Error('server trunk did not close')), 10_000))]);
      expect(mux?.isClosed).toBe(true);
    }
    expect(total).toBeGreaterThan(1000);
    expect(unhandled).toEqual([]);
    expect(logger.lines.some((l) => l.msg === 'mux: undecodable frame, closing the trunk' && typeof l.fields['bytes'] === 'string')).toBe(true);
  }, 60_000);
});
