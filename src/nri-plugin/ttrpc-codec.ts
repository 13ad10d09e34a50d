/**
 * Protobuf encode/decode of the ttrpc envelope (Request, Response, Status) and of NRI payload messages.
 * A truncated or malformed protobuf yields TTRPC_DECODE_FAILED (with a hex prefix of the bytes as
 * evidence), never an uncaught RangeError.
 *
 * int64/uint64 fields are JavaScript `number`s on both sides: decoding converts protobufjs Longs with
 * `Number()`. Every int64 NRI carries (ns/ms timeouts, byte limits, device numbers, timestamps) stays far
 * below 2^53; a value above it would lose precision, never wrap.
 */
import type protobuf from 'protobufjs';
import { NriErrorCode, NriError, hexPrefix } from './errors.js';
import { NRI_PACKAGE, TTRPC_PACKAGE, protoSchemas } from './proto-schema.js';

export interface TtrpcKeyValue {
  key: string;
  value: string;
}

export interface TtrpcRequest {
  service: string;
  method: string;
  payload: Buffer;
  /** The caller's remaining deadline in nanoseconds; 0 = none. */
  timeoutNano: number;
  metadata: TtrpcKeyValue[];
}

export interface TtrpcStatus {
  code: number;
  message: string;
  details?: Array<{ typeUrl: string; value: Buffer }>;
}

export interface TtrpcResponse {
  /** Absent on success. */
  status?: TtrpcStatus;
  payload: Buffer;
}

const TO_OBJECT: protobuf.IConversionOptions = {
  longs: Number,
  enums: Number,
  bytes: Buffer,
  defaults: false,
  arrays: true,
  objects: true,
};

const typeCache = new Map<string, protobuf.Type>();

function lookup(fullName: string): protobuf.Type {
  let t = typeCache.get(fullName);
  if (!t) {
    const schemas = protoSchemas();
    const root = fullName.startsWith(`${TTRPC_PACKAGE}.`) ? schemas.ttrpc : schemas.nri;
    t = root.lookupType(fullName);
    typeCache.set(fullName, t);
  }
  return t;
}

/** Encodes a plain object as the named message (full name, e.g. "nri.pkg.api.v1alpha1.ConfigureResponse"). */
export function encodeMessage(fullName: string, value: object): Buffer {
  const type = lookup(fullName);
  try {
    const msg = type.fromObject(value as Record<string, unknown>);
    const bytes = type.encode(msg).finish();
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  } catch (err) {
    throw new NriError(NriErrorCode.TTRPC_ENCODE_FAILED, `cannot encode ${fullName}: ${(err as Error).message}`, {
      step: `encode ${fullName}`,
      cause: err,
    });
  }
}

/** Decodes bytes as the named message into a plain object (camelCase fields, int64 as number). */
export function decodeMessage<T>(fullName: string, bytes: Uint8Array): T {
  const type = lookup(fullName);
  try {
    // Decode from a plain Uint8Array view, never a Buffer: protobufjs's BufferReader reads strings without
    // a bounds check (a truncated string decodes silently as a shorter one); the generic Reader throws.
    const view = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
    return type.toObject(type.decode(view), TO_OBJECT) as T;
  } catch (err) {
    throw new NriError(NriErrorCode.TTRPC_DECODE_FAILED, `cannot decode ${fullName}: ${(err as Error).message}`, {
      step: `decode ${fullName}`,
      cause: err,
      evidence: { bytes: hexPrefix(bytes), length: bytes.length },
    });
  }
}

/** A Buffer view of decoded bytes (no copy). */
function asBuffer(bytes: Uint8Array | undefined): Buffer {
  if (!bytes) return Buffer.alloc(0);
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
}

/** Shorthand for messages of package nri.pkg.api.v1alpha1. */
export const nriType = (name: string): string => `${NRI_PACKAGE}.${name}`;

export function encodeRequest(req: Partial<TtrpcRequest> & { service: string; method: string }): Buffer {
  return encodeMessage('ttrpc.Request', {
    service: req.service,
    method: req.method,
    payload: req.payload ?? Buffer.alloc(0),
    timeoutNano: req.timeoutNano ?? 0,
    metadata: req.metadata ?? [],
  });
}

export function decodeRequest(bytes: Uint8Array): TtrpcRequest {
  const o = decodeMessage<Partial<TtrpcRequest>>('ttrpc.Request', bytes);
  return {
    service: o.service ?? '',
    method: o.method ?? '',
    payload: asBuffer(o.payload),
    timeoutNano: o.timeoutNano ?? 0,
    metadata: o.metadata ?? [],
  };
}

/** A Response; on success pass no status (the Go server omits it and so do we). */
export function encodeResponse(res: { status?: TtrpcStatus; payload?: Uint8Array }): Buffer {
  const value: Record<string, unknown> = {};
  if (res.status) value['status'] = res.status;
  if (res.payload && res.payload.length > 0) value['payload'] = res.payload;
  return encodeMessage('ttrpc.Response', value);
}

export function decodeResponse(bytes: Uint8Array): TtrpcResponse {
  const o = decodeMessage<{ status?: Partial<TtrpcStatus>; payload?: Buffer }>('ttrpc.Response', bytes);
  const out: TtrpcResponse = { payload: asBuffer(o.payload) };
  if (o.status) {
    out.status = { code: o.status.code ?? 0, message: o.status.message ?? '' };
    if (o.status.details && o.status.details.length > 0) {
      out.status.details = o.status.details.map((d) => ({ typeUrl: d.typeUrl, value: asBuffer(d.value) }));
    }
  }
  return out;
}
