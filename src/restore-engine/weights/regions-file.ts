/**
 * The worker's weights file (`<control dir>/weights-regions.json`, written by sdk/python/thaw_cuda.py
 * `write_weights_file`): which GPU virtual address ranges hold model weights and where every allocation's
 * bytes come from. It is written by the pod, so it is hostile input: read with a size cap, without following
 * a link, and every field checked before anything uses it (a region that overlaps another, an offset past
 * its region, a path that is not absolute and normal, a digest that is not sha256 hex: the whole file is
 * refused, never a part of it used).
 *
 * Contract with the SDK (schema `thaw.dev/weights-regions/v1`):
 *   { schema, regions: [{ name, device, va: "0x…" (hex: JSON numbers stop at 2^53), size, granularity,
 *     allocations: [{ offset, size, kind: "file"|"raw", source?: { path, fileOffset, length, fileSize,
 *     sha256 } }] }] }
 * A "file" allocation holds `length` bytes of `path` from `fileOffset` at its start (the rest zero); a "raw"
 * one holds bytes made at load that stay in the GPU's checkpointed state.
 */
import { open } from 'node:fs/promises';
import { constants } from 'node:fs';
import { posix } from 'node:path';

import { WeightsError, WeightsErrorCode } from './errors.js';

export const WEIGHTS_FILE = 'weights-regions.json';
export const WEIGHTS_SCHEMA = 'thaw.dev/weights-regions/v1';
/** The SDK refuses to write more (WEIGHTS_FILE_MAX_BYTES there); thaw refuses to read more. */
export const WEIGHTS_FILE_MAX_BYTES = 1 << 20;
export const WEIGHTS_MAX_REGIONS = 64;
/** Allocations over all regions (WEIGHTS_MAX_ALLOCATIONS in the SDK): also the most fds thaw hands over. */
export const WEIGHTS_MAX_ALLOCATIONS = 4096;
const MAX_PATH = 4096;
/** User-space VAs on x86-64 and aarch64 (48-bit, or 52-bit with LVA) stay below 2^57; CUDA's are below 2^48. */
const VA_LIMIT = 1n << 57n;

export interface WeightsSource {
  /** Absolute, normal path as the worker sees it (inside its container's rootfs). */
  path: string;
  fileOffset: number;
  length: number;
  fileSize: number;
  sha256: string;
}

export interface WeightsAllocation {
  /** Bytes from the region's VA. */
  offset: number;
  size: number;
  kind: 'file' | 'raw';
  source?: WeightsSource;
}

export interface WeightsRegionSpec {
  name: string;
  device: number;
  va: bigint;
  size: number;
  granularity: number;
  allocations: WeightsAllocation[];
}

function invalid(message: string, evidence: Record<string, unknown> = {}): WeightsError {
  return new WeightsError(WeightsErrorCode.FILE_INVALID, message, { step: 'read the worker weights file', evidence });
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function onlyKeys(v: Record<string, unknown>, allowed: readonly string[], where: string): void {
  for (const k of Object.keys(v)) if (!allowed.includes(k)) throw invalid(`${where} has an unknown field ${JSON.stringify(k).slice(0, 80)}`);
}

function count(v: unknown, where: string, min = 0): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw invalid(`${where} is not an integer >= ${min}`);
  return v;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

function parseSource(v: unknown, where: string, allocSize: number): WeightsSource {
  if (!isObject(v)) throw invalid(`${where}.source is not an object`);
  onlyKeys(v, ['path', 'fileOffset', 'length', 'fileSize', 'sha256'], `${where}.source`);
  const path = v.path;
  if (
    typeof path !== 'string' ||
    path.length === 0 ||
    path.length > MAX_PATH ||
    path.includes('\0') ||
    !path.startsWith('/') ||
    posix.normalize(path) !== path ||
    path.endsWith('/')
  ) {
    throw invalid(`${where}.source.path is not an absolute, normal file path`);
  }
  const fileOffset = count(v.fileOffset, `${where}.source.fileOffset`);
  const length = count(v.length, `${where}.source.length`, 1);
  const fileSize = count(v.fileSize, `${where}.source.fileSize`, 1);
  if (length > allocSize) throw invalid(`${where}.source.length exceeds its allocation`);
  if (fileOffset + length > fileSize) throw invalid(`${where}.source range ends past fileSize`);
  const sha256 = v.sha256;
  if (typeof sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(sha256)) throw invalid(`${where}.source.sha256 is not sha256 hex`);
  return { path, fileOffset, length, fileSize, sha256 };
}

/** Validates the parsed JSON of a weights file; throws WEIGHTS_FILE_INVALID on the first fault. */
export function parseWeightsRegions(doc: unknown): WeightsRegionSpec[] {
  if (!isObject(doc)) throw invalid('not a JSON object');
  onlyKeys(doc, ['schema', 'regions'], 'the file');
  if (doc.schema !== WEIGHTS_SCHEMA) throw invalid('unknown schema', { schema: String(doc.schema).slice(0, 80) });
  if (!Array.isArray(doc.regions) || doc.regions.length > WEIGHTS_MAX_REGIONS) throw invalid(`regions is not a list of at most ${WEIGHTS_MAX_REGIONS}`);
  const names = new Set<string>();
  const regions: WeightsRegionSpec[] = [];
  let allocations = 0;
  doc.regions.forEach((r: unknown, i: number) => {
    const where = `regions[${i}]`;
    if (!isObject(r)) throw invalid(`${where} is not an object`);
    onlyKeys(r, ['name', 'device', 'va', 'size', 'granularity', 'allocations'], where);
    if (typeof r.name !== 'string' || !/^[A-Za-z0-9._-]{1,64}$/.test(r.name) || names.has(r.name)) throw invalid(`${where}.name is not a unique short name`);
    names.add(r.name);
    const device = count(r.device, `${where}.device`);
    if (device > 63) throw invalid(`${where}.device is out of range`);
    const granularity = count(r.granularity, `${where}.granularity`, 4096);
    if (!isPowerOfTwo(granularity) || granularity > 1 << 30) throw invalid(`${where}.granularity is not a power of two up to 1 GiB`);
    if (typeof r.va !== 'string' || !/^0x[0-9a-f]{1,15}$/.test(r.va)) throw invalid(`${where}.va is not a hex address`);
    const va = BigInt(r.va);
    const size = count(r.size, `${where}.size`, 1);
    if (va === 0n || va % BigInt(granularity) !== 0n || size % granularity !== 0 || va + BigInt(size) > VA_LIMIT) {
      throw invalid(`${where} is not a granularity-aligned range of user addresses`);
    }
    if (!Array.isArray(r.allocations) || r.allocations.length === 0) throw invalid(`${where}.allocations is not a non-empty list`);
    allocations += r.allocations.length;
    if (allocations > WEIGHTS_MAX_ALLOCATIONS) throw invalid(`more than ${WEIGHTS_MAX_ALLOCATIONS} allocations`);
    let end = 0;
    const allocs: WeightsAllocation[] = r.allocations.map((a: unknown, j: number) => {
      const aw = `${where}.allocations[${j}]`;
      if (!isObject(a)) throw invalid(`${aw} is not an object`);
      onlyKeys(a, ['offset', 'size', 'kind', 'source'], aw);
      const offset = count(a.offset, `${aw}.offset`);
      const asize = count(a.size, `${aw}.size`, 1);
      // Sorted and disjoint: each starts at or after the previous end, all inside the region.
      if (offset < end || offset % granularity !== 0 || asize % granularity !== 0 || offset + asize > size) {
        throw invalid(`${aw} overlaps another allocation or leaves its region`);
      }
      end = offset + asize;
      if (a.kind === 'raw') {
        if (a.source !== undefined) throw invalid(`${aw} is raw and has a source`);
        return { offset, size: asize, kind: 'raw' as const };
      }
      if (a.kind !== 'file') throw invalid(`${aw}.kind is neither file nor raw`);
      return { offset, size: asize, kind: 'file' as const, source: parseSource(a.source, aw, asize) };
    });
    regions.push({ name: r.name, device, va, size, granularity, allocations: allocs });
  });
  const sorted = [...regions].sort((a, b) => (a.va < b.va ? -1 : a.va > b.va ? 1 : 0));
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    const cur = sorted[i]!;
    if (prev.device === cur.device && prev.va + BigInt(prev.size) > cur.va) throw invalid(`regions ${prev.name} and ${cur.name} overlap`);
  }
  return regions;
}

/**
 * Reads and validates `<controlDir>/weights-regions.json`. The control directory itself is thaw's (it made
 * it); the file in it is the pod's, so it is opened without following a link (O_NOFOLLOW) or blocking on a
 * FIFO (O_NONBLOCK), must be a regular file, and at most WEIGHTS_FILE_MAX_BYTES are read. Returns undefined
 * when the file does not exist (the worker uses no weights regions).
 */
export async function readWeightsFile(controlDir: string): Promise<WeightsRegionSpec[] | undefined> {
  let fh;
  try {
    fh = await open(posix.join(controlDir, WEIGHTS_FILE), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK); // node opens every fd close-on-exec
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw invalid(`cannot open: ${(err as Error).message}`, { errno: (err as NodeJS.ErrnoException).code });
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw invalid('is not a regular file');
    const buf = Buffer.alloc(WEIGHTS_FILE_MAX_BYTES + 1);
    let n = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, n, buf.length - n, n);
      if (bytesRead === 0) break;
      n += bytesRead;
      if (n > WEIGHTS_FILE_MAX_BYTES) throw invalid(`is larger than ${WEIGHTS_FILE_MAX_BYTES} bytes`);
    }
    let doc: unknown;
    try {
      doc = JSON.parse(buf.subarray(0, n).toString('utf8'));
    } catch {
      throw invalid('is not JSON');
    }
    return parseWeightsRegions(doc);
  } finally {
    await fh.close();
  }
}
