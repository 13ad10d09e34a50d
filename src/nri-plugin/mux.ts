/**
 * The NRI trunk: one stream socket (a net.Socket connected to the runtime's NRI socket, or
 * `new net.Socket({ fd: 3 })` for a runtime-launched plugin) carrying several logical connections.
 *
 * Contract (mirrors containerd/nri pkg/net/multiplex):
 * - `open(connId, sink)` is local only: nothing is sent, the peer is assumed to open the same id.
 * - Frames for a ConnID nobody opened are dropped (logged at debug), as the Go mux does.
 * - `send()` writes one whole ttrpc message with the §2.4 sender rule in a single socket write, so frames
 *   of different messages never interleave; the promise settles when the socket accepted the bytes.
 * - Any decoder error is connection-fatal: it is logged with the offending bytes' hex prefix, the socket is
 *   destroyed and every channel's `onClose` gets the error. EOF and socket errors close the same way.
 * - After close, `send()` rejects with MUX_CLOSED. `closed` resolves (never rejects) with the reason.
 */
import type { Duplex } from 'node:stream';
import type { Logger } from '../log.js';
import { NriErrorCode, NriError, hexPrefix } from './errors.js';
import { MUX_MAX_PAYLOAD_BYTES_DEFAULT, MuxDecoder, encodeMuxFrames } from './mux-framing.js';

/** How long close() lets queued writes drain before destroying the socket. */
export const MUX_CLOSE_GRACE_MS = 1000;

export interface MuxChannelSink {
  /** Payload bytes received for this connection, in order (a byte stream; not message-aligned). */
  onData(payload: Buffer): void;
  /** The trunk closed; `error` is undefined for a clean close() and set for EOF/errors. */
  onClose(error: NriError | undefined): void;
}

export interface MuxChannel {
  readonly connId: number;
  /** Sends one complete ttrpc message (header + body). */
  send(ttrpcMessage: Uint8Array): Promise<void>;
}

export interface MuxCloseInfo {
  /** 'close' = our close(); 'eof' = the peer closed; 'error' = socket or decoder error. */
  reason: 'close' | 'eof' | 'error';
  error?: NriError;
}

export interface MuxOptions {
  logger: Logger;
  maxPayloadBytes?: number;
}

export class Mux {
  readonly closed: Promise<MuxCloseInfo>;
  private readonly decoder: MuxDecoder;
  private readonly sinks = new Map<number, MuxChannelSink>();
  private readonly logger: Logger;
  private readonly maxPayloadBytes: number;
  private closeInfo: MuxCloseInfo | undefined;
  private resolveClosed!: (info: MuxCloseInfo) => void;

  constructor(
    private readonly socket: Duplex,
    options: MuxOptions,
  ) {
    this.logger = options.logger;
    this.maxPayloadBytes = options.maxPayloadBytes ?? MUX_MAX_PAYLOAD_BYTES_DEFAULT;
    this.decoder = new MuxDecoder({ maxPayloadBytes: this.maxPayloadBytes });
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    socket.on('data', (chunk: Buffer) => this.onSocketData(chunk));
    socket.on('end', () => this.shutdown({ reason: 'eof', error: this.error(NriErrorCode.MUX_CLOSED, 'the peer closed the trunk (EOF)') }));
    socket.on('error', (err: Error) =>
      this.shutdown({ reason: 'error', error: this.error(NriErrorCode.MUX_CLOSED, `trunk socket error: ${err.message}`, err) }),
    );
    socket.on('close', () =>
      this.shutdown({ reason: 'eof', error: this.error(NriErrorCode.MUX_CLOSED, 'the trunk socket closed') }),
    );
  }

  get isClosed(): boolean {
    return this.closeInfo !== undefined;
  }

  open(connId: number, sink: MuxChannelSink): MuxChannel {
    if (this.sinks.has(connId)) throw new Error(`mux connection ${connId} is already open`);
    this.sinks.set(connId, sink);
    return { connId, send: (msg) => this.send(connId, msg) };
  }

  private send(connId: number, ttrpcMessage: Uint8Array): Promise<void> {
    if (this.closeInfo) {
      return Promise.reject(
        this.closeInfo.error ?? this.error(NriErrorCode.MUX_CLOSED, 'the trunk is closed'),
      );
    }
    let bytes: Buffer;
    try {
      const frames = encodeMuxFrames(connId, ttrpcMessage, this.maxPayloadBytes);
      bytes = frames.length === 1 ? (frames[0] as Buffer) : Buffer.concat(frames);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      this.socket.write(bytes, (err) => {
        if (err) reject(this.error(NriErrorCode.MUX_CLOSED, `write failed: ${err.message}`, err));
        else resolve();
      });
    });
  }

  /** Closes the trunk cleanly (idempotent). */
  close(): void {
    this.shutdown({ reason: 'close' });
  }

  private onSocketData(chunk: Buffer): void {
    if (this.closeInfo) return;
    let frames;
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      const error = err instanceof NriError ? err : this.error(NriErrorCode.MUX_CLOSED, String(err), err);
      this.logger.error('mux: undecodable frame, closing the trunk', {
        code: error.code,
        error: error.message,
        bytes: hexPrefix(chunk),
      });
      this.shutdown({ reason: 'error', error });
      return;
    }
    for (const frame of frames) {
      const sink = this.sinks.get(frame.connId);
      if (!sink) {
        this.logger.debug('mux: dropping frame for a connection that is not open', {
          connId: frame.connId,
          length: frame.payload.length,
        });
        continue;
      }
      sink.onData(frame.payload);
      if (this.closeInfo) return; // a sink may close the trunk (fatal ttrpc error)
    }
  }

  /** Closes the trunk because of a fatal error found above the mux (e.g. a bad ttrpc header). */
  fail(error: NriError): void {
    this.shutdown({ reason: 'error', error });
  }

  private shutdown(info: MuxCloseInfo): void {
    if (this.closeInfo) return;
    this.closeInfo = info;
    if (info.reason === 'close') {
      // Let queued writes (a last response) drain, but never wait on the peer for long.
      this.socket.end();
      setTimeout(() => this.socket.destroy(), MUX_CLOSE_GRACE_MS).unref();
    } else {
      this.socket.destroy();
    }
    for (const sink of this.sinks.values()) {
      try {
        sink.onClose(info.error);
      } catch (err) {
        this.logger.error('mux: a channel failed while closing', { error: String(err) });
      }
    }
    this.sinks.clear();
    this.resolveClosed(info);
  }

  private error(code: typeof NriErrorCode.MUX_CLOSED, message: string, cause?: unknown): NriError {
    return new NriError(code, message, { step: 'NRI trunk', ...(cause === undefined ? {} : { cause }) });
  }
}
