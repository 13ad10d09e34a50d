/**
 * One HTTP exchange with a registry over Node's own http/https: no redirects, no auth, no retries (the
 * client above does those). Every request has an inactivity timeout (`timeoutMs`: no byte sent or received
 * for that long) and an AbortSignal; network failures become OciErrors (REGISTRY_UNAVAILABLE, TIMEOUT,
 * ABORTED) with the method and URL as evidence.
 */
import http, { type IncomingHttpHeaders, type IncomingMessage } from 'node:http';
import https from 'node:https';
import type { Readable } from 'node:stream';
import { OciError, OciErrorCode } from './errors.js';

export interface Transport {
  readonly plainHttp: boolean;
  agent: http.Agent;
  close(): void;
}

export interface TransportOptions {
  /** Speak http:// (a loopback or lab registry); default https://. */
  plainHttp?: boolean;
  /** PEM of the CA(s) that sign the registry's certificate, in addition to Node's defaults' replacement. */
  ca?: string | Buffer;
  /** Connections kept per registry (parallel transfers). */
  maxSockets?: number;
}

export function createTransport(o: TransportOptions = {}): Transport {
  const common = { keepAlive: true, maxSockets: o.maxSockets ?? 16, maxFreeSockets: o.maxSockets ?? 16, scheduling: 'lifo' as const };
  const agent = o.plainHttp ? new http.Agent(common) : new https.Agent({ ...common, ...(o.ca !== undefined ? { ca: o.ca } : {}) });
  return { plainHttp: o.plainHttp === true, agent, close: () => agent.destroy() };
}

export interface HttpRequest {
  method: 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  url: URL;
  headers?: Record<string, string>;
  /** A buffer, or a factory of a fresh stream (called once per attempt: a 401 retry re-sends the body). */
  body?: Buffer | (() => Readable);
}

export interface HttpResponse {
  status: number;
  headers: IncomingHttpHeaders;
  url: URL;
  /** The body stream; the caller reads it (readBody) or discards it (discard). */
  body: IncomingMessage;
  /** Turns an error raised while reading the body into the OciError it stands for (timeout, abort, broken connection). */
  classify(err: unknown): OciError;
}

export interface ExchangeOptions {
  timeoutMs: number;
  signal?: AbortSignal;
}

function netError(err: unknown, req: HttpRequest, step: string, timeoutMs: number, signal?: AbortSignal): OciError {
  if (err instanceof OciError) return err;
  const evidence = { method: req.method, url: req.url.toString(), errno: (err as NodeJS.ErrnoException)?.code };
  if (signal?.aborted) return new OciError(OciErrorCode.ABORTED, 'aborted by the caller', { step, cause: signal.reason, evidence });
  const errno = String((err as NodeJS.ErrnoException)?.code ?? '');
  if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER|ERR_TLS_CERT_ALTNAME/.test(errno)) {
    return new OciError(OciErrorCode.TLS_UNTRUSTED, `${req.url.origin}: its TLS certificate does not verify (${errno}: ${(err as Error).message}); give the CA that signed it`, { step, cause: err, evidence });
  }
  return new OciError(OciErrorCode.REGISTRY_UNAVAILABLE, `${req.method} ${req.url.origin}${req.url.pathname}: ${(err as Error)?.message ?? String(err)}`, {
    step,
    cause: err,
    evidence: { ...evidence, timeoutMs },
  });
}

/** Sends one request; resolves when the response head arrived. The body stream's errors are OciErrors too. */
export function exchange(t: Transport, req: HttpRequest, o: ExchangeOptions & { step: string }): Promise<HttpResponse> {
  return new Promise<HttpResponse>((resolve, reject) => {
    if (o.signal?.aborted) {
      reject(new OciError(OciErrorCode.ABORTED, 'aborted by the caller', { step: o.step, cause: o.signal.reason }));
      return;
    }
    const mod = req.url.protocol === 'http:' ? http : https;
    const headers: Record<string, string> = { 'user-agent': 'thaw', ...(req.headers ?? {}) };
    if (Buffer.isBuffer(req.body)) headers['content-length'] = String(req.body.length);
    const cr = mod.request(req.url, { method: req.method, headers, agent: t.agent });
    let settled = false;
    let failure: OciError | undefined;
    const fail = (err: OciError): void => {
      failure ??= err;
      cr.destroy(failure);
    };
    const onAbort = (): void => fail(new OciError(OciErrorCode.ABORTED, 'aborted by the caller', { step: o.step, cause: o.signal?.reason, evidence: { url: req.url.toString() } }));
    o.signal?.addEventListener('abort', onAbort, { once: true });
    cr.setTimeout(o.timeoutMs, () =>
      fail(new OciError(OciErrorCode.TIMEOUT, `${req.method} ${req.url.origin}${req.url.pathname}: nothing sent or received for ${o.timeoutMs} ms`, {
        step: o.step,
        evidence: { method: req.method, url: req.url.toString(), timeoutMs: o.timeoutMs },
      })),
    );
    cr.on('error', (err) => {
      const e = failure ?? netError(err, req, o.step, o.timeoutMs, o.signal);
      if (!settled) {
        settled = true;
        o.signal?.removeEventListener('abort', onAbort);
        reject(e);
      }
    });
    cr.on('response', (res) => {
      settled = true;
      // The body keeps the request's timeout and abort until it closes.
      res.once('close', () => o.signal?.removeEventListener('abort', onAbort));
      resolve({
        status: res.statusCode ?? 0,
        headers: res.headers,
        url: req.url,
        body: res,
        classify: (err) => failure ?? netError(err, req, o.step, o.timeoutMs, o.signal),
      });
    });
    if (req.body === undefined) cr.end();
    else if (Buffer.isBuffer(req.body)) cr.end(req.body);
    else {
      const src = req.body();
      src.on('error', (err) => fail(new OciError(OciErrorCode.IO, `reading the upload body: ${(err as Error).message}`, { step: o.step, cause: err })));
      src.pipe(cr);
    }
  });
}

/** Reads a whole (small) body; refuses one larger than `maxBytes`. */
export async function readBody(res: HttpResponse, maxBytes: number, step: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of res.body as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > maxBytes) {
        res.body.destroy();
        throw new OciError(OciErrorCode.PROTOCOL, `the response to ${res.url.pathname} is larger than ${maxBytes} bytes`, { step, evidence: { url: res.url.toString(), maxBytes } });
      }
      chunks.push(chunk);
    }
  } catch (err) {
    throw res.classify(err);
  }
  return Buffer.concat(chunks);
}

/** Drains a body we do not need, so the connection goes back to the pool. */
export async function discard(res: HttpResponse): Promise<void> {
  try {
    for await (const _ of res.body) void _;
  } catch {
    // a broken body of a response we did not need: the socket is gone, nothing to keep
  }
}
