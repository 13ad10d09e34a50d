/**
 * Push of a local checkpoint to a registry as an OCI artifact (artifact.ts): the checkpoint is verified
 * first (a corrupt checkpoint is never published), chunks of large files are hashed, every blob the registry
 * already has (HEAD) is skipped, the rest are uploaded in parallel (monolithic PUT for small blobs, chunked
 * PATCH with Content-Range for large ones, resumed from the offset the registry reports after a broken
 * PATCH), and the manifest is PUT last: a reader never sees a manifest whose blobs are missing.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage, isThawError } from '../../errors.js';
import { silentLogger, type Logger } from '../../log.js';
import { forEachLimit } from '../../sys/concurrency.js';
import { openRegularNoFollow } from '../digest.js';
import { storeAborted } from '../errors.js';
import type { LocalStore } from '../local-store.js';
import { buildImageManifest, DEFAULT_CHUNK_BYTES, OCI_MANIFEST_MEDIA_TYPE, planChunks, type FileChunk } from './artifact.js';
import { RegistryClient, sha256Digest } from './client.js';
import { isTransient, OciError, OciErrorCode } from './errors.js';
import { DEFAULT_TRANSFER_RETRIES, type RegistryAccess } from './pull.js';
import { formatReference, parseReference } from './reference.js';
import { locateWeightsFiles } from './weights-files.js';
import { pushCosignSignature, type SignResult, type SigningKey } from './sign.js';

export const DEFAULT_PUSH_CONCURRENCY = 4;
/** Blobs up to this size go in one PUT; larger ones as PATCH chunks of uploadChunkBytes. */
export const DEFAULT_MONOLITHIC_MAX_BYTES = 16 * 1024 * 1024;
export const DEFAULT_UPLOAD_CHUNK_BYTES = 16 * 1024 * 1024;
const READ_BYTES = 1024 * 1024;
const RETRY_BASE_MS = 200;

export interface PushOptions {
  store: LocalStore;
  /** The local checkpoint to push. */
  name: string;
  /** `registry/repo:tag`. */
  reference: string;
  access?: RegistryAccess;
  client?: RegistryClient;
  /** Files larger than this become several layers (default DEFAULT_CHUNK_BYTES). */
  chunkBytes?: number;
  monolithicMaxBytes?: number;
  uploadChunkBytes?: number;
  concurrency?: number;
  retries?: number;
  /**
   * Weights layers (artifact.ts WEIGHTS_LAYER_MEDIA_TYPE): each weights source of the checkpoint as a layer of
   * its own, streamed from the host file `locateWeightsFiles` found. Absent: none; the manifest alone names them.
   */
  withWeights?: { dirs: readonly string[] };
  /** Sign the pushed manifest with this key (cosign's tag scheme, sign.ts), before the tag is written. */
  sign?: SigningKey;
  signal?: AbortSignal;
  logger?: Logger;
}

export interface PushResult {
  /** The reference pinned to the pushed manifest: `registry/repo:tag@sha256:...`. */
  reference: string;
  digest: string;
  bytesUploaded: number;
  /** Bytes of blobs the registry already had. */
  bytesSkipped: number;
  /** Chunked uploads that went on from the offset the registry reported after a broken PATCH. */
  resumedUploads: number;
  /** Chunked uploads that started over because the registry dropped the session of a broken PATCH. */
  restartedUploads: number;
  /** The signature written (PushOptions.sign). */
  signature?: SignResult;
  ms: number;
  /** Weights layers in the pushed manifest (with `withWeights`), and their bytes. */
  weightsLayers: number;
  weightsBytes: number;
}

/** Bytes [start, end) of a file, or of a buffer, as a fresh stream. */
function rangeStream(source: string | Buffer, start: number, end: number): Readable {
  if (Buffer.isBuffer(source)) return Readable.from([source.subarray(start, end)]);
  return end > start ? createReadStream(source, { start, end: end - 1, highWaterMark: READ_BYTES }) : Readable.from([]);
}

async function hashFileRange(path: string, start: number, size: number, step: string): Promise<string> {
  const fh = await openRegularNoFollow(path, step);
  try {
    const hash = createHash('sha256');
    const buffer = Buffer.allocUnsafe(4 * READ_BYTES);
    for (let pos = 0; pos < size; ) {
      const { bytesRead } = await fh.read(buffer, 0, Math.min(buffer.length, size - pos), start + pos);
      if (bytesRead === 0) throw new OciError(OciErrorCode.IO, `${path} ended at ${start + pos} (expected ${start + size})`, { step });
      hash.update(buffer.subarray(0, bytesRead));
      pos += bytesRead;
    }
    return `sha256:${hash.digest('hex')}`;
  } finally {
    await fh.close();
  }
}

interface Blob {
  digest: string;
  size: number;
  /** A file and the blob's offset in it, or the blob's bytes. */
  source: string | Buffer;
  offset: number;
}

export async function pushCheckpoint(o: PushOptions): Promise<PushResult> {
  const started = performance.now();
  const reference = parseReference(o.reference);
  if (reference.digest !== undefined) {
    throw new OciError(OciErrorCode.INVALID_REFERENCE, `push to a tag, not a digest (${o.reference}): the digest is known once the manifest is written`, { step: 'push checkpoint' });
  }
  const logger = (o.logger ?? silentLogger).child({ component: 'oci-push', reference: formatReference(reference) });
  const client = o.client ?? new RegistryClient({ ...(o.access ?? {}), registry: reference.registry, ...(o.logger ? { logger: o.logger } : {}) });
  const signal = o.signal;
  const repository = reference.repository;
  const retries = o.retries ?? DEFAULT_TRANSFER_RETRIES;
  try {
    await o.store.verify(o.name, signal ? { signal } : {});
    const opened = await o.store.open(o.name);
    const step = `push checkpoint ${o.name}`;
    const chunks = planChunks(opened.manifest.files, o.chunkBytes ?? DEFAULT_CHUNK_BYTES);
    await forEachLimit(
      chunks.filter((c) => c.digest === undefined),
      2,
      async (c: FileChunk) => {
        c.digest = await hashFileRange(join(opened.paths.dir, c.path), c.offset, c.size, step);
      },
      { step, ...(signal ? { signal } : {}), aborted: storeAborted(step) },
    );
    const weights = o.withWeights === undefined ? [] : await locateWeightsFiles(opened.manifest, { storeRoot: o.store.root, dirs: o.withWeights.dirs, ...(signal ? { signal } : {}) });
    const config = await readFile(opened.paths.manifest);
    const configDigest = sha256Digest(config);
    const blobs = new Map<string, Blob>();
    blobs.set(configDigest, { digest: configDigest, size: config.length, source: config, offset: 0 });
    for (const c of chunks) {
      if (!blobs.has(c.digest!)) blobs.set(c.digest!, { digest: c.digest!, size: c.size, source: join(opened.paths.dir, c.path), offset: c.offset });
    }
    // Weights: streamed from their host files (createReadStream); the registry checks each digest at the upload's end.
    for (const w of weights) {
      const digest = `sha256:${w.sha256}`;
      if (!blobs.has(digest)) blobs.set(digest, { digest, size: w.size, source: w.file, offset: 0 });
    }
    let bytesUploaded = 0;
    let bytesSkipped = 0;
    let resumedUploads = 0;
    let restartedUploads = 0;
    const monolithicMax = o.monolithicMaxBytes ?? DEFAULT_MONOLITHIC_MAX_BYTES;
    const uploadChunk = o.uploadChunkBytes ?? DEFAULT_UPLOAD_CHUNK_BYTES;
    const backoff = (attempt: number): Promise<void> => sleep(RETRY_BASE_MS * 2 ** attempt, undefined, signal ? { signal } : undefined).then(() => undefined, () => undefined);
    const upload = async (blob: Blob): Promise<void> => {
      const have = await client.headBlob(repository, blob.digest, signal);
      if (have === blob.size) {
        bytesSkipped += blob.size;
        return;
      }
      if (blob.size <= monolithicMax) {
        for (let attempt = 0; ; attempt++) {
          try {
            const session = await client.startUpload(repository, signal);
            await client.putBlob(repository, session, blob.digest, blob.size, () => rangeStream(blob.source, blob.offset, blob.offset + blob.size), signal);
            bytesUploaded += blob.size;
            return;
          } catch (err) {
            if (!isTransient(err) || attempt >= retries) throw err;
            await backoff(attempt);
          }
        }
      }
      let session = await client.startUpload(repository, signal);
      let offset = 0;
      for (let attempt = 0; offset < blob.size; ) {
        const n = Math.min(uploadChunk, blob.size - offset);
        const from = blob.offset + offset;
        const slice = (): Readable => rangeStream(blob.source, from, from + n);
        try {
          session = await client.patchBlob(repository, session, offset, n, slice, signal);
          offset += n;
          bytesUploaded += n;
        } catch (err) {
          if (!isTransient(err) || attempt >= retries) throw err;
          await backoff(attempt++);
          // Where the registry stands: resume from its offset (it may hold part of the broken PATCH). A registry
          // may also drop a session whose PATCH broke (distribution 2.8 cancels an upload whose stored size no
          // longer matches its state): then the blob starts over in a new session.
          let status: { offset: number; session: URL };
          try {
            status = await client.uploadStatus(repository, session, offset, signal);
          } catch (statusErr) {
            if (!isThawError(statusErr, OciErrorCode.NOT_FOUND) && !isThawError(statusErr, OciErrorCode.PROTOCOL)) throw statusErr;
            logger.info('upload session lost; the blob starts over', { digest: blob.digest, sent: offset + n, error: errorMessage(statusErr) });
            restartedUploads++;
            bytesUploaded -= offset;
            offset = 0;
            session = await client.startUpload(repository, signal);
            continue;
          }
          logger.info('chunked upload resumes', { digest: blob.digest, offset: status.offset, sent: offset + n });
          resumedUploads++;
          bytesUploaded -= offset - Math.min(offset, status.offset);
          offset = status.offset;
          session = status.session;
        }
      }
      await client.finishUpload(repository, session, blob.digest, signal);
    };
    // Largest first; the manifest goes last, after every blob is in.
    await forEachLimit([...blobs.values()].sort((a, b) => b.size - a.size), o.concurrency ?? DEFAULT_PUSH_CONCURRENCY, upload, { step, ...(signal ? { signal } : {}), aborted: storeAborted(step) });
    const image = buildImageManifest({ digest: configDigest, size: config.length }, chunks, { 'org.opencontainers.image.created': opened.manifest.createdAt }, weights);
    const body = Buffer.from(JSON.stringify(image));
    // The signature names the digest only, known now: written first, so a reader of the tag never finds the
    // checkpoint without it (a failed signature leaves no tag).
    const signature = o.sign !== undefined ? await pushCosignSignature(client, { registry: reference.registry, repository, digest: sha256Digest(body) }, o.sign, signal) : undefined;
    const digest = await client.putManifest(repository, reference.tag ?? 'latest', body, OCI_MANIFEST_MEDIA_TYPE, signal);
    const ms = performance.now() - started;
    const pinned = formatReference({ ...reference, digest });
    const weightsBytes = weights.reduce((a, w) => a + w.size, 0);
    logger.info('checkpoint pushed', { name: o.name, digest, bytesUploaded, bytesSkipped, weightsLayers: weights.length, weightsBytes, ms: Math.round(ms), ...(signature ? { signatureTag: signature.tag, signedBy: o.sign!.source } : {}) });
    return { reference: pinned, digest, bytesUploaded, bytesSkipped, resumedUploads, restartedUploads, ms, weightsLayers: weights.length, weightsBytes, ...(signature ? { signature } : {}) };
  } finally {
    if (o.client === undefined) client.close();
  }
}
