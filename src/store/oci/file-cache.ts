/**
 * The content-addressed file cache of pulled checkpoints: `<store root>/.cache/sha256/<hex>`, one hard link per
 * distinct file content (0600, in 0700 directories, on the store's filesystem). A pull links a cached file into
 * the checkpoint it builds instead of fetching it, and links every file it fetched and verified into the cache,
 * so identical files of any number of checkpoints are stored once.
 *
 * Only files whose whole-content sha256 was checked enter the cache: an entry's name is a promise about its
 * bytes. Checkpoint files are never written after publication, so sharing an inode is safe. Entries are not
 * garbage-collected here (an entry whose link count is 1 is used by no checkpoint and may be removed).
 */
import { link, lstat, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { OciError, OciErrorCode } from './errors.js';

export const FILE_CACHE_DIR_NAME = '.cache';
const SHA256_HEX = /^[0-9a-f]{64}$/;

export class FileCache {
  readonly dir: string;

  private constructor(dir: string) {
    this.dir = dir;
  }

  /** Opens (creating, 0700) the cache under a store root. */
  static async open(storeRoot: string): Promise<FileCache> {
    const dir = join(storeRoot, FILE_CACHE_DIR_NAME, 'sha256');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    return new FileCache(dir);
  }

  private pathOf(sha256: string): string {
    if (!SHA256_HEX.test(sha256)) throw new OciError(OciErrorCode.MANIFEST_INVALID, `${JSON.stringify(sha256)} is not a sha256`, { step: 'file cache' });
    return join(this.dir, sha256);
  }

  /** Links the cached file of that content and size to `dest`; false when the cache has none. */
  async linkTo(sha256: string, size: number, dest: string): Promise<boolean> {
    const src = this.pathOf(sha256);
    const st = await lstat(src).catch(() => undefined);
    if (st === undefined || !st.isFile() || st.size !== size || (st.mode & 0o077) !== 0) return false;
    try {
      await link(src, dest);
      return true;
    } catch {
      return false;
    }
  }

  /** Adds a verified file; an entry of that content already there is kept. */
  async add(sha256: string, src: string): Promise<void> {
    try {
      await link(src, this.pathOf(sha256));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
}
