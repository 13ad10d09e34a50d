/**
 * The OCI distribution API of one registry: blobs (HEAD, ranged GET, monolithic and chunked upload with
 * resume), manifests (GET, PUT), and authentication (anonymous, Basic, and the Bearer token flow that a
 * `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge asks for). One client per registry
 * host; it pools connections (createTransport) and remembers the Authorization header per repository.
 */
import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';
import { silentLogger, type Logger } from '../../log.js';
import { parseChallenges } from './challenge.js';
import { OciError, OciErrorCode } from './errors.js';
import { openBlobStream, type BodySegment } from './blob-stream.js';
import type { SlabPool } from './slab-pool.js';
import { createTransport, discard, exchange, readBody, type HttpRequest, type HttpResponse, type Transport } from './http.js';
import { MANIFEST_MAX_BYTES, OCI_MANIFEST_MEDIA_TYPE } from './artifact.js';

export interface RegistryCredentials {
  username: string;
  password: string;
}

export interface RegistryClientOptions {
  /** host[:port] as in a reference. */
  registry: string;
  plainHttp?: boolean;
  /** PEM CA bundle for a registry whose certificate a private CA signed. */
  ca?: string | Buffer;
  credentials?: RegistryCredentials;
  /**
   * Repository prefixes (whole path components, e.g. `team-a` or `team-a/llm`) the credentials are for: any
   * other repository of this registry is asked for without them. Absent: every repository (the CLI's use, where
   * the operator names one reference at a time).
   */
  credentialRepositories?: readonly string[];
  /**
   * Hosts (host[:port]) besides the registry that token realms and redirects may lead to (a token server, a blob
   * store). Always over this client's scheme: https, or http only when `plainHttp` says so for this registry.
   * Anything else is refused (OCI_NOT_ALLOWED) before a request is sent there.
   */
  authHosts?: readonly string[];
  /** No byte sent or received for this long fails the request (OCI_TIMEOUT). Default 30 s. */
  requestTimeoutMs?: number;
  /** Connections kept to the registry (default 16). */
  maxSockets?: number;
  logger?: Logger;
}

export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
/** Error bodies and token responses are small; more is not read. */
const SMALL_BODY_MAX_BYTES = 64 * 1024;
const REDIRECTS_MAX = 3;

export type Access = 'pull' | 'pull,push';

/** A blob's bytes being received (openBlobRange). */
export interface BlobRange {
  url: string;
  status: number;
  contentLength?: number;
  /** The body's bytes; each segment's release() must be called once its bytes are used (slabs are reused). */
  body: AsyncIterable<BodySegment>;
  /** Maps an error thrown while reading `body` to its OciError. */
  classify(err: unknown): OciError;
  /** Stops receiving (the rest of the body is not wanted). */
  destroy?(): void;
}

interface CallOptions {
  repository: string;
  access: Access;
  step: string;
  signal?: AbortSignal;
  timeoutMs?: number;
}

/** The registry's JSON error body (`{"errors":[{code,message,detail}]}`), or its first bytes. */
async function errorBody(res: HttpResponse): Promise<unknown> {
  if (res.body.readableEnded) return undefined;
  const buf = await readBody(res, SMALL_BODY_MAX_BYTES, 'read error body').catch(() => Buffer.alloc(0));
  const text = buf.toString('utf8');
  try {
    return JSON.parse(text);
  } catch {
    return text.slice(0, 2000);
  }
}

/** node:http's chunks as segments (their memory is the stream's: nothing to give back). */
async function* segmentsOf(chunks: AsyncIterable<Buffer>): AsyncGenerator<BodySegment> {
  for await (const data of chunks) yield { data, release: () => undefined };
}

export function sha256Digest(data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

export class RegistryClient {
  readonly registry: string;
  private readonly transport: Transport;
  private readonly credentials: RegistryCredentials | undefined;
  private readonly credentialRepositories: readonly string[] | undefined;
  private readonly allowedHosts: ReadonlySet<string>;
  private readonly timeoutMs: number;
  private readonly logger: Logger;
  private readonly ca: string | Buffer | undefined;
  /** `<repository> <access>` → Authorization header value that worked. */
  private readonly authorization = new Map<string, string>();
  /** Single-flight of token fetches per scope: 16 parallel chunk requests share one. */
  private readonly pendingAuth = new Map<string, Promise<string>>();

  constructor(o: RegistryClientOptions) {
    this.registry = o.registry;
    this.transport = createTransport({ ...(o.plainHttp ? { plainHttp: true } : {}), ...(o.ca !== undefined ? { ca: o.ca } : {}), ...(o.maxSockets !== undefined ? { maxSockets: o.maxSockets } : {}) });
    this.credentials = o.credentials;
    this.credentialRepositories = o.credentialRepositories;
    this.allowedHosts = new Set([o.registry.toLowerCase(), ...(o.authHosts ?? []).map((h) => h.toLowerCase())]);
    this.ca = o.ca;
    this.timeoutMs = o.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.logger = (o.logger ?? silentLogger).child({ component: 'oci', registry: o.registry });
  }

  close(): void {
    this.transport.close();
  }

  /** The credentials for `repository`, when they are scoped to it (credentialRepositories). */
  private credentialsFor(repository: string): RegistryCredentials | undefined {
    if (this.credentials === undefined) return undefined;
    const scope = this.credentialRepositories;
    if (scope === undefined) return this.credentials;
    return scope.some((p) => repository === p || repository.startsWith(`${p}/`)) ? this.credentials : undefined;
  }

  /**
   * Refuses a URL a registry answer leads to (token realm, redirect) unless it is this client's scheme and a host
   * the configuration names: a registry must not send thaw (and its credentials) anywhere it likes.
   */
  private checkLeadsTo(url: URL, what: string, step: string): void {
    const scheme = this.transport.plainHttp ? 'http:' : 'https:';
    if (url.protocol !== scheme || !this.allowedHosts.has(url.host.toLowerCase())) {
      throw new OciError(OciErrorCode.NOT_ALLOWED, `${what} ${url.origin} is not ${[...this.allowedHosts].map((h) => `${scheme}//${h}`).join(' or ')} (registry access: authHosts, plainHttp)`, {
        step,
        evidence: { url: `${url.origin}${url.pathname}`, allowed: [...this.allowedHosts], scheme },
      });
    }
  }

  url(path: string): URL {
    return new URL(`${this.transport.plainHttp ? 'http' : 'https'}://${this.registry}${path}`);
  }

  /**
   * One API call with authentication: sends the remembered Authorization; on 401 answers the challenge
   * (Basic with the credentials, or a Bearer token from the realm) and sends once more. Follows redirects of
   * GET/HEAD (blob stores behind a registry), without the Authorization header off the registry's origin.
   */
  async call(req: HttpRequest, o: CallOptions): Promise<HttpResponse> {
    const key = `${o.repository} ${o.access}`;
    for (let attempt = 0; ; attempt++) {
      const auth = this.authorization.get(key);
      let res = await exchange(this.transport, { ...req, headers: { ...(req.headers ?? {}), ...(auth ? { authorization: auth } : {}) } }, {
        timeoutMs: o.timeoutMs ?? this.timeoutMs,
        step: o.step,
        ...(o.signal ? { signal: o.signal } : {}),
      });
      for (let hops = 0; (req.method === 'GET' || req.method === 'HEAD') && [301, 302, 303, 307, 308].includes(res.status) && hops < REDIRECTS_MAX; hops++) {
        const location = res.headers.location;
        await discard(res);
        if (!location) throw new OciError(OciErrorCode.PROTOCOL, `redirect ${res.status} without Location`, { step: o.step, evidence: { url: res.url.toString() } });
        const next = new URL(location, res.url);
        this.checkLeadsTo(next, `a redirect to`, o.step);
        const sameOrigin = next.origin === req.url.origin;
        res = await exchange(this.transport, { ...req, url: next, headers: { ...(req.headers ?? {}), ...(auth && sameOrigin ? { authorization: auth } : {}) } }, {
          timeoutMs: o.timeoutMs ?? this.timeoutMs,
          step: o.step,
          ...(o.signal ? { signal: o.signal } : {}),
        });
      }
      if (res.status !== 401 || attempt > 0) {
        if (res.status === 401 || res.status === 403) {
          throw new OciError(OciErrorCode.AUTH_FAILED, `${req.method} ${req.url.pathname}: ${res.status} ${res.status === 401 ? 'unauthorized' : 'forbidden'}${this.credentials ? ' with the given credentials' : ' (no credentials given)'}`, {
            step: o.step,
            evidence: { status: res.status, url: req.url.toString(), body: await errorBody(res), challenge: res.headers['www-authenticate'] },
          });
        }
        return res;
      }
      const challengeHeader = res.headers['www-authenticate'] ?? '';
      const body = await errorBody(res);
      const current = this.authorization.get(key);
      if (current !== undefined && current !== auth) continue; // another request answered the challenge meanwhile
      let pending = this.pendingAuth.get(key);
      if (pending === undefined) {
        pending = this.answer(String(challengeHeader), o, { url: req.url.toString(), body });
        this.pendingAuth.set(key, pending);
        void pending.finally(() => this.pendingAuth.delete(key)).catch(() => undefined);
      }
      this.authorization.set(key, await pending);
    }
  }

  /** The Authorization header that answers a 401's challenge. */
  private async answer(header: string, o: CallOptions, seen: { url: string; body: unknown }): Promise<string> {
    const challenges = parseChallenges(header);
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    const basic = challenges.find((c) => c.scheme === 'basic');
    const authFailed = (message: string, extra: Record<string, unknown> = {}): OciError =>
      new OciError(OciErrorCode.AUTH_FAILED, message, { step: o.step, evidence: { status: 401, challenge: header, ...seen, ...extra } });
    const credentials = this.credentialsFor(o.repository);
    const basicHeader = credentials ? `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`).toString('base64')}` : undefined;
    if (bearer) {
      const realm = bearer.params['realm'];
      if (!realm) throw authFailed('the registry asked for a bearer token but named no realm');
      let tokenUrl: URL;
      try {
        tokenUrl = new URL(realm);
      } catch {
        throw authFailed(`the token realm ${JSON.stringify(realm)} is not a URL`);
      }
      this.checkLeadsTo(tokenUrl, 'the token realm', o.step);
      if (bearer.params['service']) tokenUrl.searchParams.set('service', bearer.params['service']);
      tokenUrl.searchParams.set('scope', `repository:${o.repository}:${o.access}`);
      const res = await exchange(this.transport, { method: 'GET', url: tokenUrl, headers: basicHeader ? { authorization: basicHeader } : {} }, {
        timeoutMs: this.timeoutMs,
        step: `${o.step}: fetch token`,
        ...(o.signal ? { signal: o.signal } : {}),
      });
      if (res.status !== 200) {
        throw authFailed(`the token server ${tokenUrl.origin}${tokenUrl.pathname} answered ${res.status}`, { tokenStatus: res.status, tokenBody: await errorBody(res) });
      }
      const raw = (await readBody(res, SMALL_BODY_MAX_BYTES, `${o.step}: fetch token`)).toString('utf8');
      let token: unknown;
      try {
        const parsed = JSON.parse(raw) as { token?: unknown; access_token?: unknown };
        token = parsed.token ?? parsed.access_token;
      } catch {
        token = undefined;
      }
      if (typeof token !== 'string' || token.length === 0) throw authFailed('the token server answered without a token', { tokenBody: raw.slice(0, 500) });
      this.logger.debug('bearer token obtained', { realm: tokenUrl.origin + tokenUrl.pathname, repository: o.repository, access: o.access });
      return `Bearer ${token}`;
    }
    if (basic) {
      if (!basicHeader) throw authFailed(this.credentials ? `the registry wants a username and password and the configured ones are not for repository ${o.repository}` : 'the registry wants a username and password and none were given');
      return basicHeader;
    }
    throw authFailed(`401 without a challenge thaw can answer (${JSON.stringify(header)})`);
  }

  private async unexpected(res: HttpResponse, step: string, wanted: string): Promise<OciError> {
    const body = await errorBody(res);
    const evidence = { status: res.status, url: res.url.toString(), body };
    if (res.status === 404) return new OciError(OciErrorCode.NOT_FOUND, `${res.url.pathname}: not found`, { step, evidence });
    if (res.status >= 500) return new OciError(OciErrorCode.REGISTRY_UNAVAILABLE, `${res.url.pathname}: the registry answered ${res.status}`, { step, evidence });
    return new OciError(OciErrorCode.PROTOCOL, `${res.url.pathname}: expected ${wanted}, the registry answered ${res.status}`, { step, evidence });
  }

  /** Size of a blob the registry has, or undefined when it has not. */
  async headBlob(repository: string, digest: string, signal?: AbortSignal): Promise<number | undefined> {
    const step = `HEAD blob ${digest}`;
    const res = await this.call({ method: 'HEAD', url: this.url(`/v2/${repository}/blobs/${digest}`) }, { repository, access: 'pull', step, ...(signal ? { signal } : {}) });
    await discard(res);
    if (res.status === 404) return undefined;
    if (res.status !== 200) throw await this.unexpected(res, step, '200 or 404');
    const length = Number(res.headers['content-length']);
    return Number.isSafeInteger(length) ? length : undefined;
  }

  /**
   * GET of a blob's bytes [start, end) (a Range request unless it is the whole blob). The caller reads
   * `body` and checks what it got. A registry that ignores Range (200 for a partial request) is refused.
   */
  async getBlob(repository: string, digest: string, range: { start: number; end: number; total: number }, signal?: AbortSignal): Promise<HttpResponse> {
    const step = `GET blob ${digest}`;
    const whole = range.start === 0 && range.end === range.total;
    const res = await this.call(
      { method: 'GET', url: this.url(`/v2/${repository}/blobs/${digest}`), headers: whole ? {} : { range: `bytes=${range.start}-${range.end - 1}` } },
      { repository, access: 'pull', step, ...(signal ? { signal } : {}) },
    );
    if (whole ? res.status === 200 : res.status === 206) return res;
    if (res.status === 416 || (!whole && res.status === 200)) {
      await discard(res);
      throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry cannot serve bytes ${range.start}-${range.end - 1} of ${range.total} (status ${res.status})`, {
        step,
        evidence: { status: res.status, url: res.url.toString(), range, contentRange: res.headers['content-range'] },
      });
    }
    throw await this.unexpected(res, step, whole ? '200' : '206');
  }

  /**
   * Bytes [start, end) of a blob as a stream, for the pull's transfers: through blob-stream.ts's raw socket
   * when the registry answers plainly, else through getBlob (redirects, a 401 to answer, chunked coding).
   */
  async openBlobRange(repository: string, digest: string, range: { start: number; end: number; total: number }, pool: SlabPool, signal?: AbortSignal): Promise<BlobRange> {
    const step = `GET blob ${digest}`;
    const url = this.url(`/v2/${repository}/blobs/${digest}`);
    const whole = range.start === 0 && range.end === range.total;
    const auth = this.authorization.get(`${repository} pull`);
    const fast = await openBlobStream({
      url,
      headers: { ...(auth ? { authorization: auth } : {}), ...(whole ? {} : { range: `bytes=${range.start}-${range.end - 1}` }) },
      timeoutMs: this.timeoutMs,
      step,
      pool,
      ...(this.ca !== undefined ? { ca: this.ca } : {}),
      ...(signal ? { signal } : {}),
    });
    if (fast.kind === 'body' && fast.status === (whole ? 200 : 206)) {
      return { url: url.toString(), status: fast.status, contentLength: fast.contentLength, body: fast.body, classify: (err) => (err instanceof OciError ? err : new OciError(OciErrorCode.REGISTRY_UNAVAILABLE, String(err), { step, cause: err })) };
    }
    if (fast.kind === 'body') {
      for await (const segment of fast.body) segment.release(); // a 200 for a Range request: drained, and getBlob says why it fails
    }
    const res = await this.getBlob(repository, digest, range, signal);
    const length = Number(res.headers['content-length']);
    return {
      url: res.url.toString(),
      status: res.status,
      ...(Number.isSafeInteger(length) ? { contentLength: length } : {}),
      body: segmentsOf(res.body as AsyncIterable<Buffer>),
      classify: (err) => res.classify(err),
      destroy: () => res.body.destroy(),
    };
  }

  /** A small blob (a config) read whole and checked against its digest. */
  async getSmallBlob(repository: string, digest: string, maxBytes: number, signal?: AbortSignal): Promise<Buffer> {
    const step = `GET blob ${digest}`;
    const res = await this.call({ method: 'GET', url: this.url(`/v2/${repository}/blobs/${digest}`) }, { repository, access: 'pull', step, ...(signal ? { signal } : {}) });
    if (res.status !== 200) throw await this.unexpected(res, step, '200');
    const data = await readBody(res, maxBytes, step);
    const actual = sha256Digest(data);
    if (actual !== digest) {
      throw new OciError(OciErrorCode.DIGEST_MISMATCH, `blob ${digest}: the registry sent bytes whose digest is ${actual}`, { step, evidence: { expected: digest, actual, url: res.url.toString(), bytes: data.length } });
    }
    return data;
  }

  /**
   * GET of a manifest by tag or digest (`accept`: the media types asked for, default an OCI image manifest);
   * returns its bytes and their digest (checked when `selector` is one).
   */
  async getManifest(repository: string, selector: string, signal?: AbortSignal, accept: string = OCI_MANIFEST_MEDIA_TYPE): Promise<{ body: Buffer; digest: string; mediaType: string | undefined }> {
    const step = `GET manifest ${repository}:${selector}`;
    const res = await this.call(
      { method: 'GET', url: this.url(`/v2/${repository}/manifests/${selector}`), headers: { accept } },
      { repository, access: 'pull', step, ...(signal ? { signal } : {}) },
    );
    if (res.status !== 200) throw await this.unexpected(res, step, '200');
    const body = await readBody(res, MANIFEST_MAX_BYTES, step);
    const digest = sha256Digest(body);
    const claimed = res.headers['docker-content-digest'];
    if (selector.startsWith('sha256:') && digest !== selector) {
      throw new OciError(OciErrorCode.DIGEST_MISMATCH, `manifest ${selector}: the registry sent bytes whose digest is ${digest}`, { step, evidence: { expected: selector, actual: digest, url: res.url.toString() } });
    }
    if (typeof claimed === 'string' && claimed.startsWith('sha256:') && claimed !== digest) {
      throw new OciError(OciErrorCode.DIGEST_MISMATCH, `manifest ${repository}:${selector}: Docker-Content-Digest says ${claimed}, the bytes are ${digest}`, { step, evidence: { expected: claimed, actual: digest, url: res.url.toString() } });
    }
    return { body, digest, mediaType: res.headers['content-type'] };
  }

  /** PUT of a manifest under a tag (or its digest); returns the digest. */
  async putManifest(repository: string, selector: string, body: Buffer, mediaType: string, signal?: AbortSignal): Promise<string> {
    const step = `PUT manifest ${repository}:${selector}`;
    const res = await this.call(
      { method: 'PUT', url: this.url(`/v2/${repository}/manifests/${selector}`), headers: { 'content-type': mediaType }, body },
      { repository, access: 'pull,push', step, ...(signal ? { signal } : {}) },
    );
    if (res.status !== 201) throw await this.unexpected(res, step, '201');
    await discard(res);
    return sha256Digest(body);
  }

  /** POST: opens an upload session; returns its URL. */
  async startUpload(repository: string, signal?: AbortSignal): Promise<URL> {
    const step = `start blob upload to ${repository}`;
    const res = await this.call({ method: 'POST', url: this.url(`/v2/${repository}/blobs/uploads/`), headers: { 'content-length': '0' } }, { repository, access: 'pull,push', step, ...(signal ? { signal } : {}) });
    if (res.status !== 202) throw await this.unexpected(res, step, '202');
    await discard(res);
    return this.location(res, step);
  }

  private location(res: HttpResponse, step: string): URL {
    const location = res.headers.location;
    if (!location) throw new OciError(OciErrorCode.PROTOCOL, `${res.status} without a Location header`, { step, evidence: { url: res.url.toString(), status: res.status } });
    return new URL(location, res.url);
  }

  /** Monolithic upload: one PUT of the whole blob to an open session. */
  async putBlob(repository: string, session: URL, digest: string, size: number, body: () => Readable, signal?: AbortSignal): Promise<void> {
    const step = `upload blob ${digest}`;
    const url = new URL(session);
    url.searchParams.set('digest', digest);
    const res = await this.call(
      { method: 'PUT', url, headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) }, body },
      { repository, access: 'pull,push', step, ...(signal ? { signal } : {}) },
    );
    if (res.status !== 201) throw await this.uploadError(res, step, digest);
    await discard(res);
  }

  private async uploadError(res: HttpResponse, step: string, digest: string): Promise<OciError> {
    const body = await errorBody(res);
    const code = JSON.stringify(body).includes('DIGEST_INVALID') ? OciErrorCode.DIGEST_MISMATCH : undefined;
    if (code) return new OciError(code, `the registry refused ${digest}: the bytes it received have another digest`, { step, evidence: { status: res.status, url: res.url.toString(), body } });
    if (res.status === 404) return new OciError(OciErrorCode.NOT_FOUND, `upload session ${res.url.pathname} is gone`, { step, evidence: { status: res.status, url: res.url.toString(), body } });
    if (res.status >= 500) return new OciError(OciErrorCode.REGISTRY_UNAVAILABLE, `the registry answered ${res.status}`, { step, evidence: { status: res.status, url: res.url.toString(), body } });
    return new OciError(OciErrorCode.PROTOCOL, `upload: the registry answered ${res.status}`, { step, evidence: { status: res.status, url: res.url.toString(), body } });
  }

  /** Chunked upload: PATCH of bytes [start, start+size) to a session; returns the session's next URL. */
  async patchBlob(repository: string, session: URL, start: number, size: number, body: () => Readable, signal?: AbortSignal): Promise<URL> {
    const step = `upload chunk ${start}-${start + size - 1}`;
    const res = await this.call(
      {
        method: 'PATCH',
        url: session,
        headers: { 'content-type': 'application/octet-stream', 'content-length': String(size), 'content-range': `${start}-${start + size - 1}` },
        body,
      },
      { repository, access: 'pull,push', step, ...(signal ? { signal } : {}) },
    );
    if (res.status !== 202) throw await this.uploadError(res, step, `bytes ${start}-${start + size - 1}`);
    await discard(res);
    return this.location(res, step);
  }

  /** Closes a chunked session: PUT with the digest and no body. */
  async finishUpload(repository: string, session: URL, digest: string, signal?: AbortSignal): Promise<void> {
    const step = `finish upload of ${digest}`;
    const url = new URL(session);
    url.searchParams.set('digest', digest);
    const res = await this.call({ method: 'PUT', url, headers: { 'content-length': '0' }, body: Buffer.alloc(0) }, { repository, access: 'pull,push', step, ...(signal ? { signal } : {}) });
    if (res.status !== 201) throw await this.uploadError(res, step, digest);
    await discard(res);
  }

  /**
   * How many bytes a session holds (GET on it; `Range: 0-<last>`), and its current URL: where an interrupted
   * chunked upload resumes. `known` disambiguates distribution's "0-0", which it sends for 0 and for 1 byte.
   */
  async uploadStatus(repository: string, session: URL, known: number, signal?: AbortSignal): Promise<{ offset: number; session: URL }> {
    const step = 'upload status';
    const res = await this.call({ method: 'GET', url: session }, { repository, access: 'pull,push', step, ...(signal ? { signal } : {}) });
    if (res.status !== 204) throw await this.uploadError(res, step, session.pathname);
    await discard(res);
    const range = /^(?:bytes=)?0-(\d+)$/.exec(String(res.headers.range ?? ''));
    const last = range ? Number(range[1]) : -1;
    const offset = last <= 0 ? (known >= 1 && last === 0 ? 1 : 0) : last + 1;
    return { offset, session: res.headers.location ? this.location(res, step) : session };
  }
}
