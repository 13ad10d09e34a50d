import { describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import {
  MUX_HEADER_LENGTH,
  MuxDecoder,
  encodeMuxFrames,
  type MuxFrame,
} from '../../src/nri-plugin/mux-framing.js';
import {
  TTRPC_MAX_DATA_BYTES,
  TtrpcDecoder,
  TtrpcMessageType,
  decodeTtrpcHeader,
  encodeTtrpcHeader,
  encodeTtrpcMessage,
  type TtrpcDecoded,
} from '../../src/nri-plugin/ttrpc-framing.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const ascii = (s: string): string => Buffer.from(s, 'ascii').toString('hex');

// §10: RegisterPlugin from "ts-plugin", idx "10", 2 s timeout, conn 2, stream 1.
const REGISTER_FRAME = hex(
  '00000002 0000004f' +
    '00000045 00000001 01 00' +
    `0a1c${ascii('nri.pkg.api.v1alpha1.Runtime')}` +
    `120e${ascii('RegisterPlugin')}` +
    `1a0f 0a09${ascii('ts-plugin')} 1202${ascii('10')}` +
    '2080a8d6b907',
);

/** Splits `bytes` into random chunks of 1..maxChunk bytes (deterministic per seed). */
function randomChunks(bytes: Buffer, maxChunk: number, seed: number): Buffer[] {
  let s = seed >>> 0;
  const rnd = (): number => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
  const out: Buffer[] = [];
  for (let off = 0; off < bytes.length; ) {
    const n = Math.min(bytes.length - off, 1 + Math.floor(rnd() * maxChunk));
    out.push(bytes.subarray(off, off + n));
    off += n;
  }
  return out;
}

function catchErr(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected a throw');
}

describe('mux framing', () => {
  it('decodes the §10 RegisterPlugin frame: conn 2, 79-byte payload', () => {
    const frames = new MuxDecoder().push(REGISTER_FRAME);
    expect(frames).toHaveLength(1);
    expect(frames[0]?.connId).toBe(2);
    expect(frames[0]?.payload.length).toBe(79);
    expect(REGISTER_FRAME.length).toBe(MUX_HEADER_LENGTH + 79);
  });

  it('encodes a message of at most 4096 bytes as one frame', () => {
    const msg = encodeTtrpcMessage(1, TtrpcMessageType.REQUEST, Buffer.alloc(4086, 7));
    expect(msg.length).toBe(4096);
    const frames = encodeMuxFrames(2, msg);
    expect(frames).toHaveLength(1);
    expect(frames[0]?.readUInt32BE(0)).toBe(2);
    expect(frames[0]?.readUInt32BE(4)).toBe(4096);
  });

  it('encodes a 4097-byte message as exactly two frames: the 10-byte ttrpc header, then the whole body', () => {
    const msg = encodeTtrpcMessage(3, TtrpcMessageType.RESPONSE, Buffer.alloc(4087, 9));
    const frames = encodeMuxFrames(1, msg);
    expect(frames).toHaveLength(2);
    expect(frames[0]?.readUInt32BE(4)).toBe(10);
    expect(frames[0]?.subarray(8)).toEqual(msg.subarray(0, 10));
    expect(frames[1]?.readUInt32BE(4)).toBe(4087);
    expect(frames[1]?.subarray(8)).toEqual(msg.subarray(10));
  });

  it('sends a 4 MiB body as two frames, never 4096-byte chunks', () => {
    const msg = encodeTtrpcMessage(5, TtrpcMessageType.REQUEST, Buffer.alloc(TTRPC_MAX_DATA_BYTES, 1));
    const frames = encodeMuxFrames(2, msg);
    expect(frames.map((f) => f.readUInt32BE(4))).toEqual([10, TTRPC_MAX_DATA_BYTES]);
  });

  it('never sends a zero-length frame and rejects connection id 0', () => {
    expect(catchErr(() => encodeMuxFrames(1, Buffer.alloc(0)))).toMatchObject({ code: 'MUX_INVALID_FRAME' });
    expect(catchErr(() => encodeMuxFrames(0, Buffer.alloc(3)))).toMatchObject({ code: 'MUX_INVALID_FRAME' });
  });

  it('accepts a payload exactly at the limit, and fails with both numbers just over and far over it', () => {
    const max = 1000;
    const at = Buffer.concat([hex('00000001 000003e8'), Buffer.alloc(1000)]);
    expect(new MuxDecoder({ maxPayloadBytes: max }).push(at)).toHaveLength(1);
    const justOver = new MuxDecoder({ maxPayloadBytes: max });
    const err = catchErr(() => justOver.push(hex('00000001 000003e9')));
    expect(isThawError(err, 'MUX_FRAME_TOO_LARGE')).toBe(true);
    expect((err as Error).message).toContain('1001');
    expect((err as Error).message).toContain('1000');
    // the decoder stays failed: the stream cannot be resynchronised
    expect(catchErr(() => justOver.push(Buffer.alloc(1)))).toBe(err);
    const farOver = catchErr(() => new MuxDecoder({ maxPayloadBytes: max }).push(hex('00000001 ffffffff')));
    expect(farOver).toMatchObject({ code: 'MUX_FRAME_TOO_LARGE', evidence: { payloadBytes: 0xffffffff, maxPayloadBytes: 1000 } });
  });

  it('skips zero-length frames', () => {
    const frames = new MuxDecoder().push(Buffer.concat([hex('00000001 00000000'), hex('00000002 00000001 aa')]));
    expect(frames).toEqual([{ connId: 2, payload: hex('aa') }]);
  });

  for (const bound of [1, 10, 64, 512, 4096]) {
    it(`reassembles the same frames from random chunks of at most ${bound} bytes`, () => {
      const stream = Buffer.concat([
        REGISTER_FRAME,
        ...encodeMuxFrames(1, encodeTtrpcMessage(1, TtrpcMessageType.RESPONSE, Buffer.alloc(9000, 3))),
        ...encodeMuxFrames(2, encodeTtrpcMessage(3, TtrpcMessageType.REQUEST, Buffer.alloc(5, 4))),
      ]);
      const whole = new MuxDecoder().push(stream);
      for (let seed = 1; seed <= 20; seed++) {
        const d = new MuxDecoder();
        const got: MuxFrame[] = [];
        for (const c of randomChunks(stream, bound, seed * 7919 + bound)) got.push(...d.push(c));
        expect(got).toEqual(whole);
        expect(d.bufferedBytes).toBe(0);
      }
    });
  }
});

describe('ttrpc framing', () => {
  it('round-trips a header', () => {
    const h = { length: 69, streamId: 1, type: 1, flags: 0 };
    expect(encodeTtrpcHeader(h)).toEqual(hex('00000045 00000001 01 00'));
    expect(decodeTtrpcHeader(encodeTtrpcHeader(h))).toEqual(h);
  });

  it('decodes the §10 runtime success reply (empty Response)', () => {
    const frames = new MuxDecoder().push(hex('00000002 0000000a | 00000000 00000001 02 00'.replace('|', '')));
    const msgs = new TtrpcDecoder().push(frames[0]!.payload);
    expect(msgs).toEqual([{ kind: 'message', header: { length: 0, streamId: 1, type: 2, flags: 0 }, data: Buffer.alloc(0) }]);
  });

  it('reassembles a message the runtime split as a 4096-byte frame plus the rest', () => {
    const msg = encodeTtrpcMessage(7, TtrpcMessageType.REQUEST, Buffer.alloc(10_000, 0x5a));
    const d = new TtrpcDecoder();
    expect(d.push(msg.subarray(0, 4096))).toEqual([]);
    expect(d.bufferedBytes).toBe(4096);
    const out = d.push(msg.subarray(4096));
    expect(out).toHaveLength(1);
    expect(out[0]).toMatchObject({ kind: 'message', header: { streamId: 7, length: 10_000 } });
  });

  it('parses two messages from one frame and a message spanning three frames', () => {
    const a = encodeTtrpcMessage(1, TtrpcMessageType.RESPONSE, hex('1203'));
    const b = encodeTtrpcMessage(3, TtrpcMessageType.RESPONSE, Buffer.alloc(30, 1));
    const both = Buffer.concat([a, b]);
    const d = new TtrpcDecoder();
    expect(d.push(both.subarray(0, 15))).toHaveLength(1);
    expect(d.push(both.subarray(15, 30))).toHaveLength(0);
    expect(d.push(both.subarray(30))).toHaveLength(1);
  });

  it('accepts data exactly at 4 MiB, reports 4 MiB + 1 as oversized (ResourceExhausted) and keeps decoding', () => {
    const d = new TtrpcDecoder();
    const at = encodeTtrpcMessage(1, TtrpcMessageType.REQUEST, Buffer.alloc(TTRPC_MAX_DATA_BYTES));
    expect(d.push(at)).toHaveLength(1);
    const over = Buffer.concat([hex('00400001 00000003 01 00'), Buffer.alloc(TTRPC_MAX_DATA_BYTES + 1)]);
    const next = encodeTtrpcMessage(5, TtrpcMessageType.REQUEST, hex('0a00'));
    const out: TtrpcDecoded[] = [];
    for (const c of randomChunks(Buffer.concat([over, next]), 65536, 3)) out.push(...d.push(c));
    expect(out.map((o) => [o.kind, o.header.streamId])).toEqual([
      ['oversized', 3],
      ['message', 5],
    ]);
  });

  it('refuses to encode data over 4 MiB', () => {
    const err = catchErr(() => encodeTtrpcMessage(1, TtrpcMessageType.REQUEST, Buffer.alloc(TTRPC_MAX_DATA_BYTES + 1)));
    expect(err).toMatchObject({ code: 'TTRPC_MESSAGE_TOO_LARGE' });
  });

  it('treats a nonzero first header byte as connection-fatal (far over the limit)', () => {
    const d = new TtrpcDecoder();
    const err = catchErr(() => d.push(hex('01000000 00000001 01 00')));
    expect(err).toMatchObject({ code: 'TTRPC_BAD_HEADER' });
    expect(catchErr(() => d.push(hex('00')))).toBe(err);
  });

  for (const bound of [1, 10, 64, 512, 4096]) {
    it(`decodes identically from random chunks of at most ${bound} bytes`, () => {
      const stream = Buffer.concat([
        encodeTtrpcMessage(1, TtrpcMessageType.REQUEST, Buffer.alloc(0)),
        encodeTtrpcMessage(3, TtrpcMessageType.REQUEST, Buffer.alloc(5000, 2)),
        encodeTtrpcMessage(5, TtrpcMessageType.RESPONSE, hex('12 03 10 a9 0c')),
      ]);
      const whole = new TtrpcDecoder().push(stream);
      expect(whole).toHaveLength(3);
      for (let seed = 1; seed <= 20; seed++) {
        const d = new TtrpcDecoder();
        const got: TtrpcDecoded[] = [];
        for (const c of randomChunks(stream, bound, seed * 31 + bound)) got.push(...d.push(c));
        expect(got).toEqual(whole);
      }
    });
  }
});
