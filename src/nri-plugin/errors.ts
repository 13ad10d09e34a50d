import { ThawError } from '../errors.js';

/**
 * Error codes of the NRI transport (mux, ttrpc) and the plugin lifecycle. Stable: callers, tests and logs
 * match on `code`, never on the message. Each code says whether it is connection-fatal (the trunk is
 * closed) or request-level (one call fails, the connection stays up).
 */
export const NriErrorCode = {
  /** Connection-fatal. A mux frame announced a payload larger than the receiver's limit (evidence: both numbers). */
  MUX_FRAME_TOO_LARGE: 'MUX_FRAME_TOO_LARGE',
  /** A caller tried to send a zero-length or out-of-range frame (a bug on our side; nothing was sent). */
  MUX_INVALID_FRAME: 'MUX_INVALID_FRAME',
  /** The trunk is closed (EOF, socket error, decoder error or close()); sends fail with this. */
  MUX_CLOSED: 'MUX_CLOSED',
  /** Request-level on receive (the data is discarded, ResourceExhausted answered), a refusal on send: data > 4 MiB. */
  TTRPC_MESSAGE_TOO_LARGE: 'TTRPC_MESSAGE_TOO_LARGE',
  /** Connection-fatal. A ttrpc header that cannot be valid (first length byte nonzero). */
  TTRPC_BAD_HEADER: 'TTRPC_BAD_HEADER',
  /** Request-level. A Request/Response/NRI message did not decode (truncated or malformed protobuf). */
  TTRPC_DECODE_FAILED: 'TTRPC_DECODE_FAILED',
  /** Request-level. An NRI message could not be encoded (a field of the wrong type). */
  TTRPC_ENCODE_FAILED: 'TTRPC_ENCODE_FAILED',
  /** Request-level. A client call got no response within its timeoutMs. */
  TTRPC_DEADLINE_EXCEEDED: 'TTRPC_DEADLINE_EXCEEDED',
  /** Request-level. The caller's AbortSignal fired before the response came. */
  TTRPC_CANCELLED: 'TTRPC_CANCELLED',
  /** The peer answered with a non-OK status (evidence: grpcCode, grpcMessage). */
  TTRPC_STATUS: 'TTRPC_STATUS',
  /** The peer answered a request with something that is not a Response. */
  TTRPC_PROTOCOL: 'TTRPC_PROTOCOL',
  /** The client or server was closed; every pending call is rejected with this. */
  TTRPC_CLOSED: 'TTRPC_CLOSED',
  /** createNriPlugin options are invalid (each message names the option). */
  NRI_INVALID_OPTIONS: 'NRI_INVALID_OPTIONS',
  /** The handler object implements no event handler: there would be nothing to subscribe to. */
  NRI_NO_HANDLERS: 'NRI_NO_HANDLERS',
  /** connect() to the NRI socket failed (ENOENT while containerd restarts, EACCES, ...). */
  NRI_CONNECT_FAILED: 'NRI_CONNECT_FAILED',
  /** RegisterPlugin failed or got no reply within registrationTimeoutMs. */
  NRI_REGISTRATION_FAILED: 'NRI_REGISTRATION_FAILED',
  /** The runtime's valid events and our handlers have nothing in common. */
  NRI_NO_COMMON_EVENTS: 'NRI_NO_COMMON_EVENTS',
  /** The plugin was closed (close(), AbortSignal, or a launched plugin's trunk hit EOF). */
  NRI_CLOSED: 'NRI_CLOSED',
  /** An adjustment builder call got an invalid value (relative path, bad env key, ...). */
  NRI_INVALID_ADJUSTMENT: 'NRI_INVALID_ADJUSTMENT',
  /** Thrown by a handler on purpose to make the runtime fail the operation (the only way to do so). */
  NRI_HANDLER_REJECTED: 'NRI_HANDLER_REJECTED',
  /** Runtime-launched mode without the NRI_PLUGIN_* environment. */
  NRI_LAUNCH_ENV_MISSING: 'NRI_LAUNCH_ENV_MISSING',
} as const;

export type NriErrorCode = (typeof NriErrorCode)[keyof typeof NriErrorCode];

/** Every error the NRI transport and plugin raise. */
export class NriError extends ThawError {
  constructor(
    code: NriErrorCode,
    message: string,
    options: { step: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    super(code, message, options);
    this.name = 'NriError';
  }
}

/** gRPC status codes used on the ttrpc wire (google.rpc.Code). */
export const GrpcCode = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  RESOURCE_EXHAUSTED: 8,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
} as const;

/**
 * A non-OK ttrpc status. The server sends `grpcCode`/`grpcMessage` when a handler throws it; the client
 * rejects a call with it (code TTRPC_STATUS) when the peer answered a non-OK status.
 */
export class TtrpcStatusError extends NriError {
  readonly grpcCode: number;
  readonly grpcMessage: string;

  constructor(grpcCode: number, grpcMessage: string, options: { step: string; cause?: unknown }) {
    super(NriErrorCode.TTRPC_STATUS, `status ${grpcCode}: ${grpcMessage}`, {
      ...options,
      evidence: { grpcCode, grpcMessage },
    });
    this.name = 'TtrpcStatusError';
    this.grpcCode = grpcCode;
    this.grpcMessage = grpcMessage;
  }
}

/**
 * Thrown by an NRI event handler that *wants* the runtime to fail the operation (CreateContainer fails the
 * container). Any other exception is logged and answered with an empty, successful reply: a pod never fails
 * because of thaw unless a handler says so with this error.
 */
export class NriHandlerRejection extends NriError {
  /** The text sent to the runtime as the status message (the runtime logs it and fails the operation). */
  readonly reason: string;

  constructor(message: string, evidence?: Record<string, unknown>) {
    super(NriErrorCode.NRI_HANDLER_REJECTED, message, {
      step: 'NRI handler',
      ...(evidence ? { evidence } : {}),
    });
    this.name = 'NriHandlerRejection';
    this.reason = message;
  }
}

/** A bounded hex prefix of bytes for logs and evidence (never the whole 4 MiB). */
export function hexPrefix(bytes: Uint8Array, maxBytes = 64): string {
  const hex = Buffer.from(bytes.buffer, bytes.byteOffset, Math.min(bytes.length, maxBytes)).toString('hex');
  return bytes.length > maxBytes ? `${hex}… (${bytes.length} bytes)` : hex;
}
