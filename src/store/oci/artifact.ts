/**
 * A thaw checkpoint as an OCI artifact. Pure: builds the image manifest thaw pushes and checks the one it
 * pulls.
 *
 *   manifest   mediaType application/vnd.oci.image.manifest.v1+json, artifactType CHECKPOINT_ARTIFACT_TYPE
 *   config     the checkpoint's manifest.json (mediaType CHECKPOINT_CONFIG_MEDIA_TYPE)
 *   layers     the checkpoint's files as raw bytes (CHECKPOINT_LAYER_MEDIA_TYPE): one layer per file, or one per
 *              fixed-size chunk of a file larger than the chunk size; each annotated with the file's path, the
 *              chunk's offset and the file's size, so that a puller writes every layer at its place and can
 *              fetch them in parallel.
 *
 * A single-layer file's layer digest is the file's sha256 (the checkpoint manifest's), so identical files
 * are one blob in the registry and one entry in the local cache.
 *
 * Weights layers (optional, `thaw push --with-weights`): one layer per distinct weights source file of the
 * checkpoint manifest's `weights` section (WEIGHTS_LAYER_MEDIA_TYPE), whose digest is the file's sha256 as the
 * manifest records it, annotated with that sha256 and the source's path as the worker saw it. They carry the
 * weights to nodes that do not have them; a puller stores them in its weights cache (weights-cache.ts), not in
 * the checkpoint. Without the option a checkpoint's artifact has none: the manifest names the sources by digest.
 *
 * Every layer also carries the OCI file-name annotation (`org.opencontainers.image.title`) that generic tools
 * (oras pull) write a layer to: a whole file's title is its path, so `oras pull` gives the checkpoint's files
 * as they are; a chunk's title is its path plus `.thaw-chunk-` and its offset in 16 decimal digits, so the
 * chunks of a file concatenated in name order are the file. thaw itself reads only its own annotations.
 */
import { checkRelativePath, MANIFEST_FILE_NAME, type Manifest, type ManifestFile } from '../manifest.js';
import { OciError, OciErrorCode } from './errors.js';

export const OCI_MANIFEST_MEDIA_TYPE = 'application/vnd.oci.image.manifest.v1+json';
export const CHECKPOINT_ARTIFACT_TYPE = 'application/vnd.thaw.checkpoint.v1';
export const CHECKPOINT_CONFIG_MEDIA_TYPE = 'application/vnd.thaw.checkpoint.config.v1+json';
export const CHECKPOINT_LAYER_MEDIA_TYPE = 'application/vnd.thaw.checkpoint.file.v1';
export const WEIGHTS_LAYER_MEDIA_TYPE = 'application/vnd.thaw.weights.v1';
export const ANNOTATION_WEIGHTS_SHA256 = 'dev.thaw.weights.sha256';
export const ANNOTATION_WEIGHTS_PATH = 'dev.thaw.weights.path';
export const ANNOTATION_PATH = 'dev.thaw.file.path';
export const ANNOTATION_OFFSET = 'dev.thaw.file.offset';
export const ANNOTATION_FILE_SIZE = 'dev.thaw.file.size';
/** The OCI image-spec's file-name annotation of a layer (what oras pull names the file it writes). */
export const ANNOTATION_OCI_TITLE = 'org.opencontainers.image.title';
/** Files larger than this travel as chunks of this size (parallel transfers, resumable units). */
export const DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024;
/** A manifest larger than this is refused before it is parsed. */
export const MANIFEST_MAX_BYTES = 4 * 1024 * 1024;

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export interface ImageManifest {
  schemaVersion: 2;
  mediaType: typeof OCI_MANIFEST_MEDIA_TYPE;
  artifactType: string;
  config: Descriptor;
  layers: Descriptor[];
  annotations?: Record<string, string>;
}

/** One layer as the puller and pusher see it: a byte range of one checkpoint file. */
export interface FileChunk {
  path: string;
  offset: number;
  size: number;
  fileSize: number;
  /** `sha256:<hex>`; for a whole file, the file's sha256. Unknown (undefined) for a chunk until the pusher hashed it. */
  digest?: string;
}

/** A weights source file as a layer: the whole file, named by its sha256 (hex). */
export interface WeightsLayer {
  sha256: string;
  size: number;
  /** The source's path as the worker saw it (the first allocation that names this content). */
  path: string;
}

const SHA256_HEX = /^[0-9a-f]{64}$/;

/**
 * The distinct file sources of a checkpoint manifest's weights section (by sha256), read loosely: the store
 * checks the section's shape only, the restore engine every field; an entry without a string path, a sha256
 * and a safe size is skipped here (the restore refuses such a manifest anyway). Pure.
 */
export function weightsSourcesOf(manifest: Pick<Manifest, 'weights'>): WeightsLayer[] {
  const out = new Map<string, WeightsLayer>();
  for (const region of manifest.weights?.regions ?? []) {
    const allocations = (region as { allocations?: unknown } | null)?.allocations;
    if (!Array.isArray(allocations)) continue;
    for (const a of allocations as Array<{ kind?: unknown; source?: { path?: unknown; sha256?: unknown; fileSize?: unknown } } | null>) {
      const src = a?.source;
      if (a?.kind !== 'file' || src === undefined || src === null) continue;
      if (typeof src.path !== 'string' || typeof src.sha256 !== 'string' || !SHA256_HEX.test(src.sha256) || !Number.isSafeInteger(src.fileSize) || (src.fileSize as number) < 0) continue;
      if (!out.has(src.sha256)) out.set(src.sha256, { sha256: src.sha256, size: src.fileSize as number, path: src.path });
    }
  }
  return [...out.values()];
}

/** Splits every file into chunks of at most `chunkBytes` (a file of at most that size is one chunk). Pure. */
export function planChunks(files: readonly ManifestFile[], chunkBytes: number = DEFAULT_CHUNK_BYTES): FileChunk[] {
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes < 1) throw new RangeError(`chunkBytes must be a positive integer (got ${chunkBytes})`);
  const out: FileChunk[] = [];
  for (const f of files) {
    if (f.size <= chunkBytes) {
      out.push({ path: f.path, offset: 0, size: f.size, fileSize: f.size, digest: `sha256:${f.sha256}` });
      continue;
    }
    for (let offset = 0; offset < f.size; offset += chunkBytes) {
      out.push({ path: f.path, offset, size: Math.min(chunkBytes, f.size - offset), fileSize: f.size });
    }
  }
  return out;
}

/** The OCI title of a chunk (see the module comment): the file's path for a whole file. Pure. */
export function chunkTitle(c: Pick<FileChunk, 'path' | 'offset' | 'size' | 'fileSize'>): string {
  return c.offset === 0 && c.size === c.fileSize ? c.path : `${c.path}.thaw-chunk-${String(c.offset).padStart(16, '0')}`;
}

/** The image manifest of a checkpoint whose config blob and every chunk's digest are known. Pure. */
export function buildImageManifest(config: { digest: string; size: number }, chunks: readonly FileChunk[], annotations: Record<string, string> = {}, weights: readonly WeightsLayer[] = []): ImageManifest {
  return {
    schemaVersion: 2,
    mediaType: OCI_MANIFEST_MEDIA_TYPE,
    artifactType: CHECKPOINT_ARTIFACT_TYPE,
    config: { mediaType: CHECKPOINT_CONFIG_MEDIA_TYPE, digest: config.digest, size: config.size },
    layers: chunks.map((c): Descriptor => {
      if (c.digest === undefined) throw new RangeError(`chunk ${c.path}@${c.offset} has no digest yet`);
      return {
        mediaType: CHECKPOINT_LAYER_MEDIA_TYPE,
        digest: c.digest,
        size: c.size,
        annotations: {
          [ANNOTATION_PATH]: c.path, [ANNOTATION_OFFSET]: String(c.offset), [ANNOTATION_FILE_SIZE]: String(c.fileSize),
          [ANNOTATION_OCI_TITLE]: chunkTitle(c),
        },
      };
    }).concat(weights.map((w): Descriptor => ({
      mediaType: WEIGHTS_LAYER_MEDIA_TYPE,
      digest: `sha256:${w.sha256}`,
      size: w.size,
      annotations: { [ANNOTATION_WEIGHTS_SHA256]: w.sha256, [ANNOTATION_WEIGHTS_PATH]: w.path, [ANNOTATION_OCI_TITLE]: `weights/sha256/${w.sha256}` },
    }))),
    ...(Object.keys(annotations).length > 0 ? { annotations } : {}),
  };
}

const DIGEST = /^sha256:[0-9a-f]{64}$/;
const STEP = 'check checkpoint artifact';

function invalid(message: string, evidence: Record<string, unknown> = {}): OciError {
  return new OciError(OciErrorCode.MANIFEST_INVALID, message, { step: STEP, evidence });
}

function descriptor(v: unknown, at: string): Descriptor {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid(`${at} must be an object`);
  const o = v as Record<string, unknown>;
  if (typeof o['mediaType'] !== 'string') throw invalid(`${at}.mediaType must be a string`);
  if (typeof o['digest'] !== 'string' || !DIGEST.test(o['digest'])) throw invalid(`${at}.digest must be "sha256:" and 64 lower-case hex digits (got ${JSON.stringify(o['digest'])})`);
  if (typeof o['size'] !== 'number' || !Number.isSafeInteger(o['size']) || o['size'] < 0) throw invalid(`${at}.size must be a non-negative integer`);
  const d: Descriptor = { mediaType: o['mediaType'], digest: o['digest'], size: o['size'] };
  if (o['annotations'] !== undefined) {
    const a = o['annotations'];
    if (typeof a !== 'object' || a === null || Array.isArray(a)) throw invalid(`${at}.annotations must be an object`);
    d.annotations = {};
    for (const [k, val] of Object.entries(a)) {
      if (typeof val !== 'string') throw invalid(`${at}.annotations[${JSON.stringify(k)}] must be a string`);
      d.annotations[k] = val;
    }
  }
  return d;
}

/**
 * Parses an image manifest and refuses anything that is not a thaw checkpoint (OCI_FOREIGN_ARTIFACT: another
 * media type, artifactType or config type) or is malformed (OCI_MANIFEST_INVALID). Pure.
 */
export function parseImageManifest(body: string, context: { url?: string } = {}): ImageManifest {
  let v: unknown;
  try {
    v = JSON.parse(body);
  } catch (err) {
    throw invalid(`the manifest is not JSON: ${(err as Error).message}`, context);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid('the manifest must be a JSON object', context);
  const o = v as Record<string, unknown>;
  const foreign = (what: string, got: unknown): OciError =>
    new OciError(OciErrorCode.FOREIGN_ARTIFACT, `not a thaw checkpoint: ${what} is ${JSON.stringify(got) ?? 'missing'}`, {
      step: STEP,
      evidence: { ...context, [what]: got, expected: { mediaType: OCI_MANIFEST_MEDIA_TYPE, artifactType: CHECKPOINT_ARTIFACT_TYPE, config: CHECKPOINT_CONFIG_MEDIA_TYPE } },
    });
  if (o['schemaVersion'] !== 2) throw invalid(`manifest.schemaVersion must be 2 (got ${JSON.stringify(o['schemaVersion'])})`, context);
  if (o['mediaType'] !== OCI_MANIFEST_MEDIA_TYPE) throw foreign('mediaType', o['mediaType']);
  if (o['artifactType'] !== CHECKPOINT_ARTIFACT_TYPE) throw foreign('artifactType', o['artifactType']);
  const config = descriptor(o['config'], 'manifest.config');
  if (config.mediaType !== CHECKPOINT_CONFIG_MEDIA_TYPE) throw foreign('config.mediaType', config.mediaType);
  if (!Array.isArray(o['layers'])) throw invalid('manifest.layers must be an array', context);
  const layers = o['layers'].map((l, i) => {
    const d = descriptor(l, `manifest.layers[${i}]`);
    if (d.mediaType !== CHECKPOINT_LAYER_MEDIA_TYPE && d.mediaType !== WEIGHTS_LAYER_MEDIA_TYPE) throw foreign(`layers[${i}].mediaType`, d.mediaType);
    return d;
  });
  return { schemaVersion: 2, mediaType: OCI_MANIFEST_MEDIA_TYPE, artifactType: CHECKPOINT_ARTIFACT_TYPE, config, layers };
}

function intAnnotation(d: Descriptor, key: string, at: string): number {
  const text = d.annotations?.[key];
  if (text === undefined || !/^(0|[1-9][0-9]{0,15})$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw invalid(`${at}.annotations[${JSON.stringify(key)}] must be a decimal byte count (got ${JSON.stringify(text)})`);
  }
  return Number(text);
}

/**
 * Maps the layers onto the checkpoint manifest's files: every layer names a file the manifest lists (a path that
 * stays inside the checkpoint), the chunks of each file tile it exactly from 0 to its size, and a file in one
 * layer has the file's sha256 as the layer digest. Returns the chunks in layer order. Pure.
 */
export function chunksOf(image: ImageManifest, manifest: Manifest): FileChunk[] {
  const files = new Map(manifest.files.map((f) => [f.path, f]));
  const byFile = new Map<string, FileChunk[]>();
  const chunks = image.layers.flatMap((d, i) => {
    if (d.mediaType === WEIGHTS_LAYER_MEDIA_TYPE) return []; // weightsLayersOf
    const at = `manifest.layers[${i}]`;
    const path = d.annotations?.[ANNOTATION_PATH];
    if (path === undefined) throw invalid(`${at} has no ${ANNOTATION_PATH} annotation`);
    const bad = checkRelativePath(path);
    if (bad !== undefined || path === MANIFEST_FILE_NAME) throw invalid(`${at} path ${JSON.stringify(path)} ${bad ?? 'is the manifest itself'}`, { path });
    const file = files.get(path);
    if (file === undefined) throw invalid(`${at} path ${JSON.stringify(path)} is not a file of the checkpoint`, { path });
    const chunk: FileChunk = { path, offset: intAnnotation(d, ANNOTATION_OFFSET, at), size: d.size, fileSize: intAnnotation(d, ANNOTATION_FILE_SIZE, at), digest: d.digest };
    if (chunk.fileSize !== file.size) throw invalid(`${at} says ${path} is ${chunk.fileSize} bytes; the checkpoint manifest says ${file.size}`);
    const list = byFile.get(path) ?? [];
    list.push(chunk);
    byFile.set(path, list);
    return [chunk];
  });
  for (const file of manifest.files) {
    const list = (byFile.get(file.path) ?? []).slice().sort((a, b) => a.offset - b.offset);
    let next = 0;
    for (const c of list) {
      if (c.offset !== next) throw invalid(`the layers of ${file.path} ${c.offset < next ? 'overlap' : 'leave a gap'} at byte ${Math.min(c.offset, next)}`, { path: file.path });
      next += c.size;
    }
    if (next !== file.size) throw invalid(`the layers of ${file.path} cover ${next} of its ${file.size} bytes`, { path: file.path });
    if (list.length === 1 && list[0]!.digest !== `sha256:${file.sha256}`) {
      throw invalid(`the one layer of ${file.path} is ${list[0]!.digest}, but the file's sha256 is ${file.sha256}`, { path: file.path });
    }
  }
  return chunks;
}

/**
 * The weights layers of an artifact, checked against the checkpoint manifest: each names (annotation and
 * digest alike) the sha256 of one of the manifest's weights sources and has that source's size; no content
 * twice. A layer for content the manifest does not name is refused: a puller stores only what the checkpoint
 * needs. Pure.
 */
export function weightsLayersOf(image: ImageManifest, manifest: Pick<Manifest, 'weights'>): WeightsLayer[] {
  const sources = new Map(weightsSourcesOf(manifest).map((w) => [w.sha256, w]));
  const seen = new Set<string>();
  const out: WeightsLayer[] = [];
  image.layers.forEach((d, i) => {
    if (d.mediaType !== WEIGHTS_LAYER_MEDIA_TYPE) return;
    const at = `manifest.layers[${i}]`;
    const sha = d.annotations?.[ANNOTATION_WEIGHTS_SHA256];
    if (sha === undefined || !SHA256_HEX.test(sha) || d.digest !== `sha256:${sha}`) {
      throw invalid(`${at}: a weights layer's ${ANNOTATION_WEIGHTS_SHA256} annotation must be its digest's hex (got ${JSON.stringify(sha)}, digest ${d.digest})`);
    }
    const source = sources.get(sha);
    if (source === undefined) throw invalid(`${at}: weights layer ${sha} is no source of the checkpoint's weights`, { sha256: sha });
    if (source.size !== d.size) throw invalid(`${at}: weights layer ${sha} is ${d.size} bytes; the checkpoint's source is ${source.size}`, { sha256: sha });
    if (seen.has(sha)) throw invalid(`${at}: weights layer ${sha} appears twice`, { sha256: sha });
    seen.add(sha);
    out.push(source);
  });
  return out;
}
