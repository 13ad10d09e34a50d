/**
 * The parts of files that a CRIU restore reads besides its images: the pages of private file mappings that the
 * dumped processes had modified (a library's relocated data, say). CRIU maps each such file privately and writes
 * the dumped pages over it, and each write first faults the file's own page in. With the page cache cold, that
 * is one small synchronous read per page, queued behind the checkpoint's prefetch: on the H100 host
 * (2026-11-27) a restore whose worker maps 284 files spent 2.5 s in CRIU with them cold and 1.3 s with them
 * cached (bench/RESULTS.md). Read ahead, in parallel, those pages cost little.
 *
 * `mappedFilePages` lists them from the images (pure decoding over CRIU's files); `readMappedFilePages` reads
 * them through a root (the target container's `/proc/<pid>/root`), never failing: what cannot be read is
 * counted and left to CRIU.
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { constants as fsConstants, fstatSync } from 'node:fs';
import { isThawError } from '../errors.js';
import { forEachLimit } from '../sys/concurrency.js';
import { SysErrorCode } from '../sys/errors.js';
import { FsAt, O_NOFOLLOW, O_PATH } from '../sys/fs-at.js';
import { readRange } from '../sys/page-cache.js';
import { CRIU_PAGE_BYTES, CriuImageCodec, decodePagemapEntryRaw, parseImageFile, VmaStatus, type PagemapEntry, type VmaEntry } from './criu/images.js';

/**
 * The head of every mapped file, read first: CRIU opens each file a VMA maps and checks it (its size, and the
 * ELF build-id it recorded: the ELF header, program headers and notes, near the start), before any memory.
 */
export const MAPPED_FILE_HEAD_BYTES = 64 * 1024;
/** Ranges of one file closer than this are read as one (the kernel reads around a fault anyway). */
export const MAPPED_RANGE_MERGE_GAP_BYTES = 64 * 1024;
/** Reads in flight at once (libuv's pool runs four at a time by default; more keep the disk's queue fed). */
export const MAPPED_READ_CONCURRENCY = 16;
const READ_CHUNK_BYTES = 1024 * 1024;

export interface FileRange {
  offset: number;
  length: number;
}

export interface MappedFile {
  /** The path as the dumped process saw it (absolute, in its mount namespace). */
  path: string;
  /** Sorted, disjoint. */
  ranges: FileRange[];
  bytes: number;
}

/**
 * File offsets of the dumped pages that lie in private file mappings, by file id (the VMA's shmid). Pure.
 * `vmas` and `pagemap` are one process's; pagemap entries are sorted by address, as CRIU writes them.
 */
export function privateFilePageRanges(vmas: readonly VmaEntry[], pagemap: readonly PagemapEntry[]): Map<bigint, Array<[bigint, bigint]>> {
  const out = new Map<bigint, Array<[bigint, bigint]>>();
  const fileVmas = vmas.filter((v) => (v.status & VmaStatus.FILE_PRIVATE) !== 0 && v.shmid !== undefined).sort((a, b) => (a.start < b.start ? -1 : 1));
  const page = BigInt(CRIU_PAGE_BYTES);
  let i = 0;
  for (const e of pagemap) {
    const start = e.vaddr;
    const end = e.vaddr + BigInt(e.nrPages) * page;
    while (i < fileVmas.length && (fileVmas[i] as VmaEntry).end <= start) i++;
    for (let j = i; j < fileVmas.length && (fileVmas[j] as VmaEntry).start < end; j++) {
      const v = fileVmas[j] as VmaEntry;
      const from = start > v.start ? start : v.start;
      const to = end < v.end ? end : v.end;
      if (from >= to) continue;
      const base = v.pgoff ?? 0n; // bytes, as in /proc/<pid>/maps (CRIU passes it to mmap as is)
      const list = out.get(v.shmid as bigint) ?? [];
      list.push([base + (from - v.start), base + (to - v.start)]);
      out.set(v.shmid as bigint, list);
    }
  }
  return out;
}

/** Sorts and merges [start, end) ranges that overlap or lie within `gapBytes` of each other. Pure. */
export function mergeRanges(ranges: ReadonlyArray<readonly [bigint, bigint]>, gapBytes: number = MAPPED_RANGE_MERGE_GAP_BYTES): FileRange[] {
  const sorted = [...ranges].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const merged: Array<[bigint, bigint]> = [];
  const gap = BigInt(gapBytes);
  for (const [s, e] of sorted) {
    const last = merged[merged.length - 1];
    if (last !== undefined && s <= last[1] + gap) {
      if (e > last[1]) last[1] = e;
    } else merged.push([s, e]);
  }
  return merged.map(([s, e]) => ({ offset: Number(s), length: Number(e - s) }));
}

/**
 * Every regular file the images in `dir` map, with the ranges a restore reads: its head (MAPPED_FILE_HEAD_BYTES)
 * and, for private mappings, the pages CRIU writes over; most bytes first.
 */
export async function mappedFilePages(dir: string, codec: CriuImageCodec = CriuImageCodec.load()): Promise<MappedFile[]> {
  const names = new Map<bigint, string>();
  const files = parseImageFile(await readFile(join(dir, 'files.img')), 'files.img');
  for (const entry of files.entries) {
    const reg = codec.decodeRegFile(entry);
    if (reg !== undefined) names.set(BigInt(reg.id), reg.name);
  }
  const byFile = new Map<bigint, Array<[bigint, bigint]>>();
  const head: [bigint, bigint] = [0n, BigInt(MAPPED_FILE_HEAD_BYTES)];
  const pstree = parseImageFile(await readFile(join(dir, 'pstree.img')), 'pstree.img').entries.map((e) => codec.decodePstree(e));
  for (const { pid } of pstree) {
    const mm = parseImageFile(await readFile(join(dir, `mm-${pid}.img`)), `mm-${pid}.img`);
    const vmas = mm.entries[0] !== undefined ? codec.decodeVmas(mm.entries[0]) : [];
    for (const v of vmas) {
      if ((v.status & (VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED)) !== 0 && v.shmid !== undefined && !byFile.has(v.shmid)) byFile.set(v.shmid, [head]);
    }
    if (!vmas.some((v) => (v.status & VmaStatus.FILE_PRIVATE) !== 0)) continue;
    // The first pagemap entry is the head (which pages file): the rest are pages.
    // The wire decoder: a pagemap holds tens of thousands of entries once zero pages are dropped (CreateContainer's budget).
    const pagemap = parseImageFile(await readFile(join(dir, `pagemap-${pid}.img`)), `pagemap-${pid}.img`).entries.slice(1).map((e): PagemapEntry => {
      const r = decodePagemapEntryRaw(e, `pagemap-${pid}.img`);
      return { vaddr: BigInt(r.vaddr), nrPages: r.nrPages, ...(r.inParent ? { inParent: true } : {}), ...(r.flags !== undefined ? { flags: r.flags } : {}) };
    });
    for (const [id, ranges] of privateFilePageRanges(vmas, pagemap)) byFile.set(id, [...(byFile.get(id) ?? []), ...ranges]);
  }
  const out: MappedFile[] = [];
  for (const [id, ranges] of byFile) {
    const path = names.get(id);
    if (path === undefined || !path.startsWith('/')) continue;
    const merged = mergeRanges(ranges);
    out.push({ path, ranges: merged, bytes: merged.reduce((n, r) => n + r.length, 0) });
  }
  return out.sort((a, b) => b.bytes - a.bytes);
}

export interface ReadMappedResult {
  files: number;
  bytesRead: number;
  /** Files that could not be opened or read (gone, another file system view, permissions). */
  skipped: number;
  ms: number;
}

/** The parts of `ranges` within [from, to). Pure. */
export function clipRanges(ranges: readonly FileRange[], from: number, to: number): FileRange[] {
  const out: FileRange[] = [];
  for (const r of ranges) {
    const s = Math.max(r.offset, from);
    const e = Math.min(r.offset + r.length, to);
    if (s < e) out.push({ offset: s, length: e - s });
  }
  return out;
}

let boundFsAt: FsAt | undefined;
/** The openat2 binding, bound on first use (koffi is loaded by the agent already; a test's first read pays it). */
function fsAt(): FsAt {
  boundFsAt ??= FsAt.load();
  return boundFsAt;
}

/**
 * Opens `path` (absolute, as CRIU recorded it) for reading inside the tree `rootFd` stands for: openat2 with
 * RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS (absolute symlinks and `..` of every component stay inside the
 * container's root; a /proc magic link is refused), O_PATH|O_NOFOLLOW (nothing is opened yet: a FIFO cannot
 * block, a device's open never runs), then fstat, and only a regular file is reopened for reading through
 * that very fd. Undefined for anything else.
 */
async function openMappedFile(rootFd: number, path: string): Promise<FileHandle | undefined> {
  const at = fsAt();
  const pathFd = at.openInRoot(rootFd, path, O_PATH | O_NOFOLLOW);
  try {
    if (!fstatSync(pathFd).isFile()) return undefined;
    return await open(`/proc/self/fd/${pathFd}`, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } finally {
    at.close(pathFd);
  }
}

/**
 * The first of `files` that exists in the tree `root` (the target's `/proc/<pid>/root`) but is not a regular file
 * there: a FIFO (CRIU's open of it would block until its restore timeout), a device, a directory. Each path is
 * resolved inside the root (openat2 RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS, symlinks followed there as CRIU
 * follows them) with O_PATH, which opens nothing, then fstat'd: one openat2 and one fstat per file. A path that
 * does not resolve is no verdict (CRIU reports it itself, at once). Undefined when every file is regular.
 */
export async function firstIrregularMappedFile(root: string, files: readonly MappedFile[]): Promise<{ path: string; type: string } | undefined> {
  const at = fsAt();
  const rootFh = await open(root, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    for (const f of files) {
      let fd: number;
      try {
        fd = at.openInRoot(rootFh.fd, f.path, O_PATH);
      } catch {
        continue;
      }
      try {
        const st = fstatSync(fd);
        if (!st.isFile()) return { path: f.path, type: st.isFIFO() ? 'fifo' : st.isCharacterDevice() ? 'character device' : st.isBlockDevice() ? 'block device' : st.isDirectory() ? 'directory' : st.isSocket() ? 'socket' : 'not a regular file' };
      } finally {
        at.close(fd);
      }
    }
    return undefined;
  } finally {
    await rootFh.close();
  }
}

/**
 * Reads every range of `files` under `root` (e.g. `/proc/<pid>/root`: the target container's view, where the
 * restored process will find them), `concurrency` files at a time: first the head of every file (what CRIU
 * reads first), then the rest. Stops early when `signal` aborts.
 *
 * The paths come from the checkpoint and the tree is the pod's: `root` is opened once as a directory and
 * every file is resolved inside it (openMappedFile), regular files only; anything else is skipped.
 */
export async function readMappedFilePages(root: string, files: readonly MappedFile[], options: { signal?: AbortSignal; concurrency?: number } = {}): Promise<ReadMappedResult> {
  const started = performance.now();
  const result: ReadMappedResult = { files: 0, bytesRead: 0, skipped: 0, ms: 0 };
  const failed = new Set<string>();
  // One buffer per reader: forEachLimit runs at most `concurrency` of these at once.
  const buffers: Buffer[] = [];
  const rootFh = await open(root, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  const pass = async (jobs: Array<{ path: string; ranges: FileRange[] }>, countFiles: boolean): Promise<void> => {
    const readOne = async (f: { path: string; ranges: FileRange[] }): Promise<void> => {
      if (failed.has(f.path)) return;
      const buffer = buffers.pop() ?? Buffer.allocUnsafe(READ_CHUNK_BYTES);
      let fh;
      try {
        fh = await openMappedFile(rootFh.fd, f.path);
        if (fh === undefined) throw new Error('not a regular file');
        for (const r of f.ranges) {
          // Not `result.bytesRead += await ...`: that reads the total before the await, and a concurrent
          // reader's bytes added meanwhile would be lost.
          const n = await readRange(fh, buffer, r.offset, r.offset + r.length, options.signal);
          result.bytesRead += n;
        }
        if (countFiles) result.files += 1;
      } catch {
        failed.add(f.path);
        result.skipped += 1;
      } finally {
        await fh?.close();
        buffers.push(buffer);
      }
    };
    // Being stopped is how this ends early, not a failure (readOne itself never throws).
    await forEachLimit(jobs, Math.max(1, options.concurrency ?? MAPPED_READ_CONCURRENCY), readOne, { ...(options.signal ? { signal: options.signal } : {}), step: 'read mapped file pages' }).catch(
      (err: unknown) => {
        if (!isThawError(err, SysErrorCode.ABORTED)) throw err;
      },
    );
  };
  try {
    await pass(files.map((f) => ({ path: f.path, ranges: clipRanges(f.ranges, 0, MAPPED_FILE_HEAD_BYTES) })), true);
    await pass(files.map((f) => ({ path: f.path, ranges: clipRanges(f.ranges, MAPPED_FILE_HEAD_BYTES, Number.MAX_SAFE_INTEGER) })).filter((f) => f.ranges.length > 0), false);
  } finally {
    await rootFh.close();
  }
  result.ms = Math.round(performance.now() - started);
  return result;
}
