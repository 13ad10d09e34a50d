import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { StoreError, StoreErrorCode, throwIfAborted } from './errors.js';

/** Read size for hashing: large enough that syscalls are not the cost, small enough to stay in L2/L3. */
export const HASH_CHUNK_BYTES = 1024 * 1024;
/** Default number of files hashed (or prefetched) at once: overlaps I/O; hashing itself runs on one thread. */
export const DEFAULT_FILE_CONCURRENCY = 4;

export interface FileDigest {
  sha256: string;
  size: number;
}

/**
 * Opens a file of a checkpoint for reading without following a symlink in its last component (a symlink
 * planted in a checkpoint directory must not make thaw read or hash a file elsewhere), and refuses
 * anything but a regular file. The caller closes the handle.
 */
export async function openRegularNoFollow(path: string, step: string, flags = fsConstants.O_RDONLY): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await open(path, flags | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') {
      throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${path} is a symlink (checkpoint files must be regular files)`, {
        step,
        evidence: { path },
      });
    }
    if (code === 'ENOENT') {
      throw new StoreError(StoreErrorCode.FILE_MISSING, `${path} does not exist`, { step, cause: err, evidence: { path } });
    }
    throw new StoreError(StoreErrorCode.IO, `cannot open ${path}: ${(err as Error).message}`, { step, cause: err });
  }
  const st = await fh.stat();
  if (!st.isFile()) {
    await fh.close();
    // O_NONBLOCK above keeps a FIFO planted here from blocking the open; we refuse it now.
    throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${path} is not a regular file`, { step, evidence: { path, mode: st.mode } });
  }
  return fh;
}

/** sha256 and byte count of an open file, read from offset 0 to EOF in HASH_CHUNK_BYTES reads. */
export async function hashHandle(fh: FileHandle, options: { signal?: AbortSignal; step: string }): Promise<FileDigest> {
  const hash = createHash('sha256');
  const buffer = Buffer.allocUnsafe(HASH_CHUNK_BYTES);
  let size = 0;
  for (;;) {
    throwIfAborted(options.signal, options.step);
    const { bytesRead } = await fh.read(buffer, 0, buffer.length, size);
    if (bytesRead === 0) break;
    hash.update(buffer.subarray(0, bytesRead));
    size += bytesRead;
  }
  return { sha256: hash.digest('hex'), size };
}

/** sha256 of the file at `path` (opened with O_NOFOLLOW, regular files only). */
export async function hashFile(path: string, options: { signal?: AbortSignal; step: string }): Promise<FileDigest> {
  const fh = await openRegularNoFollow(path, options.step);
  try {
    return await hashHandle(fh, options);
  } finally {
    await fh.close();
  }
}
