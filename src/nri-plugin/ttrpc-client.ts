/**
 * A ttrpc client on one logical connection (NRI: conn 2, calling nri.pkg.api.v1alpha1.Runtime).
 *
 * - Stream ids are odd and increasing from 1 (1, 3, 5, ...), as Go's client.
 * - `call()` takes `timeoutMs` (sent as timeout_nano, and enforced locally → TTRPC_DEADLINE_EXCEEDED) and
 *   an AbortSignal (→ TTRPC_CANCELLED). There is no cancel message in ttrpc: a response that arrives after
 *   the call gave up is logged as "received message on inactive stream" and dropped.
 * - A non-OK status rejects with TtrpcStatusError (code TTRPC_STATUS, grpcCode, grpcMessage).
 * - A reply that is not a Response rejects that call with TTRPC_PROTOCOL.
 * - `close()` rejects every pending call with TTRPC_CLOSED (carrying the trunk's error as cause).
 */
import type { Logger } from '../log.js';
import { NriErrorCode, NriError, TtrpcStatusError, hexPrefix } from './errors.js';
import { decodeResponse, encodeRequest, type TtrpcKeyValue } from './ttrpc-codec.js';
import { TtrpcDecoder, TtrpcMessageType, encodeTtrpcMessage } from './ttrpc-framing.js';
import type { TtrpcTransport } from './ttrpc-server.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';

export interface TtrpcCallOptions {
  /** Local deadline, also sent to the server as timeout_nano. 0/undefined = none. */
  timeoutMs?: number;
  signal?: AbortSignal;
  metadata?: TtrpcKeyValue[];
}

interface Pending {
  method: string;
  resolve(payload: Buffer): void;
  reject(err: Error): void;
}

export interface TtrpcClientOptions {
  logger: Logger;
  onFatal?: (error: NriError) => void;
  maxDataBytes?: number;
}

export class TtrpcClient {
  private readonly decoder: TtrpcDecoder;
  private readonly logger: Logger;
  private nextStreamId = 1;
  private readonly pending = new Map<number, Pending>();
  private closedError: NriError | undefined;

  constructor(
    private readonly transport: TtrpcTransport,
    private readonly options: TtrpcClientOptions,
  ) {
    this.logger = options.logger;
    this.decoder = new TtrpcDecoder(options.maxDataBytes === undefined ? {} : { maxDataBytes: options.maxDataBytes });
  }

  get pendingCount(): number {
    return this.pending.size;
  }

  /** Calls `service/method` with an already-serialized request; resolves with the response payload. */
  call(service: string, method: string, payload: Uint8Array, options: TtrpcCallOptions = {}): Promise<Buffer> {
    const step = `call ${service}/${method}`;
    if (this.closedError) {
      return Promise.reject(new NriError(NriErrorCode.TTRPC_CLOSED, 'the ttrpc client is closed', { step, cause: this.closedError }));
    }
    const { signal } = options;
    if (signal?.aborted) {
      return Promise.reject(new NriError(NriErrorCode.TTRPC_CANCELLED, 'aborted before sending', { step, cause: signal.reason }));
    }
    const timeoutMs = options.timeoutMs ?? 0;
    const streamId = this.nextStreamId;
    this.nextStreamId += 2;
    let message: Buffer;
    try {
      const body = encodeRequest({
        service,
        method,
        payload: Buffer.from(payload),
        timeoutNano: timeoutMs > 0 ? timeoutMs * 1e6 : 0,
        metadata: options.metadata ?? [],
      });
      message = encodeTtrpcMessage(streamId, TtrpcMessageType.REQUEST, body);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise<Buffer>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const cleanup = (): void => {
        if (timer) clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.pending.delete(streamId);
      };
      const onAbort = (): void => {
        cleanup();
        reject(new NriError(NriErrorCode.TTRPC_CANCELLED, 'the caller aborted the call', { step, cause: signal?.reason, evidence: { streamId } }));
      };
      this.pending.set(streamId, {
        method,
        resolve: (p) => {
          cleanup();
          resolve(p);
        },
        reject: (e) => {
          cleanup();
          reject(e);
        },
      });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          cleanup();
          reject(
            new NriError(NriErrorCode.TTRPC_DEADLINE_EXCEEDED, `no response within ${timeoutMs} ms`, {
              step,
              evidence: { streamId, timeoutMs },
            }),
          );
        }, Math.min(timeoutMs, MAX_TIMER_DELAY_MS));
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      this.transport.send(message).catch((err: unknown) => {
        const p = this.pending.get(streamId);
        p?.reject(new NriError(NriErrorCode.TTRPC_CLOSED, `request not sent: ${(err as Error).message}`, { step, cause: err }));
      });
    });
  }

  /** Feed the connection's bytes (mux payloads) here. */
  receive(bytes: Buffer): void {
    if (this.closedError) return;
    let decoded;
    try {
      decoded = this.decoder.push(bytes);
    } catch (err) {
      const error = err as NriError;
      this.logger.error('ttrpc client: connection-fatal framing error', { code: error.code, error: error.message, bytes: hexPrefix(bytes) });
      this.options.onFatal?.(error);
      return;
    }
    for (const item of decoded) {
      const { streamId } = item.header;
      const p = this.pending.get(streamId);
      if (!p) {
        this.logger.warn('ttrpc: received message on inactive stream', { streamId, type: item.header.type });
        continue;
      }
      const step = `call ${p.method}`;
      if (item.kind === 'oversized') {
        p.reject(
          new NriError(NriErrorCode.TTRPC_MESSAGE_TOO_LARGE, `response length ${item.header.length} exceeds ${item.maxDataBytes}`, {
            step,
            evidence: { streamId, length: item.header.length },
          }),
        );
        continue;
      }
      if (item.header.type !== TtrpcMessageType.RESPONSE) {
        p.reject(
          new NriError(NriErrorCode.TTRPC_PROTOCOL, `expected a response (type 2), got type ${item.header.type}`, {
            step,
            evidence: { streamId, bytes: hexPrefix(item.data) },
          }),
        );
        continue;
      }
      let response;
      try {
        response = decodeResponse(item.data);
      } catch (err) {
        p.reject(err as Error);
        continue;
      }
      if (response.status && response.status.code !== 0) {
        p.reject(new TtrpcStatusError(response.status.code, response.status.message, { step }));
        continue;
      }
      p.resolve(response.payload);
    }
  }

  /** Rejects every pending call with TTRPC_CLOSED; later calls reject at once. Idempotent. */
  close(cause?: NriError): void {
    if (this.closedError) return;
    this.closedError = cause ?? new NriError(NriErrorCode.TTRPC_CLOSED, 'ttrpc client closed', { step: 'ttrpc client' });
    for (const [streamId, p] of [...this.pending]) {
      p.reject(
        new NriError(NriErrorCode.TTRPC_CLOSED, `connection closed while waiting for ${p.method}`, {
          step: `call ${p.method}`,
          cause: this.closedError,
          evidence: { streamId },
        }),
      );
    }
  }
}
