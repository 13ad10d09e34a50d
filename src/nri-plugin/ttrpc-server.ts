/**
 * A ttrpc server on one logical connection (NRI: conn 1, service nri.pkg.api.v1alpha1.Plugin, called by
 * the runtime).
 *
 * - Requests are dispatched concurrently; responses go out in completion order with the request's id.
 * - Stream ids must be odd and strictly increasing (Go ttrpc's rule): a violation is answered with
 *   InvalidArgument on that id and logged; the connection stays healthy.
 * - Unknown service → Unimplemented (12) "service X"; unknown method → Unimplemented "method X" (NRI v0.12
 *   runtimes rely on 12 to fall back to StateChange).
 * - A handler that throws TtrpcStatusError answers that status; anything else answers Unknown (2) with the
 *   message. (The NRI plugin layer above catches handler errors before they get here.)
 * - `timeout_nano`: the handler gets an AbortSignal that fires at the deadline; a response finished after
 *   the deadline is NOT sent (the runtime has dropped the stream) and the overrun is logged.
 * - An oversized request is answered ResourceExhausted (8); an undecodable one InvalidArgument (3).
 * - A bad ttrpc header is connection-fatal: `onFatal` is called (the owner closes the trunk).
 */
import type { Logger } from '../log.js';
import { GrpcCode, NriError, TtrpcStatusError, hexPrefix } from './errors.js';
import { decodeRequest, encodeResponse, type TtrpcKeyValue, type TtrpcStatus } from './ttrpc-codec.js';
import { TtrpcDecoder, TtrpcMessageType, encodeTtrpcMessage, type TtrpcHeader } from './ttrpc-framing.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';

/** What a method handler receives. */
export interface TtrpcCall {
  service: string;
  method: string;
  payload: Buffer;
  streamId: number;
  /** The runtime's deadline for this call in ms (0 = none given). */
  timeoutMs: number;
  metadata: TtrpcKeyValue[];
  /** Fires at the deadline or when the server closes. */
  signal: AbortSignal;
}

/** Returns the serialized response message (may be empty). */
export type TtrpcMethodHandler = (call: TtrpcCall) => Promise<Uint8Array> | Uint8Array;

/** service name → method name → handler */
export type TtrpcServiceTable = ReadonlyMap<string, ReadonlyMap<string, TtrpcMethodHandler>>;

export interface TtrpcTransport {
  send(ttrpcMessage: Uint8Array): Promise<void>;
}

export interface TtrpcServerOptions {
  logger: Logger;
  services: TtrpcServiceTable;
  /** Called once with a connection-fatal error (bad header); the owner must close the trunk. */
  onFatal?: (error: NriError) => void;
  maxDataBytes?: number;
  /**
   * Called after each response is handed to the transport, with the time spent serving it (decode of the
   * request to the response's send, in ms with sub-ms resolution): the plugin's own share of the runtime's
   * wait, for metrics and the NRI benchmark. Must not throw.
   */
  onServed?: (served: { service: string; method: string; durationMs: number; code: number }) => void;
}


export class TtrpcServer {
  private readonly decoder: TtrpcDecoder;
  private readonly logger: Logger;
  private lastStreamId = 0;
  private closedError: NriError | undefined;
  private readonly inflight = new Map<number, AbortController>();

  constructor(
    private readonly transport: TtrpcTransport,
    private readonly options: TtrpcServerOptions,
  ) {
    this.logger = options.logger;
    this.decoder = new TtrpcDecoder(options.maxDataBytes === undefined ? {} : { maxDataBytes: options.maxDataBytes });
  }

  /** Requests currently being handled. */
  get inflightCount(): number {
    return this.inflight.size;
  }

  /** Feed the connection's bytes (mux payloads) here. */
  receive(bytes: Buffer): void {
    if (this.closedError) return;
    let decoded;
    try {
      decoded = this.decoder.push(bytes);
    } catch (err) {
      const error = err as NriError;
      this.logger.error('ttrpc server: connection-fatal framing error', { code: error.code, error: error.message, bytes: hexPrefix(bytes) });
      this.options.onFatal?.(error);
      return;
    }
    for (const item of decoded) {
      if (item.kind === 'oversized') {
        this.logger.warn('ttrpc server: request too large, discarded', { streamId: item.header.streamId, length: item.header.length });
        this.reply(item.header.streamId, {
          code: GrpcCode.RESOURCE_EXHAUSTED,
          message: `message length ${item.header.length} exceed maximum message size of ${item.maxDataBytes}`,
        });
        continue;
      }
      this.onMessage(item.header, item.data);
    }
  }

  private onMessage(header: TtrpcHeader, data: Buffer): void {
    const { streamId } = header;
    if (header.type !== TtrpcMessageType.REQUEST) {
      this.logger.warn('ttrpc server: ignoring a non-request message', { streamId, type: header.type, flags: header.flags });
      return;
    }
    if (streamId % 2 !== 1) {
      this.logger.warn('ttrpc server: request on an even stream id', { streamId });
      this.reply(streamId, { code: GrpcCode.INVALID_ARGUMENT, message: 'StreamID must be odd for client initiated streams' });
      return;
    }
    if (streamId <= this.lastStreamId) {
      this.logger.warn('ttrpc server: request reuses a stream id (late or replayed request), answered InvalidArgument', {
        streamId,
        lastStreamId: this.lastStreamId,
      });
      this.reply(streamId, { code: GrpcCode.INVALID_ARGUMENT, message: 'StreamID cannot be re-used and must increment' });
      return;
    }
    this.lastStreamId = streamId;
    let request;
    try {
      request = decodeRequest(data);
    } catch (err) {
      this.logger.warn('ttrpc server: undecodable request', { streamId, error: (err as Error).message, bytes: hexPrefix(data) });
      this.reply(streamId, { code: GrpcCode.INVALID_ARGUMENT, message: `unmarshal request error: ${(err as Error).message}` });
      return;
    }
    const methods = this.options.services.get(request.service);
    if (!methods) {
      this.logger.info('ttrpc server: unknown service, answered Unimplemented', { streamId, service: request.service });
      this.reply(streamId, { code: GrpcCode.UNIMPLEMENTED, message: `service ${request.service}` });
      return;
    }
    const handler = methods.get(request.method);
    if (!handler) {
      this.logger.info('ttrpc server: unknown method, answered Unimplemented', { streamId, service: request.service, method: request.method });
      this.reply(streamId, { code: GrpcCode.UNIMPLEMENTED, message: `method ${request.method}` });
      return;
    }
    const timeoutMs = request.timeoutNano > 0 ? Math.max(1, Math.floor(request.timeoutNano / 1e6)) : 0;
    const controller = new AbortController();
    this.inflight.set(streamId, controller);
    const started = Date.now();
    const startedPrecise = performance.now();
    let expired = false;
    const timer =
      timeoutMs > 0
        ? setTimeout(() => {
            expired = true;
            controller.abort(new NriError('TTRPC_DEADLINE_EXCEEDED', `deadline of ${timeoutMs} ms passed`, { step: `serve ${request.method}` }));
          }, Math.min(timeoutMs, MAX_TIMER_DELAY_MS))
        : undefined;
    const call: TtrpcCall = {
      service: request.service,
      method: request.method,
      payload: request.payload,
      streamId,
      timeoutMs,
      metadata: request.metadata,
      signal: controller.signal,
    };
    const finish = (result: { payload?: Uint8Array; status?: TtrpcStatus }): void => {
      if (timer) clearTimeout(timer);
      this.inflight.delete(streamId);
      if (this.closedError) return;
      if (expired) {
        this.logger.error('ttrpc server: handler overran the request deadline; the runtime has given up, no response sent', {
          streamId,
          method: request.method,
          timeoutMs,
          elapsedMs: Date.now() - started,
        });
        return;
      }
      this.reply(streamId, result.status, result.payload);
      this.options.onServed?.({
        service: request.service,
        method: request.method,
        durationMs: performance.now() - startedPrecise,
        code: result.status?.code ?? GrpcCode.OK,
      });
    };
    let pending: Promise<Uint8Array>;
    try {
      pending = Promise.resolve(handler(call));
    } catch (err) {
      pending = Promise.reject(err);
    }
    pending.then(
      (payload) => finish({ payload }),
      (err: unknown) => {
        const status: TtrpcStatus =
          err instanceof TtrpcStatusError
            ? { code: err.grpcCode, message: err.grpcMessage }
            : { code: GrpcCode.UNKNOWN, message: err instanceof Error ? err.message : String(err) };
        if (!(err instanceof TtrpcStatusError)) {
          this.logger.warn('ttrpc server: handler failed, answered Unknown', { streamId, method: request.method, error: status.message });
        }
        finish({ status });
      },
    );
  }

  private reply(streamId: number, status?: TtrpcStatus, payload?: Uint8Array): void {
    if (this.closedError) return;
    let message: Buffer;
    try {
      const body = encodeResponse({ ...(status ? { status } : {}), ...(payload ? { payload } : {}) });
      message = encodeTtrpcMessage(streamId, TtrpcMessageType.RESPONSE, body);
    } catch (err) {
      this.logger.error('ttrpc server: cannot encode the response, answering Internal', { streamId, error: (err as Error).message });
      const body = encodeResponse({ status: { code: GrpcCode.INTERNAL, message: (err as Error).message } });
      message = encodeTtrpcMessage(streamId, TtrpcMessageType.RESPONSE, body);
    }
    this.transport.send(message).catch((err: unknown) => {
      this.logger.debug('ttrpc server: response not sent (trunk closed)', { streamId, error: (err as Error).message });
    });
  }

  /** Stops serving: aborts every in-flight handler's signal; nothing is sent afterwards. Idempotent. */
  close(error?: NriError): void {
    if (this.closedError) return;
    this.closedError = error ?? new NriError('TTRPC_CLOSED', 'ttrpc server closed', { step: 'ttrpc server' });
    for (const controller of this.inflight.values()) controller.abort(this.closedError);
    this.inflight.clear();
  }
}
