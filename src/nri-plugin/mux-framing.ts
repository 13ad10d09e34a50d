/**
 * NRI trunk multiplexer framing (containerd/nri pkg/net/multiplex), pure: no socket, timer or logger.
 *
 * Every byte on the trunk socket belongs to a frame:
 *
 *   offset 0  uint32 big-endian  ConnID          (1 = plugin service, 2 = runtime service; 0 reserved)
 *   offset 4  uint32 big-endian  payload length N
 *   offset 8  N bytes            payload: opaque bytes of that logical connection's ttrpc byte stream
 *
 * A frame is not a message: the runtime splits one ttrpc message over several frames (a 4096-byte frame,
 * then the rest), so the receiver feeds payloads into a per-connection ttrpc decoder.
 */
import { NriErrorCode, NriError, hexPrefix } from './errors.js';

/** Length of a mux frame header: 4-byte ConnID + 4-byte payload length. */
export const MUX_HEADER_LENGTH = 8;

/** ConnID on which the plugin serves `nri.pkg.api.v1alpha1.Plugin` (the runtime is the ttrpc client). */
export const PLUGIN_SERVICE_CONN = 1;
/** ConnID on which the runtime serves `nri.pkg.api.v1alpha1.Runtime` (the plugin is the ttrpc client). */
export const RUNTIME_SERVICE_CONN = 2;

/**
 * The largest frame a real runtime sends: NRI v0.6.1's maxPayloadSize (16 MiB). From v0.7 the runtime caps
 * frames at 10 + 4 MiB. Larger announced lengths are connection-fatal (MUX_FRAME_TOO_LARGE).
 */
export const MUX_MAX_PAYLOAD_BYTES_DEFAULT = 1 << 24;

/**
 * The Go receiver reads each frame with one Read() into ttrpc's 4096-byte bufio buffer and fails with
 * ENOMEM when the frame is larger than the buffer it reads into, unless the caller asked for >= 4096 bytes
 * (then bufio reads straight into the caller's slice). Hence the sender rule (nri-protocol.md §2.4): a ttrpc
 * message of at most this many bytes goes in one frame, a larger one as exactly two frames (the 10-byte
 * ttrpc header, then the whole body). Chunking into 4096-byte frames overflows the runtime's 256-frame
 * read queue for large messages, so it is never done.
 */
export const MUX_SINGLE_FRAME_MAX_BYTES = 4096;

/** Length of the ttrpc message header, which the sender rule puts in a frame of its own for big messages. */
const TTRPC_HEADER_BYTES = 10;

export interface MuxFrame {
  connId: number;
  payload: Buffer;
}

function frame(connId: number, payload: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(MUX_HEADER_LENGTH + payload.length);
  out.writeUInt32BE(connId, 0);
  out.writeUInt32BE(payload.length, 4);
  out.set(payload, MUX_HEADER_LENGTH);
  return out;
}

/**
 * The frames (each header + payload) that carry one complete ttrpc message (header + body) on `connId`,
 * following the sender rule above. Throws MUX_INVALID_FRAME for an empty message (zero-length frames are
 * never sent) or a ConnID outside 1..2^32-1, and MUX_FRAME_TOO_LARGE when the body exceeds `maxPayloadBytes`.
 */
export function encodeMuxFrames(
  connId: number,
  ttrpcMessage: Uint8Array,
  maxPayloadBytes: number = MUX_MAX_PAYLOAD_BYTES_DEFAULT,
): Buffer[] {
  const step = 'encode mux frame';
  if (!Number.isInteger(connId) || connId < 1 || connId > 0xffffffff) {
    throw new NriError(NriErrorCode.MUX_INVALID_FRAME, `connection id ${connId} is not in 1..2^32-1`, { step });
  }
  if (ttrpcMessage.length === 0) {
    throw new NriError(NriErrorCode.MUX_INVALID_FRAME, 'refusing to send a zero-length frame', { step });
  }
  if (ttrpcMessage.length <= MUX_SINGLE_FRAME_MAX_BYTES) return [frame(connId, ttrpcMessage)];
  const body = ttrpcMessage.subarray(TTRPC_HEADER_BYTES);
  if (body.length > maxPayloadBytes) {
    throw new NriError(
      NriErrorCode.MUX_FRAME_TOO_LARGE,
      `payload of ${body.length} bytes exceeds the maximum of ${maxPayloadBytes} bytes`,
      { step, evidence: { payloadBytes: body.length, maxPayloadBytes } },
    );
  }
  return [frame(connId, ttrpcMessage.subarray(0, TTRPC_HEADER_BYTES)), frame(connId, body)];
}

/**
 * Reassembles mux frames from the trunk's byte stream, however it is chunked. `push()` returns the frames
 * completed by that chunk, in order. A header announcing more than `maxPayloadBytes` throws
 * MUX_FRAME_TOO_LARGE (connection-fatal: after it the stream cannot be resynchronised, and every later
 * push throws the same error). Zero-length frames are accepted and produce nothing.
 *
 * Memory: a payload is copied once into a buffer of its announced size, so a 4 MiB body arriving in
 * 64 KiB socket reads costs one allocation, not a quadratic re-concatenation.
 */
export class MuxDecoder {
  readonly maxPayloadBytes: number;
  private readonly header = Buffer.alloc(MUX_HEADER_LENGTH);
  private headerFilled = 0;
  private payload: Buffer | null = null;
  private payloadFilled = 0;
  private connId = 0;
  private failure: NriError | null = null;

  constructor(options: { maxPayloadBytes?: number } = {}) {
    this.maxPayloadBytes = options.maxPayloadBytes ?? MUX_MAX_PAYLOAD_BYTES_DEFAULT;
  }

  /** Bytes of a frame received so far but not yet complete (0 between frames). */
  get bufferedBytes(): number {
    return this.headerFilled + (this.payload ? MUX_HEADER_LENGTH + this.payloadFilled : 0);
  }

  push(chunk: Uint8Array): MuxFrame[] {
    if (this.failure) throw this.failure;
    const out: MuxFrame[] = [];
    let off = 0;
    while (off < chunk.length) {
      if (this.payload === null) {
        const take = Math.min(MUX_HEADER_LENGTH - this.headerFilled, chunk.length - off);
        this.header.set(chunk.subarray(off, off + take), this.headerFilled);
        this.headerFilled += take;
        off += take;
        if (this.headerFilled < MUX_HEADER_LENGTH) break;
        const connId = this.header.readUInt32BE(0);
        const length = this.header.readUInt32BE(4);
        if (length > this.maxPayloadBytes) {
          this.failure = new NriError(
            NriErrorCode.MUX_FRAME_TOO_LARGE,
            `frame payload of ${length} bytes exceeds the maximum of ${this.maxPayloadBytes} bytes`,
            {
              step: 'decode mux frame',
              evidence: { connId, payloadBytes: length, maxPayloadBytes: this.maxPayloadBytes, header: hexPrefix(this.header) },
            },
          );
          throw this.failure;
        }
        this.headerFilled = 0;
        if (length === 0) continue;
        this.connId = connId;
        this.payload = Buffer.allocUnsafe(length);
        this.payloadFilled = 0;
        continue;
      }
      const take = Math.min(this.payload.length - this.payloadFilled, chunk.length - off);
      this.payload.set(chunk.subarray(off, off + take), this.payloadFilled);
      this.payloadFilled += take;
      off += take;
      if (this.payloadFilled === this.payload.length) {
        out.push({ connId: this.connId, payload: this.payload });
        this.payload = null;
        this.payloadFilled = 0;
      }
    }
    return out;
  }
}
