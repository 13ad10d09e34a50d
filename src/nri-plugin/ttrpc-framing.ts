/**
 * ttrpc message framing (containerd/ttrpc channel.go), pure: no socket, timer or logger.
 *
 *   offset 0  uint32 BE  data length (bytes after the header; ≤ 4 MiB, so the first byte is always 0)
 *   offset 4  uint32 BE  stream id   (odd: client-initiated; a response carries its request's id)
 *   offset 8  uint8      type        (1 Request, 2 Response, 3 Data — NRI uses only 1 and 2)
 *   offset 9  uint8      flags       (1 remote closed, 2 remote open, 4 no data — NRI sends 0)
 *   offset 10 …          data        (a protobuf ttrpc.Request or ttrpc.Response)
 *
 * Receiver rule: one logical connection is a byte stream; a message may span several mux frames and a
 * frame may hold the end of one message and the start of the next.
 */
import { NriErrorCode, NriError, hexPrefix } from './errors.js';

export const TTRPC_HEADER_LENGTH = 10;
/** messageLengthMax of containerd/ttrpc: 4 MiB of data, header excluded. */
export const TTRPC_MAX_DATA_BYTES = 4 << 20;

export const TtrpcMessageType = { REQUEST: 1, RESPONSE: 2, DATA: 3 } as const;
export type TtrpcMessageTypeValue = (typeof TtrpcMessageType)[keyof typeof TtrpcMessageType];

export interface TtrpcHeader {
  length: number;
  streamId: number;
  type: number;
  flags: number;
}

/**
 * What the decoder yields: a whole message, or — for a message whose announced length exceeds the
 * maximum — a notice that its data was discarded (the server answers ResourceExhausted on that stream,
 * the client fails that call; the connection stays usable, as with Go's ttrpc).
 */
export type TtrpcDecoded =
  | { kind: 'message'; header: TtrpcHeader; data: Buffer }
  | { kind: 'oversized'; header: TtrpcHeader; maxDataBytes: number };

export function encodeTtrpcHeader(header: TtrpcHeader): Buffer {
  const out = Buffer.allocUnsafe(TTRPC_HEADER_LENGTH);
  out.writeUInt32BE(header.length, 0);
  out.writeUInt32BE(header.streamId, 4);
  out.writeUInt8(header.type, 8);
  out.writeUInt8(header.flags, 9);
  return out;
}

/** Decodes the first 10 bytes of `bytes` (which must hold at least 10). */
export function decodeTtrpcHeader(bytes: Uint8Array): TtrpcHeader {
  if (bytes.length < TTRPC_HEADER_LENGTH) {
    throw new NriError(NriErrorCode.TTRPC_BAD_HEADER, `need ${TTRPC_HEADER_LENGTH} header bytes, got ${bytes.length}`, {
      step: 'decode ttrpc header',
      evidence: { bytes: hexPrefix(bytes) },
    });
  }
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, TTRPC_HEADER_LENGTH);
  return { length: b.readUInt32BE(0), streamId: b.readUInt32BE(4), type: b.readUInt8(8), flags: b.readUInt8(9) };
}

/**
 * One complete ttrpc message (header + data). Throws TTRPC_MESSAGE_TOO_LARGE when `data` exceeds
 * `maxDataBytes` (ttrpc main refuses to send such a message; the peer would discard it anyway).
 */
export function encodeTtrpcMessage(
  streamId: number,
  type: TtrpcMessageTypeValue,
  data: Uint8Array,
  flags = 0,
  maxDataBytes: number = TTRPC_MAX_DATA_BYTES,
): Buffer {
  if (data.length > maxDataBytes) {
    throw new NriError(
      NriErrorCode.TTRPC_MESSAGE_TOO_LARGE,
      `message length ${data.length} exceeds maximum message size of ${maxDataBytes}`,
      { step: 'encode ttrpc message', evidence: { dataBytes: data.length, maxDataBytes, streamId } },
    );
  }
  const out = Buffer.allocUnsafe(TTRPC_HEADER_LENGTH + data.length);
  out.writeUInt32BE(data.length, 0);
  out.writeUInt32BE(streamId, 4);
  out.writeUInt8(type, 8);
  out.writeUInt8(flags, 9);
  out.set(data, TTRPC_HEADER_LENGTH);
  return out;
}

/**
 * Reassembles ttrpc messages from one logical connection's byte stream. `push()` returns what the chunk
 * completed. A header whose first byte is nonzero (length ≥ 16 MiB: not ttrpc, or a desynchronised
 * stream) throws TTRPC_BAD_HEADER — connection-fatal, and later pushes throw it again. A length in
 * (max, 16 MiB) is skipped over and reported as `oversized`.
 */
export class TtrpcDecoder {
  readonly maxDataBytes: number;
  private readonly headerBuf = Buffer.alloc(TTRPC_HEADER_LENGTH);
  private headerFilled = 0;
  private header: TtrpcHeader | null = null;
  private data: Buffer | null = null;
  private dataFilled = 0;
  private discardLeft = 0;
  private failure: NriError | null = null;

  constructor(options: { maxDataBytes?: number } = {}) {
    this.maxDataBytes = options.maxDataBytes ?? TTRPC_MAX_DATA_BYTES;
  }

  /** Bytes of an incomplete message held (0 between messages). */
  get bufferedBytes(): number {
    return this.headerFilled + (this.header ? TTRPC_HEADER_LENGTH + this.dataFilled : 0);
  }

  push(chunk: Uint8Array): TtrpcDecoded[] {
    if (this.failure) throw this.failure;
    const out: TtrpcDecoded[] = [];
    let off = 0;
    const finish = (data: Buffer): void => {
      out.push({ kind: 'message', header: this.header as TtrpcHeader, data });
      this.header = null;
      this.data = null;
      this.dataFilled = 0;
    };
    while (off < chunk.length) {
      if (this.discardLeft > 0) {
        const take = Math.min(this.discardLeft, chunk.length - off);
        this.discardLeft -= take;
        off += take;
        continue;
      }
      if (this.header === null) {
        const take = Math.min(TTRPC_HEADER_LENGTH - this.headerFilled, chunk.length - off);
        this.headerBuf.set(chunk.subarray(off, off + take), this.headerFilled);
        this.headerFilled += take;
        off += take;
        if (this.headerFilled < TTRPC_HEADER_LENGTH) break;
        this.headerFilled = 0;
        if (this.headerBuf[0] !== 0) {
          this.failure = new NriError(
            NriErrorCode.TTRPC_BAD_HEADER,
            'the first byte of a ttrpc message header must be zero (length ≥ 16 MiB): not a ttrpc stream or out of sync',
            { step: 'decode ttrpc header', evidence: { header: hexPrefix(this.headerBuf) } },
          );
          throw this.failure;
        }
        const header = decodeTtrpcHeader(this.headerBuf);
        if (header.length > this.maxDataBytes) {
          out.push({ kind: 'oversized', header, maxDataBytes: this.maxDataBytes });
          this.discardLeft = header.length;
          continue;
        }
        this.header = header;
        if (header.length === 0) {
          finish(Buffer.alloc(0));
          continue;
        }
        this.data = Buffer.allocUnsafe(header.length);
        this.dataFilled = 0;
        continue;
      }
      const data = this.data as Buffer;
      const take = Math.min(data.length - this.dataFilled, chunk.length - off);
      data.set(chunk.subarray(off, off + take), this.dataFilled);
      this.dataFilled += take;
      off += take;
      if (this.dataFilled === data.length) finish(data);
    }
    return out;
  }
}
