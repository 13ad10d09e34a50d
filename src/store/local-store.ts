/**
 * The local checkpoint store (design.md, Store): the LocalStore facade over its parts.
 *
 *   layout.ts    the directory layout (`<root>/<namespace>/<name>`, `<root>/.oci/oci-<hex>`), keys and path safety
 *   migrate.ts   the one-time move of the old flat layout into the namespaced one
 *   open.ts      opening the root and a checkpoint, with the permission and size checks
 *   publish.ts   writing a checkpoint and publishing it durably (fsync, renameat2)
 *   recover.ts   removing what a crashed writer left
 *   verify.ts    sha256 against the manifest, and the stamps that skip an unchanged checkpoint
 *   leases.ts    "a restore is reading this": delete and replace refuse it
 *   restore-failures.ts  "a restore of this checkpoint failed here": the next pod cold-starts at once
 *
 * The prefetch into the page cache is src/sys/prefetch.ts, run over a checkpoint's files by prefetch() here.
 */
import { lstat, readdir, rename, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { DEFAULT_MAX_CONCURRENT_HASHING, DEFAULT_STORE_ROOT } from '../defaults.js';
import { Limiter } from '../sys/concurrency.js';
import { silentLogger, type Logger } from '../log.js';
import { bindPageCache, type PageCache } from '../sys/page-cache.js';
import { prefetchFiles, type PrefetchOptions, type PrefetchRange } from '../sys/prefetch.js';
import { DEFAULT_FILE_CONCURRENCY, openRegularNoFollow } from './digest.js';
import { ioError, StoreError, StoreErrorCode, storeAborted } from './errors.js';
import { errorMessage } from '../errors.js';
import { checkNamespaceName } from '../checkpoint-name.js';
import { pathsOf, PULLED_DIR_NAME, StoreLayout, walk, type CheckpointPaths, type OpenedCheckpoint } from './layout.js';
import { migrateFlatLayout, type Migration } from './migrate.js';
import { collectGarbage, LastUse, makeRoom, type GcResult, type Incoming, type StoreLimits } from './gc.js';
import { Leases, type ReleaseLease } from './leases.js';
import type { Manifest } from './manifest.js';
import { openCheckpoint, openStoreRoot, readManifestUnchecked, requireExists } from './open.js';
import { beginCheckpoint, fsyncPath, type PendingCheckpoint, type PublishContext } from './publish.js';
import { recoverStore } from './recover.js';
import { bindRenameAt2 } from './rename.js';
import { manifestDigest, RestoreFailures, type RestoreFailure } from './restore-failures.js';
import { StampCache, verifyCheckpoint, type VerifyOptions, type VerifyResult } from './verify.js';

export { CHECKPOINT_DIR_MODE, CHECKPOINT_FILE_MODE, type CheckpointPaths, type OpenedCheckpoint } from './layout.js';
export type { ReleaseLease } from './leases.js';
export type { Migration } from './migrate.js';
export type { GcCandidate, GcResult, Incoming, StoreLimits } from './gc.js';
export { PULLED_DIR_NAME, UNOWNED_DIR_NAME } from './layout.js';
export { PendingCheckpoint, type PublishOptions } from './publish.js';
export { manifestDigest, RESTORE_FAILURES_DIR, type RestoreFailure } from './restore-failures.js';
export { VERIFIED_STAMPS_DIR, type VerifyOptions, type VerifyResult } from './verify.js';
export { DEFAULT_PREFETCH_CONCURRENCY, PREFETCH_CHUNK_BYTES, PREFETCH_RESIDENT_FRACTION, PREFETCH_SEGMENT_BYTES } from '../sys/prefetch.js';

export interface LocalStoreOptions {
  /** Store root; default DEFAULT_STORE_ROOT. Created 0700 when missing. */
  root?: string;
  logger?: Logger;
  /** uid that must own every checkpoint directory and file (default 0: root). */
  ownerUid?: number;
  /** Files hashed at once by one publish() or verify() (default DEFAULT_FILE_CONCURRENCY). */
  hashConcurrency?: number;
  /**
   * The bound on files hashed at once across every call (publish, verify, copy into this store), shared with
   * whatever else the caller hands it to (the agent: its local and shared stores). Default: one of this store's
   * own, of DEFAULT_MAX_CONCURRENT_HASHING.
   */
  hashLimiter?: Limiter;
  /** Clock for manifest.createdAt and last-use records; injectable for tests. */
  now?: () => Date;
  /** Told of every collection that deleted (not dry runs): what went (metrics). */
  onCollect?: (result: GcResult) => void;
}

export interface ListedCheckpoint {
  /** Its store key (`namespace/name`, or `oci-<hex>`). */
  name: string;
  /** The namespace that owns it; undefined for a pulled checkpoint. */
  namespace?: string;
  /** Present when the checkpoint opened cleanly. */
  manifest?: Manifest;
  /** A restore of this very manifest failed on this node because of the checkpoint (restore-failures.ts). */
  restoreFailure?: RestoreFailure;
  /** Why it did not (a corrupt or foreign directory is listed, not hidden, so that an operator can delete it). */
  problem?: { code: string; message: string };
}

export interface CheckpointPrefetchOptions extends PrefetchOptions {
  /**
   * The ranges of the checkpoint's files (host paths) its reader wants before the bulk, from the opened checkpoint
   * (the restore's CRIU page reads). A hint: when it throws, the prefetch goes on in its own order.
   */
  first?: (checkpoint: OpenedCheckpoint) => Promise<readonly PrefetchRange[]>;
}

export interface PrefetchResult {
  /** Bytes of the checkpoint's files. */
  bytes: number;
  /** Bytes read because they were not in the page cache. */
  bytesRead: number;
  ms: number;
}

/**
 * Opens (creating when missing) the store at `options.root`, moves a store of the old flat layout into the
 * namespaced one (migrate.ts; `store.migrated` says what moved), and runs recover(). The root must not be
 * writable by group or others, and must be owned by `ownerUid`.
 */
export async function openLocalStore(options: LocalStoreOptions = {}): Promise<LocalStore> {
  const root = await openStoreRoot(resolve(options.root ?? DEFAULT_STORE_ROOT), options.ownerUid ?? 0, 'open checkpoint store');
  const store = new LocalStore(root, options);
  await store.migrate();
  await store.recover();
  return store;
}

export class LocalStore {
  readonly root: string;
  private readonly logger: Logger;
  private readonly ownerUid: number;
  private readonly hashConcurrency: number;
  private readonly pageCache: PageCache;
  private readonly layout: StoreLayout;
  private readonly leases: Leases;
  private readonly stamps: StampCache;
  private readonly failures: RestoreFailures;
  private readonly publishing: PublishContext;
  private readonly lastUse: LastUse;
  /** Files hashed at once in all of this store's work (and whatever shares the limiter). */
  readonly hashLimiter: Limiter;
  private readonly onCollect: ((result: GcResult) => void) | undefined;
  /** What openLocalStore moved from the old flat layout (empty for a store already namespaced). */
  migrated: Migration[] = [];

  /** Use openLocalStore(), which checks the root and recovers. */
  constructor(root: string, options: LocalStoreOptions) {
    this.root = root;
    this.logger = (options.logger ?? silentLogger).child({ component: 'store' });
    this.ownerUid = options.ownerUid ?? 0;
    this.hashConcurrency = options.hashConcurrency ?? DEFAULT_FILE_CONCURRENCY;
    const now = options.now ?? (() => new Date());
    this.pageCache = bindPageCache();
    this.layout = new StoreLayout(root);
    this.leases = new Leases(this.layout, now);
    this.stamps = new StampCache(root, this.logger);
    this.failures = new RestoreFailures(root, this.logger);
    this.lastUse = new LastUse(root, now);
    this.hashLimiter = options.hashLimiter ?? new Limiter(DEFAULT_MAX_CONCURRENT_HASHING);
    this.onCollect = options.onCollect;
    this.publishing = {
      layout: this.layout,
      logger: this.logger,
      ownerUid: this.ownerUid,
      hashConcurrency: this.hashConcurrency,
      hashLimiter: this.hashLimiter,
      now,
      renameAt2: bindRenameAt2(),
      stamps: this.stamps,
      failures: this.failures,
      isLeased: (name) => this.isLeased(name),
      used: (name) => this.lastUse.touch(name, this.logger),
    };
  }

  /**
   * Validates a store key (`namespace/name`, `oci-<hex>`) and returns its directory; STORE_INVALID_NAME with
   * the rule's reason otherwise (a bare name included). Callers name their step without the key until it is
   * valid: a bad one may hold NUL or escapes, and the reason already quotes it.
   */
  dirOf(name: string, step = 'resolve checkpoint name'): string {
    return this.layout.dirOf(name, step);
  }

  /** Paths of a published checkpoint (nothing is checked on disk; use open() for that). */
  pathsOf(name: string): CheckpointPaths {
    return pathsOf(this.dirOf(name));
  }

  /** Moves a store of the old flat layout into the namespaced one (migrate.ts). Called by openLocalStore. */
  async migrate(): Promise<Migration[]> {
    this.migrated = await migrateFlatLayout(this.layout, this.logger);
    return this.migrated;
  }

  /** Removes what a crashed writer left (recover.ts). Called by openLocalStore; safe to call again. */
  async recover(): Promise<string[]> {
    return recoverStore(this.layout, this.leases, this.logger);
  }

  /** Starts writing checkpoint `name` in a `.tmp-*` directory (publish.ts); publish() or abort() it. */
  async beginCheckpoint(name: string): Promise<PendingCheckpoint> {
    return beginCheckpoint(this.publishing, name);
  }

  /** Opens a published checkpoint with its permission and size checks (open.ts). */
  async open(name: string): Promise<OpenedCheckpoint> {
    return openCheckpoint(this.layout, this.ownerUid, name);
  }

  /** Re-hashes every file of a checkpoint against its manifest, unless unchanged since last hashed (verify.ts). */
  async verify(name: string, options: VerifyOptions = {}): Promise<VerifyResult> {
    this.dirOf(name, 'verify checkpoint');
    return verifyCheckpoint({ open: (n) => this.open(n), stamps: this.stamps, hashConcurrency: this.hashConcurrency, hashLimiter: this.hashLimiter }, name, options);
  }

  /**
   * Every checkpoint directory, sorted by key (namespaces' first, then the pulled ones); broken ones carry
   * `problem` instead of `manifest`. `namespace`: only that namespace's.
   */
  async list(options: { namespace?: string } = {}): Promise<ListedCheckpoint[]> {
    const keys: string[] = [];
    const entries = options.namespace !== undefined ? [options.namespace] : (await readdir(this.root)).filter((e) => !e.startsWith('.')).sort();
    const out: ListedCheckpoint[] = [];
    for (const ns of entries) {
      const dir = join(this.root, ns);
      const st = await lstat(dir).catch(() => undefined);
      if (st === undefined) continue;
      const bad = checkNamespaceName(ns);
      if (bad !== undefined || !st.isDirectory()) {
        out.push({ name: ns, problem: { code: StoreErrorCode.PATH_ESCAPE, message: bad ?? `${dir} is not a namespace directory` } });
        continue;
      }
      for (const name of (await readdir(dir)).sort()) keys.push(`${ns}/${name}`);
    }
    if (options.namespace === undefined) {
      const pulled = await readdir(join(this.root, PULLED_DIR_NAME)).catch(() => [] as string[]);
      for (const name of pulled.sort()) keys.push(name);
    }
    for (const key of keys) {
      try {
        const opened = await this.open(key);
        const restoreFailure = await this.failures.read(key, opened.manifest).catch(() => undefined);
        out.push({ name: key, ...(opened.namespace !== undefined ? { namespace: opened.namespace } : {}), manifest: opened.manifest, ...(restoreFailure !== undefined ? { restoreFailure } : {}) });
      } catch (err) {
        const e = err as StoreError;
        const ns = key.includes('/') ? key.slice(0, key.indexOf('/')) : undefined;
        out.push({ name: key, ...(ns !== undefined ? { namespace: ns } : {}), problem: { code: e.code ?? StoreErrorCode.IO, message: e.message } });
      }
    }
    return out;
  }

  /** Bytes of every file in the checkpoint directory, manifest included (apparent sizes). */
  async sizeOf(name: string): Promise<number> {
    const dir = this.dirOf(name, 'size of checkpoint');
    const step = `size of checkpoint ${name}`;
    await requireExists(this.layout, name, dir, step);
    const tree = await walk(dir, step);
    return tree.files.reduce((a, f) => a + f.stats.size, 0);
  }

  /**
   * Deletes a checkpoint: refused with STORE_IN_USE while any process holds a lease on it. The directory is
   * first renamed to a `.tmp-*` name (it disappears at once and a crash mid-removal is finished by recover()),
   * then removed. A lease taken by another process between the check and the rename is not seen: delete is
   * an operator action and leases are taken by restores that open the checkpoint right after.
   */
  async delete(name: string): Promise<void> {
    const dir = this.dirOf(name, 'delete checkpoint');
    const step = `delete checkpoint ${name}`;
    await requireExists(this.layout, name, dir, step);
    if (await this.isLeased(name)) {
      throw new StoreError(StoreErrorCode.IN_USE, `checkpoint ${name} is in use by a restore`, { step, evidence: { name } });
    }
    const aside = this.layout.inside(this.layout.newTmpName(name), step);
    try {
      await this.stamps.remove(name);
      await this.failures.clear(name);
      await this.lastUse.remove(name);
      await rename(dir, aside);
      await fsyncPath(this.layout.parentOf(name));
      await fsyncPath(this.root);
      await rm(aside, { recursive: true, force: true });
    } catch (err) {
      throw ioError(step, `cannot delete ${dir}`, err);
    }
    this.logger.info('checkpoint deleted', { name });
  }

  /**
   * Marks checkpoint `name` as in use (a restore reads it) until the returned function is called (leases.ts).
   * A lease file whose process is gone (pid and start time) is ignored and removed by recover().
   */
  async acquireLease(name: string): Promise<ReleaseLease> {
    const dir = this.dirOf(name, 'lease checkpoint');
    const step = `lease checkpoint ${name}`;
    await requireExists(this.layout, name, dir, step);
    const release = await this.leases.acquire(name, step);
    await this.lastUse.touch(name, this.logger);
    return release;
  }

  /**
   * Collects least recently used checkpoints no restore uses until `limits` hold, and the file cache's entries
   * no checkpoint links (gc.ts). `dryRun`: report what would go, delete nothing.
   */
  async collectGarbage(limits: StoreLimits, options: { dryRun?: boolean } = {}): Promise<GcResult> {
    const result = await collectGarbage(this, this.lastUse, { limits, logger: this.logger, ...(options.dryRun !== undefined ? { dryRun: options.dryRun } : {}) });
    if (options.dryRun !== true) this.onCollect?.(result);
    return result;
  }

  /**
   * Makes room for a checkpoint about to be written or pulled (its owner and declared or expected size): collects
   * as collectGarbage() does, or throws STORE_NO_ROOM. Call it before anything of the checkpoint is written.
   */
  async makeRoom(limits: StoreLimits, incoming: Incoming): Promise<GcResult> {
    const result = await makeRoom(this, this.lastUse, limits, incoming, this.logger);
    this.onCollect?.(result);
    return result;
  }

  /** When a checkpoint was last published or leased (ms since the epoch), else its manifest's creation. */
  async lastUsedMs(name: string): Promise<number | undefined> {
    const opened = await this.open(name).catch(() => undefined);
    if (opened === undefined) return undefined;
    return this.lastUse.get(name, Date.parse(opened.manifest.createdAt));
  }

  /** True while this instance, or another live instance or process, holds a lease on `name`. */
  async isLeased(name: string): Promise<boolean> {
    return this.leases.isLeased(name);
  }

  /**
   * Brings every file of a checkpoint into the page cache, so that a restore starting soon after reads from
   * memory: a file already cached (mincore) is left alone, any other is read once (src/sys/prefetch.ts).
   * Starts at the first NRI event of a restore, and the restore does not wait for it. Cancellable between
   * chunks (STORE_ABORTED). `bytesRead` says how much it had to read.
   */
  async prefetch(name: string, options: CheckpointPrefetchOptions = {}): Promise<PrefetchResult> {
    this.dirOf(name, 'prefetch checkpoint');
    const step = `prefetch checkpoint ${name}`;
    const started = performance.now();
    const opened = await this.open(name);
    const { first: firstOf, ...rest } = options;
    // Only ranges of the manifest's own files are read (prefetchFiles leaves out any other path).
    const first = firstOf === undefined ? [] : await firstOf(opened).catch((err: unknown) => {
      this.logger.debug('prefetch: no ranges to read first', { name, error: errorMessage(err) });
      return [];
    });
    const { bytes, bytesRead } = await prefetchFiles(
      opened.manifest.files.map((f) => ({ path: join(opened.paths.dir, f.path), size: f.size })),
      this.pageCache,
      { ...rest, first, step, open: (path) => openRegularNoFollow(path, step), aborted: storeAborted(step) },
    );
    const ms = performance.now() - started;
    this.logger.debug('checkpoint prefetched', { name, bytes, bytesRead, ms });
    return { bytes, bytesRead, ms };
  }

  /**
   * Marks `checkpoint` (this very manifest) as failed on this node: the next restore target naming it
   * cold-starts with RESTORE_CHECKPOINT_FAILED_BEFORE until the checkpoint is replaced or the mark cleared.
   */
  async recordRestoreFailure(checkpoint: OpenedCheckpoint, failure: Omit<RestoreFailure, 'name' | 'manifestDigest' | 'manifestId' | 'at'>): Promise<RestoreFailure> {
    this.dirOf(checkpoint.name, 'mark checkpoint failed');
    const record: RestoreFailure = {
      name: checkpoint.name,
      manifestDigest: manifestDigest(checkpoint.manifest),
      manifestId: checkpoint.manifest.id,
      cause: failure.cause,
      reason: failure.reason,
      containerId: failure.containerId,
      pod: failure.pod,
      at: new Date().toISOString(),
    };
    await this.failures.record(record);
    return record;
  }

  /**
   * The restore-failure mark of `name` for this manifest (one small read; undefined when none). A mark of
   * another manifest (the checkpoint was replaced) is removed and not returned.
   */
  async restoreFailure(name: string, manifest: Manifest): Promise<RestoreFailure | undefined> {
    this.dirOf(name, 'read restore-failure mark');
    return this.failures.read(name, manifest);
  }

  /** Clears the mark (the operator's `thaw clear-failure`); true when there was one. */
  async clearRestoreFailure(name: string): Promise<boolean> {
    this.dirOf(name, 'clear restore-failure mark');
    return this.failures.clear(name);
  }

  /** Reads manifest.json without the directory checks of open(); for tools that inspect broken checkpoints. */
  async readManifestUnchecked(name: string): Promise<Manifest> {
    return readManifestUnchecked(this.layout, name);
  }
}
