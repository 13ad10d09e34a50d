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

export interface PrefetchFilesOptions extends PrefetchOptions {
  /** Opens one of the files for reading (the caller's checks: O_NOFOLLOW, inside its root, ...). */
  open(path: string): Promise<FileHandle>;
  step: string;
  /** The error an abort throws (default SYS_ABORTED). */
  aborted?: (cause: unknown) => Error;
}

/**
 * Prefetches `files` (host paths with their sizes), smallest first: a restore's reader needs the small files
 * (CRIU's inventory, core, mm and pagemap images) before the bulk, and each file's read-ahead advice queues its
 * whole length on the disk, so a small file advised after a large one waits behind all of it. Cancellable between
 * chunks. Returns the bytes of the files and the bytes it had to read.
 */
export async function prefetchFiles(files: ReadonlyArray<{ path: string; size: number }>, pageCache: PageCache, o: PrefetchFilesOptions): Promise<{ bytes: number; bytesRead: number }> {
  const aborted = o.aborted ?? sysAborted(o.step);
  const ordered = [...files].sort((a, b) => a.size - b.size);
  const handles: FileHandle[] = [];
  const segments: Array<{ fh: FileHandle; start: number; end: number }> = [];
  let bytes = 0;
  let bytesRead = 0;
  try {
    for (const file of ordered) {
      throwIfAborted(o.signal, aborted);
      const fh = await o.open(file.path);
      handles.push(fh);
      bytes += file.size;
      await pageCache.adviseWillNeed(fh.fd);
      if (pageCache.residentBytes(fh.fd, file.size) >= file.size * PREFETCH_RESIDENT_FRACTION) continue;
      // A large file is read as consecutive segments by several readers at once: CRIU reads its pages image
      // from the start, so the front of what is cached advances at what the disk gives to parallel reads
      // (one stream here: 1.0-1.2 GB/s, four or eight: 1.3-1.65 GB/s), ahead of CRIU.
      const segmentBytes = o.segmentBytes ?? PREFETCH_SEGMENT_BYTES;
      for (let start = 0; start < file.size; start += segmentBytes) {
        segments.push({ fh, start, end: Math.min(file.size, start + segmentBytes) });
      }
    }
    const buffers: Buffer[] = [];
    await forEachLimit(
      segments,
      o.concurrency ?? DEFAULT_PREFETCH_CONCURRENCY,
      async ({ fh, start, end }) => {
        const buffer = buffers.pop() ?? Buffer.allocUnsafe(PREFETCH_CHUNK_BYTES);
        try {
          // Not `bytesRead += await ...`: that reads bytesRead before the await and loses the other readers' counts.
          const n = await readRange(fh, buffer, start, end, o.signal, o.gate);
          bytesRead += n;
          throwIfAborted(o.signal, aborted);
        } finally {
          buffers.push(buffer);
        }
      },
      { ...(o.signal ? { signal: o.signal } : {}), step: o.step, aborted },
    );
  } finally {
    await Promise.all(handles.map((fh) => fh.close()));
  }
  return { bytes, bytesRead };
}
