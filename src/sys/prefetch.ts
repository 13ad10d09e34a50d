/**
 * Brings files into the page cache ahead of a reader that will want them soon (a CRIU restore of a
 * checkpoint): a file already cached (mincore) is left alone, any other is read once, a large one as
 * consecutive segments by several readers at once. Nothing here knows what the files are: the caller opens
 * them (with its own path checks) and names the error of an abort.
 */
import type { FileHandle } from 'node:fs/promises';
import { throwIfAborted } from '../util.js';
import { forEachLimit } from './concurrency.js';
import { sysAborted } from './errors.js';
import { readRange, type PageCache } from './page-cache.js';

/** Readers of the prefetch; each holds one PREFETCH_CHUNK_BYTES buffer. */
export const DEFAULT_PREFETCH_CONCURRENCY = 4;
/** A large file is prefetched as segments of this size, read by several readers at once, in file order. */
export const PREFETCH_SEGMENT_BYTES = 64 * 1024 * 1024;
/** Read size of the prefetch: large reads keep the disk queue full; one buffer per reader. */
export const PREFETCH_CHUNK_BYTES = 8 * 1024 * 1024;
/** A file at least this much in the page cache is not read again. */
export const PREFETCH_RESIDENT_FRACTION = 0.99;

export interface PrefetchOptions {
  signal?: AbortSignal;
  concurrency?: number;
  /** Default PREFETCH_SEGMENT_BYTES. */
  segmentBytes?: number;
  /** Awaited before each read: lets smaller, more urgent reads have the disk first (the restore's file pages). */
  gate?: () => Promise<void>;
}

/** A byte range of one of the files: [start, end). */
export interface PrefetchRange {
  path: string;
  start: number;
  end: number;
}

export interface PrefetchFilesOptions extends PrefetchOptions {
  /** Opens one of the files for reading (the caller's checks: O_NOFOLLOW, inside its root, ...). */
  open(path: string): Promise<FileHandle>;
  step: string;
  /** The error an abort throws (default SYS_ABORTED). */
  aborted?: (cause: unknown) => Error;
  /**
   * Ranges of the large files that the reader wants before the rest (CRIU's own page reads in a lazy-pages
   * restore), read in this order after the small files and before any large file is advised or read. A range of a
   * file not in the list, or of one already cached, is left out.
   */
  first?: ReadonlyArray<PrefetchRange>;
}

interface Segment {
  fh: FileHandle;
  start: number;
  end: number;
}

/**
 * Prefetches `files` (host paths with their sizes): first the small ones (smaller than a segment), smallest first,
 * then `first`'s ranges, then each large file as consecutive segments read by several readers at once. A restore's
 * reader needs the small files (CRIU's inventory, core, mm and pagemap images) before the bulk, and a file's
 * read-ahead advice queues its whole length on the disk, so a large file is advised only once the rest is in.
 * Cancellable between chunks. Returns the bytes of the files and the bytes it read of them (`first`'s not
 * counted: their large file's segments read them again, from the page cache).
 */
export async function prefetchFiles(files: ReadonlyArray<{ path: string; size: number }>, pageCache: PageCache, o: PrefetchFilesOptions): Promise<{ bytes: number; bytesRead: number }> {
  const aborted = o.aborted ?? sysAborted(o.step);
  const segmentBytes = o.segmentBytes ?? PREFETCH_SEGMENT_BYTES;
  const ordered = [...files].sort((a, b) => a.size - b.size);
  const handles: FileHandle[] = [];
  const small: Segment[] = [];
  const large: Array<{ fh: FileHandle; path: string; size: number }> = [];
  let bytes = 0;
  let bytesRead = 0;
  const buffers: Buffer[] = [];
  const readAll = async (segments: readonly Segment[], count: boolean): Promise<void> => {
    await forEachLimit(
      segments,
      o.concurrency ?? DEFAULT_PREFETCH_CONCURRENCY,
      async ({ fh, start, end }) => {
        const buffer = buffers.pop() ?? Buffer.allocUnsafe(PREFETCH_CHUNK_BYTES);
        try {
          // Not `bytesRead += await ...`: that reads bytesRead before the await and loses the other readers' counts.
          const n = await readRange(fh, buffer, start, end, o.signal, o.gate);
          if (count) bytesRead += n;
          throwIfAborted(o.signal, aborted);
        } finally {
          buffers.push(buffer);
        }
      },
      { ...(o.signal ? { signal: o.signal } : {}), step: o.step, aborted },
    );
  };
  try {
    for (const file of ordered) {
      throwIfAborted(o.signal, aborted);
      const fh = await o.open(file.path);
      handles.push(fh);
      bytes += file.size;
      if (pageCache.residentBytes(fh.fd, file.size) >= file.size * PREFETCH_RESIDENT_FRACTION) continue;
      if (file.size > segmentBytes) {
        large.push({ fh, path: file.path, size: file.size });
        continue;
      }
      await pageCache.adviseWillNeed(fh.fd);
      small.push({ fh, start: 0, end: file.size });
    }
    const largeByPath = new Map(large.map((f) => [f.path, f]));
    const first: Segment[] = [];
    for (const r of o.first ?? []) {
      const f = largeByPath.get(r.path);
      const end = f === undefined ? 0 : Math.min(r.end, f.size);
      if (f !== undefined && r.start >= 0 && r.start < end) first.push({ fh: f.fh, start: r.start, end });
    }
    await readAll(small, true);
    await readAll(first, false);
    // A large file is read as consecutive segments by several readers at once: CRIU reads its pages image
    // from the start, so the front of what is cached advances at what the disk gives to parallel reads
    // (one stream here: 1.0-1.2 GB/s, four or eight: 1.3-1.65 GB/s), ahead of CRIU.
    const segments: Segment[] = [];
    for (const f of large) {
      throwIfAborted(o.signal, aborted);
      await pageCache.adviseWillNeed(f.fh.fd);
      for (let start = 0; start < f.size; start += segmentBytes) segments.push({ fh: f.fh, start, end: Math.min(f.size, start + segmentBytes) });
    }
    await readAll(segments, true);
  } finally {
    await Promise.all(handles.map((fh) => fh.close()));
  }
  return { bytes, bytesRead };
}
