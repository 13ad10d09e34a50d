/**
 * The node's weights cache: `<store root>/.weights/sha256/<hex>`, the weights source files that came with a
 * checkpoint pulled from a registry as weights layers (artifact.ts WEIGHTS_LAYER_MEDIA_TYPE), named by the
 * sha256 of their whole content (0600 files in 0700 directories, on the store's filesystem). A restore looks a
 * source up here by its recorded sha256 when no allowed model directory has it (restore-engine/weights,
 * `restoreSourceOpener`), with the same checks as everywhere: no symlink, a regular file of the recorded size,
 * and the sha256 checked again while it is read (the loader).
 *
 * Only bytes whose sha256 was checked against the name enter (a pull renames a verified file in): an entry's
 * name is a promise about its bytes. Entries are not garbage-collected here; `thaw gc`-style removal of an
 * entry is safe at any time (a restore that misses it cold-starts with WEIGHTS_SOURCE_MISSING).
 */
import { lstat, mkdir, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { OciError, OciErrorCode } from './errors.js';

export const WEIGHTS_CACHE_DIR_NAME = '.weights';
const SHA256_HEX = /^[0-9a-f]{64}$/;

/** The cache's directory of entries under a store root (what a restore opens entries beneath). Pure. */
export function weightsCacheDir(storeRoot: string): string {
  return join(storeRoot, WEIGHTS_CACHE_DIR_NAME, 'sha256');
}

export class WeightsCache {
  private constructor(readonly dir: string) {}

  /** Opens (creating, 0700) the cache under a store root. */
  static async open(storeRoot: string): Promise<WeightsCache> {
    const dir = weightsCacheDir(storeRoot);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    return new WeightsCache(dir);
  }

  /** The entry's path; throws on a name that is not sha256 hex (it never reaches the filesystem). */
  pathOf(sha256: string): string {
    if (!SHA256_HEX.test(sha256)) throw new OciError(OciErrorCode.MANIFEST_INVALID, `${JSON.stringify(sha256)} is not a sha256`, { step: 'weights cache' });
    return join(this.dir, sha256);
  }

  /** Whether the cache holds a regular file (not a link) of that content and size. */
  async has(sha256: string, size: number): Promise<boolean> {
    const st = await lstat(this.pathOf(sha256)).catch(() => undefined);
    return st !== undefined && st.isFile() && st.size === size;
  }

  /** Moves a verified file (on the store's filesystem) in under its sha256; an entry already there is replaced. */
  async add(sha256: string, src: string): Promise<void> {
    await rename(src, this.pathOf(sha256));
  }
}
