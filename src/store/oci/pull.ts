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
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage, isThawError } from '../../errors.js';
import { silentLogger, type Logger } from '../../log.js';
import { forEachLimit } from '../../sys/concurrency.js';
import { storeAborted, StoreErrorCode } from '../errors.js';
import type { LocalStore, OpenedCheckpoint } from '../local-store.js';
import { bindPageCache, type PageCache } from '../../sys/page-cache.js';
import { parseManifest, type Manifest } from '../manifest.js';
import { chunksOf, MANIFEST_MAX_BYTES, parseImageManifest, weightsLayersOf, type FileChunk, type ImageManifest, type WeightsLayer } from './artifact.js';
import { RegistryClient, type BlobRange, type RegistryClientOptions } from './client.js';
import { isTransient, OciError, OciErrorCode } from './errors.js';
import { FileCache } from './file-cache.js';
import { HashPool, type Sha256Stream } from './hash-pool.js';
import { formatReference, manifestSelector, parseReference, type OciReference } from './reference.js';
import { SlabPool } from './slab-pool.js';
import { WeightsCache } from './weights-cache.js';
import { WriteThread } from './write-thread.js';

export const DEFAULT_PULL_CONCURRENCY = 8;
export const DEFAULT_RANGE_BYTES = 64 * 1024 * 1024;
export const DEFAULT_TRANSFER_RETRIES = 5;
/**
 * Blob bodies are received into slabs of this size (a write and a hash update per slab), SLABS_PER_TRANSFER
 * per transfer in flight: one filling while the others are hashed and written.
 */
const SLAB_BYTES = 4 * 1024 * 1024;
const SLABS_PER_TRANSFER = 3;
/**
 * Writes go to the file in pieces of at most this size, each within one aligned piece of the file. The size of
 * a write decides the size of the page-cache folios the kernel allocates for it (ext4 with large folios, kernel
 * 6.18), and on the 2-core machine (a VM) large folios come from memory the host must fault in first. Writing
 * 2 GB alone, one writer: 0.75-0.9 s in 512 KiB or 1 MiB writes, 6-9 s in 2 or 4 MiB writes. In the pull of
 * 2 GB (bench:registry's checkpoint, one run each, interleaved): 128 KiB 4.1/4.5/4.3/5.3 s, 256 KiB
 * 3.7/4.2/8.6/7.0/5.8/7.9 s, 1 MiB 6.3-10.0 s, 64 KiB 8.2/8.9 s (the calls themselves start to cost).
 * curl, the baseline, writes 4-16 KiB at a time.
 */
const WRITE_MAX_BYTES = 128 * 1024;
/** A file being written has its writeback started each time this much more of it is written. */
const WRITEBACK_BYTES = 64 * 1024 * 1024;
/** Buffer of the re-reads that check a digest. */
const READ_BUFFER_BYTES = 4 * 1024 * 1024;
const RETRY_BASE_MS = 200;
const LOCAL_NAME_PREFIX = 'oci-';
/** A weights layer being fetched, in the pending checkpoint directory (never a checkpoint file's name: see chunksOf). */
const WEIGHTS_TMP_PREFIX = '.thaw-weights-';

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
  /** Weights layers (a push with weights): stored in the node's weights cache, not in the checkpoint. */
  weights: WeightsLayer[];
  /** The image manifest and the config blob as the registry sent them: kept with the checkpoint (provenance.ts). */
  provenance: { imageManifest: Buffer; config: Buffer };
}

export interface PullResult {
  checkpoint: OpenedCheckpoint;
  digest: string;
  /** True when the store already had it: nothing was transferred. */
  alreadyPresent: boolean;
  bytesFetched: number;
  bytesFromCache: number;
  /** Bytes of weights layers fetched into the node's weights cache (0 without weights layers). */
  weightsBytes?: number;
  ms: number;
  /**
   * Where the time went: transfers (with the sha256 of every byte), the fsyncs still running after the last
   * transfer (each file's starts when its last transfer ends), whole-file re-reads for the cache, publication.
   */
  phases?: { transferMs: number; verifyMs: number; syncMs: number; publishMs: number };
}

export interface FetchOptions {
  store: LocalStore;
  concurrency?: number;
  rangeBytes?: number;
  retries?: number;
  /** Worker threads that hash received bytes (default: defaultHashThreads(), the cores less one, 1 to 4). */
  hashThreads?: number;
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
  return { reference, digest, name: localNameFor(digest), image, manifest, chunks: chunksOf(image, manifest), weights: weightsLayersOf(image, manifest), provenance: { imageManifest: body, config } };
}

interface Transfer {
  repository: string;
  chunk: FileChunk;
  /** Bytes [start, end) of the blob, written at `chunk.offset + start` of the file. */
  start: number;
  end: number;
  sink: FileSink;
  /** Hash of the whole blob (single-range transfers); undefined when the blob is re-read after its ranges. */
  hash?: Sha256Stream;
}

/**
 * Positional writes into one file of the pull, through the pull's write thread (write-thread.ts): one write at
 * a time, since ext4 serializes buffered writes of an inode anyway (its i_rwsem) and writers beyond the first
 * only spin on the lock (perf, 2-core machine, a 2 GB pull with up to 4 writes in flight through libuv's pool:
 * rwsem_spin_on_owner took 7% of the CPU). Every WRITEBACK_BYTES written, writeback of the file is started
 * (sync_file_range), so that the disk writes while the transfer goes on and the fsync of sync() finds little
 * left: before this, the fsync after a 2 GB pull took 0.7-0.9 s of its time.
 */
class FileSink {
  private tail: Promise<void> = Promise.resolve();
  private sinceWriteback = 0;
  private writeback: Promise<unknown> | undefined;

  constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    private readonly pageCache: PageCache,
    private readonly writer: WriteThread,
  ) {}

  /** Writes all of `data` at `position` (in the write thread, after what was queued before); a failure is OCI_IO. */
  write(data: Uint8Array, position: number): Promise<void> {
    const done = this.writer.write(this.fh.fd, data, position).then(
      () => {
        this.sinceWriteback += data.length;
        if (this.sinceWriteback >= WRITEBACK_BYTES && this.writeback === undefined) {
          this.sinceWriteback = 0;
          this.writeback = this.pageCache.startWriteback(this.fh.fd, 0, 0).catch(() => undefined).finally(() => (this.writeback = undefined));
        }
      },
      (err: unknown) => {
        throw err instanceof OciError ? new OciError(err.code, `cannot write ${this.path} at ${position}: ${err.message}`, { step: 'write layer', cause: err, evidence: { ...err.evidence, file: this.path, position, bytes: data.length } }) : err;
      },
    );
    this.tail = this.tail.then(() => done).catch(() => undefined);
    return done;
  }

  /** Waits for the queued writes (ignoring their failures, which their callers got) and any writeback started. */
  async settle(): Promise<void> {
    await this.tail;
    await this.writeback;
  }

  /** fsync once every write is done. */
  async sync(): Promise<void> {
    await this.settle();
    await this.fh.sync();
  }
}

async function transferRange(client: RegistryClient, t: Transfer, o: { pool: SlabPool; retries: number; signal?: AbortSignal; onBytes: (n: number) => void }): Promise<void> {
  const digest = t.chunk.digest!;
  const step = `fetch ${t.chunk.path} [${t.chunk.offset + t.start}, ${t.chunk.offset + t.end}) (${digest})`;
  let pos = t.start;
  for (let attempt = 0; ; attempt++) {
    // Each segment is hashed (in order, in a worker) and written (positionally) while the next one arrives.
    const inFlight = new Set<Promise<void>>();
    let failed: { error: unknown } | undefined;
    let res: BlobRange | undefined;
    try {
      res = await client.openBlobRange(t.repository, digest, { start: pos, end: t.end, total: t.chunk.size }, o.pool, o.signal);
      const length = res.contentLength;
      if (length !== undefined && length !== t.end - pos) {
        res.destroy?.();
        throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry sends ${length} bytes where ${t.end - pos} are expected (the blob is ${t.chunk.size} bytes by its descriptor)`, {
          step,
          evidence: { url: res.url, status: res.status, contentLength: length, expected: t.end - pos, descriptorSize: t.chunk.size },
        });
      }
      for await (const segment of res.body) {
        const data = segment.data;
        if (failed !== undefined || pos + data.length > t.end) {
          segment.release();
          if (failed !== undefined) throw failed.error;
          res.destroy?.();
          throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry sent more than the ${t.chunk.size} bytes of the descriptor`, { step, evidence: { url: res.url } });
        }
        const work: Promise<void> = Promise.all([t.hash?.update(data), t.sink.write(data, t.chunk.offset + pos)]).then(
          () => undefined,
          (error: unknown) => void (failed ??= { error }),
        );
        const tracked = work.finally(() => {
          segment.release();
          inFlight.delete(tracked);
        });
        inFlight.add(tracked);
        pos += data.length;
        o.onBytes(data.length);
      }
      await Promise.all(inFlight);
      if (failed !== undefined) throw failed.error;
      if (pos < t.end) {
        throw new OciError(OciErrorCode.TRUNCATED, `${digest}: the registry ended the body after ${pos - t.start} of ${t.end - t.start} bytes`, {
          step,
          evidence: { url: res.url, received: pos, expectedEnd: t.end, descriptorSize: t.chunk.size },
        });
      }
      return;
    } catch (err) {
      // The bytes handed on before the break are hashed and written (or their write failed: that is the error).
      await Promise.all(inFlight);
      const cause = failed?.error ?? err;
      const e = res !== undefined && !(cause instanceof OciError) ? res.classify(cause) : cause;
      if (!isTransient(e) || attempt >= o.retries) throw e;
      // Resume right after the last byte received: the hash has seen every byte before it, in order.
      await sleep(RETRY_BASE_MS * 2 ** attempt, undefined, o.signal ? { signal: o.signal } : undefined).catch(() => undefined);
      if (o.signal?.aborted) throw e;
    }
  }
}

async function hashRange(fh: FileHandle, offset: number, size: number): Promise<string> {
  const hash = createHash('sha256');
  const buffer = Buffer.allocUnsafe(Math.min(READ_BUFFER_BYTES, Math.max(1, size)));
  for (let pos = 0; pos < size; ) {
    const { bytesRead } = await fh.read(buffer, 0, Math.min(buffer.length, size - pos), offset + pos);
    if (bytesRead === 0) break;
    hash.update(buffer.subarray(0, bytesRead));
    pos += bytesRead;
  }
  return `sha256:${hash.digest('hex')}`;
}

/**
 * The whole-file sha256 of a file pulled in several chunks: each chunk, once written, is fed to a worker that
 * reads it back from the file (the page cache) in file order; chunks that complete early wait for the ones
 * before them.
 */
class WholeFileHash {
  private next = 0;
  private readonly completed = new Map<number, number>();
  private fed: Promise<void> = Promise.resolve();

  constructor(
    private readonly hash: Sha256Stream,
    private readonly fd: number,
  ) {}

  /** Bytes [offset, offset + size) are written and verified. */
  chunkDone(offset: number, size: number): void {
    this.completed.set(offset, size);
    for (let size = this.completed.get(this.next); size !== undefined; size = this.completed.get(this.next)) {
      this.completed.delete(this.next);
      const fed = this.hash.updateFromFile(this.fd, this.next, size);
      this.fed = this.fed.then(() => fed);
      fed.catch(() => undefined); // awaited through this.fed in digest()
      this.next += size;
    }
  }

  /** `sha256:<hex>` once the chunks cover [0, size); an internal error when they do not. */
  async digest(size: number): Promise<string> {
    await this.fed;
    if (this.next !== size || this.completed.size > 0) throw new Error(`internal error: the chunks cover [0, ${this.next}) of ${size} bytes`);
    return this.hash.digest();
  }
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
  const concurrency = o.concurrency ?? DEFAULT_PULL_CONCURRENCY;
  const hashes = new HashPool(o.hashThreads !== undefined ? { threads: o.hashThreads } : {});
  const pageCache = bindPageCache();
  const writer = new WriteThread(WRITE_MAX_BYTES);
  /** The fsync (and re-read) of each file, started as soon as its transfers are done. */
  const synced = new Map<string, Promise<void>>();
  let bytesFetched = 0;
  let bytesFromCache = 0;
  // Weights layers the cache lacks: fetched into the pending directory (removed with it on any failure) and,
  // once every layer of the pull verified, renamed into the weights cache before the checkpoint is published.
  const weightsCache = r.weights.length > 0 ? await WeightsCache.open(o.store.root) : undefined;
  const weightsFiles = new Map<string, WeightsLayer>();
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
    const weightChunks: FileChunk[] = [];
    for (const w of r.weights) {
      if (await weightsCache!.has(w.sha256, w.size)) continue;
      const path = `${WEIGHTS_TMP_PREFIX}${w.sha256}`;
      const fh = await open(join(pending.dir, path), fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o600);
      handles.set(path, fh);
      await fh.truncate(w.size);
      toFetch.add(path);
      weightsFiles.set(path, w);
      weightChunks.push({ path, offset: 0, size: w.size, fileSize: w.size, digest: `sha256:${w.sha256}` });
    }
    const mismatch = (chunk: FileChunk, actual: string): OciError =>
      new OciError(OciErrorCode.DIGEST_MISMATCH, `${chunk.path} [${chunk.offset}, ${chunk.offset + chunk.size}): the registry sent bytes whose digest is ${actual}, not ${chunk.digest}`, {
        step: 'verify layer',
        evidence: { file: chunk.path, offset: chunk.offset, expected: chunk.digest, actual, url: client.url(`/v2/${r.reference.repository}/blobs/${chunk.digest}`).toString() },
      });
    // Transfers: one per chunk, or several Range requests for a chunk larger than rangeBytes.
    const transfers: Transfer[] = [];
    const reread: FileChunk[] = [];
    const seen = new Set<string>();
    const sinks = new Map([...handles].map(([path, fh]) => [path, new FileSink(path, fh, pageCache, writer)]));
    for (const chunk of [...r.chunks, ...weightChunks]) {
      if (!toFetch.has(chunk.path)) continue;
      const key = `${chunk.path}@${chunk.offset}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const sink = sinks.get(chunk.path)!;
      if (chunk.size <= rangeBytes) {
        transfers.push({ repository: r.reference.repository, chunk, start: 0, end: chunk.size, sink });
        continue;
      }
      reread.push(chunk);
      for (let start = 0; start < chunk.size; start += rangeBytes) {
        transfers.push({ repository: r.reference.repository, chunk, start, end: Math.min(chunk.size, start + rangeBytes), sink });
      }
    }
    // A file of several chunks, for the cache: its whole-file sha256, computed in a worker from the page cache as
    // its chunks complete in order (the transfers start in offset order), so that little is left at the end.
    const chunkCount = new Map<string, number>();
    for (const c of r.chunks) chunkCount.set(c.path, (chunkCount.get(c.path) ?? 0) + 1);
    const wholeFiles = new Map<string, WholeFileHash>();
    if (cache !== undefined) {
      for (const path of toFetch) if ((chunkCount.get(path) ?? 0) > 1) wholeFiles.set(path, new WholeFileHash(hashes.open(), handles.get(path)!.fd));
    }
    const rangesLeft = new Map<FileChunk, number>();
    for (const t of transfers) rangesLeft.set(t.chunk, (rangesLeft.get(t.chunk) ?? 0) + 1);
    // A file is fsynced as soon as its last transfer is done, while the others go on; its chunks re-read first.
    const transfersLeft = new Map<string, number>();
    for (const t of transfers) transfersLeft.set(t.chunk.path, (transfersLeft.get(t.chunk.path) ?? 0) + 1);
    const startSync = (path: string): void => {
      const sink = sinks.get(path)!;
      const p = (async () => {
        await sink.settle();
        for (const chunk of reread) {
          if (chunk.path !== path) continue;
          const actual = await hashRange(handles.get(path)!, chunk.offset, chunk.size);
          if (actual !== chunk.digest) throw mismatch(chunk, actual);
        }
        await sink.sync();
      })();
      p.catch(() => undefined);
      synced.set(path, p);
    };
    for (const path of toFetch) if (!transfersLeft.has(path)) startSync(path);
    const pool = new SlabPool({ slabBytes: SLAB_BYTES, slabs: concurrency * SLABS_PER_TRANSFER });
    // Largest first: the long transfers start early, the small ones fill in around them.
    transfers.sort((a, b) => b.end - b.start - (a.end - a.start));
    const t0 = performance.now();
    await forEachLimit(
      transfers,
      concurrency,
      async (t) => {
        if (!reread.includes(t.chunk)) t.hash = hashes.open();
        try {
          await transferRange(client, t, { pool, retries: o.retries ?? DEFAULT_TRANSFER_RETRIES, ...(signal ? { signal } : {}), onBytes: (n) => {
            bytesFetched += n;
            o.onProgress?.(bytesFetched);
          } });
        } catch (err) {
          t.hash?.abandon();
          throw err;
        }
        if (t.hash !== undefined) {
          const actual = await t.hash.digest();
          if (actual !== t.chunk.digest) throw mismatch(t.chunk, actual);
        }
        const ranges = rangesLeft.get(t.chunk)! - 1;
        rangesLeft.set(t.chunk, ranges);
        if (ranges === 0) wholeFiles.get(t.chunk.path)?.chunkDone(t.chunk.offset, t.chunk.size);
        const left = transfersLeft.get(t.chunk.path)! - 1;
        transfersLeft.set(t.chunk.path, left);
        if (left === 0) startSync(t.chunk.path);
      },
      { step: 'fetch layers', ...(signal ? { signal } : {}), aborted: storeAborted('fetch layers') },
    );
    const t1 = performance.now();
    for (const p of synced.values()) await p;
    const tSynced = performance.now();
    // A file of several chunks: its own sha256 is checked before the cache may hand it out under that name.
    const files = new Map(r.manifest.files.map((f) => [f.path, f]));
    for (const path of toFetch) {
      if (weightsFiles.has(path)) continue;
      const file = files.get(path)!;
      if (cache === undefined) continue;
      const whole = wholeFiles.get(path);
      if (whole !== undefined) {
        const actual = await whole.digest(file.size);
        if (actual !== `sha256:${file.sha256}`) {
          throw new OciError(OciErrorCode.DIGEST_MISMATCH, `${path}: its layers verify, but the whole file's sha256 is ${actual}, not the manifest's ${file.sha256}`, {
            step: 'verify file',
            evidence: { file: path, expected: file.sha256, actual },
          });
        }
      }
      await cache.add(file.sha256, join(pending.dir, path));
    }
    // The threads first: no write or read of theirs may reach a descriptor number reused after the closes.
    await hashes.close();
    await writer.close();
    for (const fh of handles.values()) await fh.close();
    handles.clear();
    let weightsBytes = 0;
    for (const [path, w] of weightsFiles) {
      await weightsCache!.add(w.sha256, join(pending.dir, path));
      weightsBytes += w.size;
    }
    const t2 = performance.now();
    let checkpoint: OpenedCheckpoint;
    try {
      checkpoint = await pending.publishVerified(r.manifest, { provenance: r.provenance, ...(signal ? { signal } : {}) });
    } catch (err) {
      // Another pull of the same digest won the race: its checkpoint is the same bytes.
      if (!isThawError(err, StoreErrorCode.EXISTS)) throw err;
      await pending.abort();
      checkpoint = await o.store.open(r.name);
    }
    const ms = performance.now() - started;
    // syncMs: the fsyncs still running after the last transfer (they start as each file completes).
    const phases = { transferMs: Math.round(t1 - t0), verifyMs: Math.round(t2 - tSynced), syncMs: Math.round(tSynced - t1), publishMs: Math.round(performance.now() - t2) };
    logger.info('checkpoint pulled', { name: r.name, bytesFetched, bytesFromCache, weightsBytes, ms: Math.round(ms), phases });
    return { checkpoint, digest: r.digest, alreadyPresent: false, bytesFetched, bytesFromCache, weightsBytes, ms, phases };
  } catch (err) {
    await hashes.close();
    await writer.close();
    await Promise.allSettled(synced.values());
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
