/**
 * The page cache, as the prefetch of a checkpoint about to be restored needs it, through koffi:
 *
 * - `residentBytes`: how much of a file is in the page cache now (mmap + mincore(2) + munmap; nothing is read).
 * - `adviseWillNeed`: posix_fadvise(POSIX_FADV_WILLNEED), a hint that costs nothing.
 * - `startWriteback`: sync_file_range(SYNC_FILE_RANGE_WRITE), used by a pull while it writes a file: the disk
 *   writes what was received while the rest is still arriving, so that the fsync at the end (which still makes
 *   it durable: this call promises nothing) finds little left to write.
 *
 * Why both: reading every file through the agent (the first prefetch) copied each byte into this process and,
 * on a 2-core node, took CPU from the CRIU restore beside it when the checkpoint was already cached (4 GB warm
 * restore: CRIU 6.5 s). WILLNEED alone fixed that case but does next to nothing on a cold cache here: it
 * brought 8 MB of a 2 GB file into the cache in 30 s on this machine's kernel (6.18) and disk, and the cold
 * restore took 9.0 s of CRIU instead of 3.5 s. So the prefetch asks the kernel what is resident and reads only
 * files that are not.
 */
import { open, type FileHandle } from 'node:fs/promises';
import koffi from 'koffi';

export const POSIX_FADV_WILLNEED = 3;
/** sync_file_range(2): start writing the range's dirty pages, do not wait for them. */
const SYNC_FILE_RANGE_WRITE = 2;
const PROT_READ = 1;
const MAP_SHARED = 1;
const PAGE_BYTES = 4096;

export interface PageCache {
  /** Bytes of the file behind `fd` (of `size` bytes) that are in the page cache. */
  residentBytes(fd: number, size: number): number;
  /** posix_fadvise WILLNEED on the whole file; resolves to 0 or the error number. */
  adviseWillNeed(fd: number): Promise<number>;
  /**
   * Starts writeback of [offset, offset + length) (in libuv's pool: it may wait for the disk's queue); resolves to
   * the call's result, 0 or -1 (harmless: the fsync that follows decides durability).
   */
  startWriteback(fd: number, offset: number, length: number): Promise<number>;
}

/** Binds the libc calls once per store instance (no module-level state). */
export function bindPageCache(): PageCache {
  const libc = koffi.load('libc.so.6');
  const fadvise = libc.func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)');
  const mmap = libc.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)');
  const munmap = libc.func('int munmap(void *addr, size_t length)');
  const mincore = libc.func('int mincore(void *addr, size_t length, _Out_ uint8_t *vec)');
  const syncFileRange = libc.func('int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)');
  return {
    residentBytes(fd, size) {
      if (size === 0) return 0;
      const addr = mmap(null, size, PROT_READ, MAP_SHARED, fd, 0);
      // MAP_FAILED is (void *) -1: treat the file as not cached, so the prefetch reads it.
      if (addr === null || koffi.address(addr) === 0xffffffffffffffffn) return 0;
      try {
        const vec = Buffer.alloc(Math.ceil(size / PAGE_BYTES));
        if (mincore(addr, size, vec) !== 0) return 0;
        let pages = 0;
        for (let i = 0; i < vec.length; i++) pages += (vec[i] as number) & 1;
        return Math.min(size, pages * PAGE_BYTES);
      } finally {
        munmap(addr, size);
      }
    },
    adviseWillNeed(fd) {
      return new Promise((resolve, reject) => {
        fadvise.async(fd, 0, 0, POSIX_FADV_WILLNEED, (err: unknown, rc: number) => (err ? reject(err) : resolve(rc)));
      });
    },
    startWriteback(fd, offset, length) {
      return new Promise((resolve, reject) => {
        syncFileRange.async(fd, offset, length, SYNC_FILE_RANGE_WRITE, (err: unknown, rc: number) => (err ? reject(err) : resolve(rc)));
      });
    },
  };
}

/**
 * Reads [start, end) of `fh` through `buffer` and discards it: what it is for is the page cache. Stops at the end
 * of the file, or between reads once `signal` aborts. `beforeRead`, awaited before each read, lets more urgent
 * reads go first (the prefetch's gate). Returns the bytes read.
 */
export async function readRange(fh: FileHandle, buffer: Buffer, start: number, end: number, signal?: AbortSignal, beforeRead?: () => Promise<void>): Promise<number> {
  let position = start;
  while (position < end && !signal?.aborted) {
    if (beforeRead !== undefined) {
      await beforeRead();
      if (signal?.aborted) break;
    }
    const { bytesRead } = await fh.read(buffer, 0, Math.min(buffer.length, end - position), position);
    if (bytesRead === 0) break;
    position += bytesRead;
  }
  return position - start;
}

/** Read size of readIntoPageCache: the files are small (binaries, libraries, scripts). */
const WARM_CHUNK_BYTES = 1024 * 1024;

export interface WarmFilesResult {
  files: number;
  bytes: number;
  /** What had to be read (the rest was in the page cache already). */
  bytesRead: number;
  /** Paths that could not be read (missing, not a regular file, permissions), with the reason. */
  skipped: Array<{ path: string; reason: string }>;
}

/**
 * Brings whole files into the page cache, one after the other: a file already resident is left alone (mincore),
 * any other is read through once. For the small files a restore executes (CRIU and its libraries, the hook's
 * modules): read before the checkpoint's gigabytes queue up on the disk, each of their page faults would
 * otherwise wait behind them. A file that cannot be read is skipped and reported, never an error.
 */
export async function readIntoPageCache(paths: readonly string[], pageCache: PageCache, options: { signal?: AbortSignal } = {}): Promise<WarmFilesResult> {
  const result: WarmFilesResult = { files: 0, bytes: 0, bytesRead: 0, skipped: [] };
  const buffer = Buffer.allocUnsafe(WARM_CHUNK_BYTES);
  for (const path of paths) {
    if (options.signal?.aborted) break;
    let fh: FileHandle | undefined;
    try {
      fh = await open(path, 'r');
      const st = await fh.stat();
      if (!st.isFile()) {
        result.skipped.push({ path, reason: 'not a regular file' });
        continue;
      }
      result.files += 1;
      result.bytes += st.size;
      if (pageCache.residentBytes(fh.fd, st.size) >= st.size) continue;
      result.bytesRead += await readRange(fh, buffer, 0, st.size);
    } catch (err) {
      result.skipped.push({ path, reason: (err as NodeJS.ErrnoException).code ?? String(err) });
    } finally {
      await fh?.close();
    }
  }
  return result;
}
