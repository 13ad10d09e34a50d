/**
 * Verification of a checkpoint against its manifest (every file's sha256), and the stamp cache that lets a
 * checkpoint unchanged since it was last hashed on this node skip the hashing: `<root>/.verified/<name>.json`
 * holds, per file, the identity (device, inode, size, mtime and ctime in ns) it had when the hash started,
 * with the manifest id.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { lstat, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { forEachLimit, type Limiter } from '../sys/concurrency.js';
import { hashFile } from './digest.js';
import { StoreError, StoreErrorCode, storeAborted, throwIfAborted } from './errors.js';
import { keyToFileName, type OpenedCheckpoint } from './layout.js';
import type { Manifest } from './manifest.js';

/** Where verify() keeps, per checkpoint, the file identities it last hashed successfully. */
export const VERIFIED_STAMPS_DIR = '.verified';

export interface VerifyResult {
  files: number;
  bytes: number;
  ms: number;
  /**
   * False when every file was found exactly as it was when last hashed on this node (same inode, size,
   * mtime and ctime in ns, and the same manifest id), so the sha256s were not computed again.
   */
  hashed: boolean;
}

export interface VerifyOptions {
  signal?: AbortSignal;
  concurrency?: number;
  /**
   * Re-hash even when the files are unchanged since they were last verified here (default false).
   * Any write, truncate, chmod or rename of a file changes its ctime, which the kernel alone sets, so an
   * unchanged stamp means unchanged bytes short of an attacker who is root already.
   */
  rehash?: boolean;
  /**
   * The parsed manifest the caller checked and will use (the restore: the one read at CreateContainer, which
   * CRIU gets). The files are hashed against this object, and the manifest on disk must be the same (id and
   * files), else STORE_MANIFEST_CHANGED: what is verified is exactly what is used, never a re-read.
   */
  manifest?: Manifest;
}

interface VerifiedStamp {
  id: string;
  /** path → "ino:size:mtimeNs:ctimeNs" at the moment the hash started. */
  files: Record<string, string>;
}

async function readStamp(path: string): Promise<VerifiedStamp | undefined> {
  try {
    const parsed = JSON.parse(readFileSync(path, 'utf8')) as Partial<VerifiedStamp>;
    return typeof parsed.id === 'string' && parsed.files && typeof parsed.files === 'object' ? (parsed as VerifiedStamp) : undefined;
  } catch {
    return undefined;
  }
}

async function fileIdentity(path: string): Promise<string> {
  const st = await lstat(path, { bigint: true });
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
}

/** The `.verified` stamps of one store root. */
export class StampCache {
  private readonly root: string;
  private readonly logger: Logger;

  constructor(root: string, logger: Logger) {
    this.root = root;
    this.logger = logger;
  }

  pathOf(name: string): string {
    return join(this.root, VERIFIED_STAMPS_DIR, `${keyToFileName(name)}.json`);
  }

  /** Forgets a checkpoint's stamp (it is deleted, or failed its hash). */
  async remove(name: string): Promise<void> {
    await rm(this.pathOf(name), { force: true });
  }

  /** Every file of a checkpoint just published was hashed in the store's own 0700 directory: record it. */
  async recordPublished(name: string, publishedDir: string, manifest: Manifest): Promise<void> {
    const identities = Object.fromEntries(
      await Promise.all(manifest.files.map(async (f) => [f.path, await fileIdentity(join(publishedDir, f.path))] as const)),
    );
    await this.write(this.pathOf(name), { id: manifest.id, files: identities });
  }

  /** Records a successful hash (0600, atomic); a failure to record only costs a re-hash next time. */
  async write(path: string, stamp: VerifiedStamp): Promise<void> {
    try {
      await mkdir(join(this.root, VERIFIED_STAMPS_DIR), { mode: 0o700, recursive: true });
      const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
      await writeFile(tmp, JSON.stringify(stamp), { mode: 0o600 });
      await rename(tmp, path);
    } catch (err) {
      this.logger.warn('cannot record a verified checkpoint; it will be hashed again', { path, error: (err as Error).message });
    }
  }
}

export interface VerifyContext {
  /** open() of the store: its permission and size checks come first. */
  open(name: string): Promise<OpenedCheckpoint>;
  stamps: StampCache;
  hashConcurrency: number;
  /** Files hashed at once in the whole process. */
  hashLimiter: Limiter;
}

/**
 * Re-hashes every file of a checkpoint against its manifest (after open()'s checks). Throws
 * STORE_DIGEST_MISMATCH naming the first bad file (manifest order) with expected and actual digests;
 * `evidence.mismatches` lists them all.
 */
export async function verifyCheckpoint(ctx: VerifyContext, name: string, options: VerifyOptions = {}): Promise<VerifyResult> {
  const step = `verify checkpoint ${name}`;
  throwIfAborted(options.signal, step);
  const started = performance.now();
  const opened = await ctx.open(name);
  const manifest = options.manifest ?? opened.manifest;
  if (manifest !== opened.manifest && (manifest.id !== opened.manifest.id || JSON.stringify(manifest.files) !== JSON.stringify(opened.manifest.files))) {
    throw new StoreError(StoreErrorCode.MANIFEST_CHANGED, `the manifest of ${name} changed since it was checked`, {
      step,
      evidence: { checkedId: manifest.id, onDiskId: opened.manifest.id },
    });
  }
  const files = manifest.files;
  // Identities are taken before hashing: a file changed while it is hashed then fails the next comparison.
  const identities = Object.fromEntries(
    await Promise.all(files.map(async (f) => [f.path, await fileIdentity(join(opened.paths.dir, f.path))] as const)),
  );
  const stampPath = ctx.stamps.pathOf(name);
  if (!options.rehash) {
    const stamp = await readStamp(stampPath);
    if (stamp && stamp.id === manifest.id && files.every((f) => stamp.files[f.path] === identities[f.path])) {
      return { files: files.length, bytes: manifest.totals.bytes, ms: performance.now() - started, hashed: false };
    }
  }
  const bad: Array<{ file: string; expected: string; actual: string }> = [];
  await forEachLimit(
    files,
    options.concurrency ?? ctx.hashConcurrency,
    async (file) => {
      const actual = await ctx.hashLimiter.run(() => hashFile(join(opened.paths.dir, file.path), { signal: options.signal, step }), {
        ...(options.signal ? { signal: options.signal } : {}),
        step,
        aborted: storeAborted(step),
      });
      if (actual.sha256 !== file.sha256 || actual.size !== file.size) {
        bad.push({ file: file.path, expected: `sha256:${file.sha256} (${file.size} bytes)`, actual: `sha256:${actual.sha256} (${actual.size} bytes)` });
      }
    },
    { signal: options.signal, step, aborted: storeAborted(step) },
  );
  if (bad.length > 0) {
    await rm(stampPath, { force: true });
    const order = new Map(files.map((f, i) => [f.path, i]));
    bad.sort((a, b) => order.get(a.file)! - order.get(b.file)!);
    const first = bad[0]!;
    throw new StoreError(StoreErrorCode.DIGEST_MISMATCH, `${first.file}: expected ${first.expected}, found ${first.actual}`, {
      step,
      evidence: { file: first.file, expected: first.expected, actual: first.actual, mismatches: bad },
    });
  }
  await ctx.stamps.write(stampPath, { id: manifest.id, files: identities });
  return { files: files.length, bytes: manifest.totals.bytes, ms: performance.now() - started, hashed: true };
}
