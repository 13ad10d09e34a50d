/**
 * Pull of a checkpoint from a registry into the local store, in two steps so that the agent can answer NRI
 * within its deadline:
 *
 *   resolveRemote   manifest (by tag or digest) and config blob: the checkpoint manifest, enough to check
 *                   compatibility. Two small requests.
 *   fetchResolved   the layers, in parallel (a layer larger than `rangeBytes` as parallel Range requests),
 *                   written at their offsets into a `.tmp-*` checkpoint directory, every byte's sha256 checked
 *                   against its layer digest; a broken transfer resumes from the last byte written (Range),
 *                   `retries` times. Files the cache holds are hard-linked instead of fetched. Then the
 *                   directory is published atomically; any failure removes it: no partial checkpoint, ever.
 *
 * The local name of a pulled checkpoint is derived from its manifest digest (`oci-<64 hex>`): a reference can
 * never name a directory, and a checkpoint pulled once is found again by the same digest.
 */
import { createHash, type Hash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage, isThawError } from '../../errors.js';
import { silentLogger, type Logger } from '../../log.js';
import { forEachLimit } from '../digest.js';
import { StoreErrorCode } from '../errors.js';
import type { LocalStore, OpenedCheckpoint } from '../local-store.js';
import { parseManifest, type Manifest } from '../manifest.js';
import { chunksOf, MANIFEST_MAX_BYTES, parseImageManifest, type FileChunk, type ImageManifest } from './artifact.js';
import { RegistryClient, type BlobRange, type RegistryClientOptions } from './client.js';
import { isTransient, OciError, OciErrorCode } from './errors.js';
import { FileCache } from './file-cache.js';
import { formatReference, manifestSelector, parseReference, type OciReference } from './reference.js';

export const DEFAULT_PULL_CONCURRENCY = 8;
export const DEFAULT_RANGE_BYTES = 64 * 1024 * 1024;
export const DEFAULT_TRANSFER_RETRIES = 5;
/** Writes are batched into buffers of this size (fewer syscalls than one per socket read). */
const WRITE_BUFFER_BYTES = 4 * 1024 * 1024;
const RETRY_BASE_MS = 200;
const LOCAL_NAME_PREFIX = 'oci-';

/** The local checkpoint name of a pulled manifest digest. Pure. */
export function localNameFor(manifestDigest: string): string {
  const hex = /^sha256:([0-9a-f]{64})$/.exec(manifestDigest)?.[1];
  if (hex === undefined) throw new OciError(OciErrorCode.MANIFEST_INVALID, `${JSON.stringify(manifestDigest)} is not a sha256 digest`, { step: 'name pulled checkpoint' });
  return `${LOCAL_NAME_PREFIX}${hex}`;
}

/** How to reach a registry: the client options minus the registry, which comes from the reference. */
export type RegistryAccess = Omit<RegistryClientOptions, 'registry'>;

export interface ResolvedRemote {
  reference: OciReference;
  /** Digest of the image manifest. */
  digest: string;
  /** The local checkpoint name it is (or will be) published under. */
  name: string;
  image: ImageManifest;
  /** The checkpoint's manifest (the config blob), verified by digest. */
  manifest: Manifest;
  chunks: FileChunk[];
}

export interface PullResult {
  checkpoint: OpenedCheckpoint;
  digest: string;
  /** True when the store already had it: nothing was transferred. */
  alreadyPresent: boolean;
  bytesFetched: number;
  bytesFromCache: number;
  ms: number;
  /** Where the time went: transfers (with the inline sha256), re-reads that check digests, fsync, publication. */
  phases?: { transferMs: number; verifyMs: number; syncMs: number; publishMs: number };
}

export interface FetchOptions {
  store: LocalStore;
  concurrency?: number;
  rangeBytes?: number;
  retries?: number;
  /** Link fetched files into the store's file cache, and take cached files from it (default true). */
  cache?: boolean;
  signal?: AbortSignal;
  logger?: Logger;
  /** Called as bytes arrive, with the total fetched so far (progress display; tests that break a pull midway). */
  onProgress?: (bytesFetched: number) => void;
}

/** Reads the manifest and the config blob; throws OciErrors (FOREIGN_ARTIFACT, MANIFEST_INVALID, ...). */
export async function resolveRemote(client: RegistryClient, reference: OciReference, options: { signal?: AbortSignal } = {}): Promise<ResolvedRemote> {
  const { body, digest } = await client.getManifest(reference.repository, manifestSelector(reference), options.signal);
  const url = client.url(`/v2/${reference.repository}/manifests/${manifestSelector(reference)}`).toString();
  const image = parseImageManifest(body.toString('utf8'), { url });
  if (image.config.size > MANIFEST_MAX_BYTES) {
    throw new OciError(OciErrorCode.MANIFEST_INVALID, `the config blob is ${image.config.size} bytes (at most ${MANIFEST_MAX_BYTES})`, { step: 'check checkpoint artifact', evidence: { url } });
  }
  const config = await client.getSmallBlob(reference.repository, image.config.digest, MANIFEST_MAX_BYTES, options.signal);
  let manifest: Manifest;
  try {
    manifest = parseManifest(config.toString('utf8'));
  } catch (err) {
    throw new OciError(OciErrorCode.MANIFEST_INVALID, `the config blob is not a thaw checkpoint manifest: ${errorMessage(err)}`, { step: 'check checkpoint artifact', cause: err, evidence: { url, config: image.config.digest } });
  }
  return { reference, digest, name: localNameFor(digest), image, manifest, chunks: chunksOf(image, manifest) };
}

interface Transfer {
  repository: string;
  chunk: FileChunk;
  /** Bytes [start, end) of the blob, written at `chunk.offset + start` of the file. */
  start: number;
  end: number;
  fh: FileHandle;
  /** Inline hash of the whole blob (single-range transfers); undefined when the blob is re-read after its ranges. */
  hash?: Hash;
}

/**
 * Writes a stream of bytes at consecutive file positions through two buffers: while one is being written (in
 * libuv's pool), the other fills from the socket, so that receiving never waits for the disk (one buffer made
 * each transfer alternate between the two, and the registry stall).
 */
class OffsetWriter {
  private readonly buffers: [Buffer, Buffer];
  private readonly writes: [Promise<void> | undefined, Promise<void> | undefined] = [undefined, undefined];
  private current = 0;
  private filled = 0;
  /** File position of the next byte pushed. */
  private next: number;

  constructor(
    private readonly fh: FileHandle,
    position: number,
    bufferBytes: number,
  ) {
    this.buffers = [Buffer.allocUnsafe(bufferBytes), Buffer.allocUnsafe(bufferBytes)];
    this.next = position;
  }

  /** File position after the last byte pushed (all of them are on their way to the file). */
  get end(): number {
    return this.next;
  }

  async push(data: Buffer): Promise<void> {
    for (let off = 0; off < data.length; ) {
      const buffer = this.buffers[this.current]!;
      const n = Math.min(buffer.length - this.filled, data.length - off);
      data.copy(buffer, this.filled, off, off + n);
      this.filled += n;
      off += n;
      this.next += n;
      if (this.filled === buffer.length) await this.rotate();
    }
  }

  /** Starts writing the current buffer and switches to the other, once its previous write is done. */
  private async rotate(): Promise<void> {
    const index = this.current;
    const length = this.filled;
    const position = this.next - length;
    const buffer = this.buffers[index]!;
    this.writes[index] = (async () => {
      for (let off = 0; off < length; ) {
        const { bytesWritten } = await this.fh.write(buffer, off, length - off, position + off);
        off += bytesWritten;
      }
    })();
    this.current = 1 - index;
    this.filled = 0;
    await this.writes[this.current];
    this.writes[this.current] = undefined;
  }

  /** Writes what is buffered and waits for every write. */
  async flush(): Promise<void> {
    if (this.filled > 0) await this.rotate();
    await Promise.all(this.writes);
    this.writes[0] = this.writes[1] = undefined;
  }

  /** Waits for the writes in flight, ignoring their errors (after a failure, before the handle closes). */
  async settle(): Promise<void> {
    await Promise.allSettled(this.writes.filter((w) => w !== undefined));
  }
}

async function transferRange(client: RegistryClient, t: Transfer, o: { retries: number; signal?: AbortSignal; onBytes: (n: number) => void }): Promise<void> {
  const digest = t.chunk.digest!;
  const step = `fetch ${t.chunk.path} [${t.chunk.offset + t.start}, ${t.chunk.offset + t.end}) (${digest})`;
  let pos = t.start;
  const bufferBytes = Math.min(WRITE_BUFFER_BYTES, Math.max(1, t.end - t.start));
  for (let attempt = 0; ; attempt++) {
    const writer = new OffsetWriter(t.fh, t.chunk.offset + pos, bufferBytes);
    let res: BlobRange | undefined;
    try {
      res = await client.openBlobRange(t.repository, digest, { start: pos, end: t.end, total: t.chunk.size }, o.signal);
      const length = res.contentLength;
      if (length !== undefined && length !== t.end - pos) {
        res.destroy?.();
        throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry sends ${length} bytes where ${t.end - pos} are expected (the blob is ${t.chunk.size} bytes by its descriptor)`, {
          step,
          evidence: { url: res.url, status: res.status, contentLength: length, expected: t.end - pos, descriptorSize: t.chunk.size },
        });
      }
      for await (const data of res.body) {
        if (pos + data.length > t.end) {
          res.destroy?.();
          throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry sent more than the ${t.chunk.size} bytes of the descriptor`, { step, evidence: { url: res.url } });
        }
        t.hash?.update(data);
        await writer.push(data);
        pos += data.length;
        o.onBytes(data.length);
      }
      await writer.flush();
      if (pos < t.end) {
        throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry ended the body after ${pos - t.start} of ${t.end - t.start} bytes`, {
          step,
          evidence: { url: res.url, received: pos, expectedEnd: t.end, descriptorSize: t.chunk.size },
        });
      }
      return;
    } catch (err) {
      const e = res !== undefined && !(err instanceof OciError) ? res.classify(err) : err;
      if (!isTransient(e) || attempt >= o.retries) {
        await writer.settle();
        throw e;
      }
      // Bytes received (and hashed) before the break are good: write them, and resume right after them.
      await writer.flush();
      pos = writer.end - t.chunk.offset;
      await sleep(RETRY_BASE_MS * 2 ** attempt, undefined, o.signal ? { signal: o.signal } : undefined).catch(() => undefined);
      if (o.signal?.aborted) throw e;
    }
  }
}

async function hashRange(fh: FileHandle, offset: number, size: number): Promise<string> {
  const hash = createHash('sha256');
  const buffer = Buffer.allocUnsafe(Math.min(WRITE_BUFFER_BYTES, Math.max(1, size)));
  for (let pos = 0; pos < size; ) {
    const { bytesRead } = await fh.read(buffer, 0, Math.min(buffer.length, size - pos), offset + pos);
    if (bytesRead === 0) break;
    hash.update(buffer.subarray(0, bytesRead));
    pos += bytesRead;
  }
  return `sha256:${hash.digest('hex')}`;
}

/** Fetches the layers of a resolved checkpoint and publishes it. Returns at once when the store has it. */
export async function fetchResolved(client: RegistryClient, r: ResolvedRemote, o: FetchOptions): Promise<PullResult> {
  const started = performance.now();
  const logger = (o.logger ?? silentLogger).child({ component: 'oci-pull', reference: formatReference(r.reference), digest: r.digest });
  const existing = await o.store.open(r.name).catch(() => undefined);
  if (existing !== undefined) return { checkpoint: existing, digest: r.digest, alreadyPresent: true, bytesFetched: 0, bytesFromCache: 0, ms: performance.now() - started };
  const signal = o.signal;
  const rangeBytes = o.rangeBytes ?? DEFAULT_RANGE_BYTES;
  const cache = o.cache === false ? undefined : await FileCache.open(o.store.root);
  const pending = await o.store.beginCheckpoint(r.name);
  const handles = new Map<string, FileHandle>();
  let bytesFetched = 0;
  let bytesFromCache = 0;
  try {
    // Files: linked from the cache, or created at their size for the chunks to be written into.
    const toFetch = new Set<string>();
    for (const file of r.manifest.files) {
      const dest = join(pending.dir, file.path);
      await mkdir(dirname(dest), { recursive: true, mode: 0o700 });
      if (cache !== undefined && (await cache.linkTo(file.sha256, file.size, dest))) {
        bytesFromCache += file.size;
        continue;
      }
      const fh = await open(dest, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o600);
      handles.set(file.path, fh);
      await fh.truncate(file.size);
      toFetch.add(file.path);
    }
    // Transfers: one per chunk, or several Range requests for a chunk larger than rangeBytes.
    const transfers: Transfer[] = [];
    const reread: FileChunk[] = [];
    const seen = new Set<string>();
    for (const chunk of r.chunks) {
      if (!toFetch.has(chunk.path)) continue;
      const key = `${chunk.path}@${chunk.offset}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const fh = handles.get(chunk.path)!;
      if (chunk.size <= rangeBytes) {
        transfers.push({ repository: r.reference.repository, chunk, start: 0, end: chunk.size, fh, hash: createHash('sha256') });
        continue;
      }
      reread.push(chunk);
      for (let start = 0; start < chunk.size; start += rangeBytes) {
        transfers.push({ repository: r.reference.repository, chunk, start, end: Math.min(chunk.size, start + rangeBytes), fh });
      }
    }
    // Largest first: the long transfers start early, the small ones fill in around them.
    transfers.sort((a, b) => b.end - b.start - (a.end - a.start));
    const mismatch = (chunk: FileChunk, actual: string): OciError =>
      new OciError(OciErrorCode.DIGEST_MISMATCH, `${chunk.path} [${chunk.offset}, ${chunk.offset + chunk.size}): the registry sent bytes whose digest is ${actual}, not ${chunk.digest}`, {
        step: 'verify layer',
        evidence: { file: chunk.path, offset: chunk.offset, expected: chunk.digest, actual, url: client.url(`/v2/${r.reference.repository}/blobs/${chunk.digest}`).toString() },
      });
    const t0 = performance.now();
    await forEachLimit(
      transfers,
      o.concurrency ?? DEFAULT_PULL_CONCURRENCY,
      async (t) => {
        await transferRange(client, t, { retries: o.retries ?? DEFAULT_TRANSFER_RETRIES, ...(signal ? { signal } : {}), onBytes: (n) => {
          bytesFetched += n;
          o.onProgress?.(bytesFetched);
        } });
        if (t.hash !== undefined) {
          const actual = `sha256:${t.hash.digest('hex')}`;
          if (actual !== t.chunk.digest) throw mismatch(t.chunk, actual);
        }
      },
      { step: 'fetch layers', ...(signal ? { signal } : {}) },
    );
    const t1 = performance.now();
    let syncMs = 0;
    for (const chunk of reread) {
      const actual = await hashRange(handles.get(chunk.path)!, chunk.offset, chunk.size);
      if (actual !== chunk.digest) throw mismatch(chunk, actual);
    }
    // A file of several chunks: its own sha256 is checked before the cache may hand it out under that name.
    const files = new Map(r.manifest.files.map((f) => [f.path, f]));
    const chunkCount = new Map<string, number>();
    for (const c of r.chunks) chunkCount.set(c.path, (chunkCount.get(c.path) ?? 0) + 1);
    for (const path of toFetch) {
      const file = files.get(path)!;
      const fh = handles.get(path)!;
      const s0 = performance.now();
      await fh.sync();
      syncMs += performance.now() - s0;
      if (cache === undefined) continue;
      if ((chunkCount.get(path) ?? 0) > 1) {
        const actual = await hashRange(fh, 0, file.size);
        if (actual !== `sha256:${file.sha256}`) {
          throw new OciError(OciErrorCode.DIGEST_MISMATCH, `${path}: its layers verify, but the whole file's sha256 is ${actual}, not the manifest's ${file.sha256}`, {
            step: 'verify file',
            evidence: { file: path, expected: file.sha256, actual },
          });
        }
      }
      await cache.add(file.sha256, join(pending.dir, path));
    }
    for (const fh of handles.values()) await fh.close();
    handles.clear();
    const t2 = performance.now();
    let checkpoint: OpenedCheckpoint;
    try {
      checkpoint = await pending.publishVerified(r.manifest, signal ? { signal } : {});
    } catch (err) {
      // Another pull of the same digest won the race: its checkpoint is the same bytes.
      if (!isThawError(err, StoreErrorCode.EXISTS)) throw err;
      await pending.abort();
      checkpoint = await o.store.open(r.name);
    }
    const ms = performance.now() - started;
    const phases = { transferMs: Math.round(t1 - t0), verifyMs: Math.round(t2 - t1 - syncMs), syncMs: Math.round(syncMs), publishMs: Math.round(performance.now() - t2) };
    logger.info('checkpoint pulled', { name: r.name, bytesFetched, bytesFromCache, ms: Math.round(ms), phases });
    return { checkpoint, digest: r.digest, alreadyPresent: false, bytesFetched, bytesFromCache, ms, phases };
  } catch (err) {
    for (const fh of handles.values()) await fh.close().catch(() => undefined);
    await pending.abort().catch(() => undefined);
    logger.warn('pull failed; nothing was kept', { name: r.name, error: errorMessage(err), code: isThawError(err) ? err.code : undefined });
    throw err;
  }
}

export interface PullOptions extends Omit<FetchOptions, 'store'> {
  store: LocalStore;
  /** `registry/repo:tag` or `registry/repo@sha256:...`. */
  reference: string;
  access?: RegistryAccess;
  /** An existing client for the reference's registry (connection and token reuse); else one is made and closed. */
  client?: RegistryClient;
}

/** `thaw pull`: resolve then fetch. */
export async function pullCheckpoint(o: PullOptions): Promise<PullResult & { name: string }> {
  const reference = parseReference(o.reference);
  const client = o.client ?? new RegistryClient({ ...(o.access ?? {}), registry: reference.registry, ...(o.logger ? { logger: o.logger } : {}) });
  try {
    const resolved = await resolveRemote(client, reference, o.signal ? { signal: o.signal } : {});
    const result = await fetchResolved(client, resolved, o);
    return { ...result, name: resolved.name };
  } finally {
    if (o.client === undefined) client.close();
  }
}
