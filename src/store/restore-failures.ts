/**
 * "This checkpoint failed a restore on this node": `<root>/.restore-failed/<key>.json` (the store key's '/' written
 * '+', layout.ts's keyToFileName; the directory is one of the root's reserved dot entries), one small file per
 * checkpoint, written by the restore flow when a restore fell back because of the checkpoint itself (its CRIU
 * images, its credentials, its rootfs diff: restore-engine's CHECKPOINT_FAULT_CAUSES), read at every
 * CreateContainer that names it (one readFile; ENOENT when nothing failed), so that the next pod cold-starts at
 * once instead of applying the same diff and running the same CRIU again.
 *
 * A mark holds for one manifest: its `manifestDigest` is the sha256 of the manifest (manifestDigest() below). A
 * checkpoint published anew under the same name has another manifest (another id at least), so the old mark no
 * longer matches: it is ignored and removed when next read, and publish removes it too. The operator clears a
 * mark with `thaw clear-failure <namespace/name>` (the API's ClearRestoreFailure); deleting the checkpoint removes it.
 *
 * The directory is the store's (0700, root), written only by thaw; a record that does not parse is treated as no
 * mark (and logged): the restore it allows goes through every check a first restore does.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import type { Manifest } from './manifest.js';
import { keyToFileName } from './layout.js';

export const RESTORE_FAILURES_DIR = '.restore-failed';

/** What the restore flow records when a restore of a checkpoint failed because of the checkpoint. */
export interface RestoreFailure {
  /** The checkpoint's store key (`namespace/name` or `oci-<hex>`). */
  name: string;
  /** sha256 (hex) of the manifest the failed restore used (manifestDigest()). */
  manifestDigest: string;
  /** The manifest's id, for people reading `thaw list`. */
  manifestId: string;
  /** The RESTORE_* cause of the fallback. */
  cause: string;
  reason: string;
  /** The container whose restore failed, and its pod (namespace/name). */
  containerId: string;
  pod: string;
  /** ISO 8601. */
  at: string;
}

/**
 * The digest a mark is keyed by: sha256 of the manifest's canonical JSON (object keys sorted at every level), so
 * the manifest publish() returned and the one open() parsed from disk give the same digest. Any change to the
 * manifest (a new checkpoint, an edited file digest) is another digest.
 */
export function manifestDigest(manifest: Manifest): string {
  return createHash('sha256').update(canonicalJson(manifest)).digest('hex');
}

function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map((x) => canonicalJson(x ?? null)).join(',')}]`;
  if (v !== null && typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, x]) => `${JSON.stringify(k)}:${canonicalJson(x)}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

function parseFailure(text: string): RestoreFailure | undefined {
  let o: unknown;
  try {
    o = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof o !== 'object' || o === null) return undefined;
  const r = o as Record<string, unknown>;
  const keys = ['name', 'manifestDigest', 'manifestId', 'cause', 'reason', 'containerId', 'pod', 'at'] as const;
  for (const k of keys) if (typeof r[k] !== 'string') return undefined;
  return Object.fromEntries(keys.map((k) => [k, r[k]])) as unknown as RestoreFailure;
}

/** The `.restore-failed` marks of one store root (keys are checked by the caller, LocalStore). */
export class RestoreFailures {
  constructor(
    private readonly root: string,
    private readonly logger: Logger,
  ) {}

  pathOf(name: string): string {
    return join(this.root, RESTORE_FAILURES_DIR, `${keyToFileName(name)}.json`);
  }

  /** Records a failure (0600, atomic rename; a later failure of the same checkpoint replaces the record). */
  async record(failure: RestoreFailure): Promise<void> {
    await mkdir(join(this.root, RESTORE_FAILURES_DIR), { mode: 0o700, recursive: true });
    const path = this.pathOf(failure.name);
    const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
    try {
      await writeFile(tmp, JSON.stringify(failure), { mode: 0o600, flag: 'wx' });
      await rename(tmp, path);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  /**
   * The mark of `name`, or undefined. With `manifest`, only a mark of that very manifest counts; one of another
   * manifest (the checkpoint was replaced) is removed.
   */
  async read(name: string, manifest?: Manifest): Promise<RestoreFailure | undefined> {
    const path = this.pathOf(name);
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    const failure = parseFailure(text);
    if (failure === undefined || failure.name !== name) {
      this.logger.warn('ignoring an unreadable restore-failure mark', { path });
      return undefined;
    }
    if (manifest !== undefined && failure.manifestDigest !== manifestDigest(manifest)) {
      // A new checkpoint under the same name: the mark was of the one it replaced.
      await rm(path, { force: true });
      this.logger.info('restore-failure mark of a replaced checkpoint removed', { name, markedId: failure.manifestId, currentId: manifest.id });
      return undefined;
    }
    return failure;
  }

  /** Removes the mark; true when there was one. */
  async clear(name: string): Promise<boolean> {
    const path = this.pathOf(name);
    try {
      await rm(path);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  }
}
