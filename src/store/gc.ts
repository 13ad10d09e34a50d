/**
 * The store's bounds: a total quota, a quota per owning namespace, and the free space of the store's filesystem,
 * kept by collecting the least recently used checkpoints no restore uses.
 *
 * Last use: `<root>/.used/<key>` (the key's '/' written '+'), whose mtime is when the checkpoint was last
 * published or leased (a restore); a checkpoint without one was last used when its manifest was created. The
 * directory of a checkpoint itself is never written after publication (open() refuses any file its manifest does
 * not list), hence the separate record.
 *
 * Never collected: a checkpoint under a lease (a restore reads it: STORE_IN_USE), and one being written (a
 * `.tmp-*` directory is not a checkpoint yet; a replace swaps atomically). Collected with the checkpoints: their
 * hash stamps and last-use records, and the file cache's entries no checkpoint links any more (link count 1:
 * the cache holds the only name of those bytes).
 *
 * Sizes are the manifests' declared totals: what a checkpoint may hold, known before any byte is written (a
 * pull's files shared through the cache are counted in each checkpoint that links them, so the quota errs on
 * the side of the namespace that would exceed it).
 */
import { lstat, mkdir, readdir, rm, statfs, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { StoreError, StoreErrorCode } from './errors.js';
import { CHECKPOINT_DIR_MODE, CHECKPOINT_FILE_MODE, keyToFileName } from './layout.js';
import type { ListedCheckpoint } from './local-store.js';

export const USED_DIR_NAME = '.used';
/** The file cache's entries (src/store/oci/file-cache.ts; named here so that the store does not import oci/). */
const CACHE_SHA256_DIR = join('.cache', 'sha256');

/** What the store may hold. Absent or undefined limits do not bound. */
export interface StoreLimits {
  /** All checkpoints together (declared bytes). */
  totalQuotaBytes?: number;
  /** Per owning namespace (declared bytes); undefined: that namespace has no quota of its own. */
  namespaceQuotaBytes?: (namespace: string) => number | undefined;
  /** Bytes the store's filesystem keeps free. */
  minFreeBytes?: number;
}

/** A checkpoint as GC sees it. */
export interface GcCandidate {
  name: string;
  namespace?: string;
  bytes: number;
  /** ms since the epoch. */
  lastUsedMs: number;
}

export interface GcResult {
  /** What was (or, with dryRun, would be) collected, in the order chosen: least recently used first. */
  collected: GcCandidate[];
  bytes: number;
  /** File cache entries no checkpoint links any more, and their bytes. */
  cacheFiles: number;
  cacheBytes: number;
  /** Why a limit could not be met (everything left over it is leased), when one could not. */
  unmet?: string;
}

/** What GC needs of its store (the facade's methods). */
export interface GcStore {
  readonly root: string;
  list(): Promise<ListedCheckpoint[]>;
  isLeased(name: string): Promise<boolean>;
  delete(name: string): Promise<void>;
}

export class LastUse {
  constructor(
    private readonly root: string,
    private readonly now: () => Date,
  ) {}

  pathOf(name: string): string {
    return join(this.root, USED_DIR_NAME, keyToFileName(name));
  }

  /** Records a use now (a failure only makes the checkpoint look older). */
  async touch(name: string, logger: Logger): Promise<void> {
    const path = this.pathOf(name);
    const t = this.now();
    try {
      await mkdir(join(this.root, USED_DIR_NAME), { mode: CHECKPOINT_DIR_MODE, recursive: true });
      await writeFile(path, '', { mode: CHECKPOINT_FILE_MODE });
      await utimes(path, t, t);
    } catch (err) {
      logger.warn('cannot record the use of a checkpoint; it looks older to the store\'s collection', { name, error: (err as Error).message });
    }
  }

  async get(name: string, fallbackMs: number): Promise<number> {
    const st = await lstat(this.pathOf(name)).catch(() => undefined);
    return st?.isFile() ? st.mtimeMs : fallbackMs;
  }

  async remove(name: string): Promise<void> {
    await rm(this.pathOf(name), { force: true });
  }
}

/** The store's checkpoints with their sizes and last use, least recently used first (name breaks ties). */
export async function candidates(store: GcStore, lastUse: LastUse): Promise<GcCandidate[]> {
  const out: GcCandidate[] = [];
  for (const l of await store.list()) {
    // A broken checkpoint is listed for the operator to look at; GC leaves it (its size is not known).
    if (l.manifest === undefined) continue;
    const created = Date.parse(l.manifest.createdAt);
    out.push({
      name: l.name,
      ...(l.namespace !== undefined ? { namespace: l.namespace } : {}),
      bytes: l.manifest.totals.bytes,
      lastUsedMs: await lastUse.get(l.name, Number.isFinite(created) ? created : 0),
    });
  }
  return out.sort((a, b) => a.lastUsedMs - b.lastUsedMs || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** Bytes free for the store on its filesystem. */
export async function freeBytes(root: string): Promise<number> {
  const fs = await statfs(root);
  return fs.bavail * fs.bsize;
}

/** A checkpoint about to be written: its owner and declared size. */
export interface Incoming {
  namespace?: string;
  bytes: number;
  /** Its key: a replace frees what it replaces. */
  name?: string;
}

/**
 * Chooses what to collect so that the limits hold with `incoming` added: per namespace first (only that
 * namespace's checkpoints), then the total and the free space (any checkpoint), least recently used first,
 * skipping leased ones. Pure but for the lease and statfs reads; deletes nothing.
 */
async function plan(store: GcStore, lastUse: LastUse, limits: StoreLimits, incoming: Incoming | undefined): Promise<{ chosen: GcCandidate[]; unmet?: string }> {
  const all = await candidates(store, lastUse);
  const leased = new Set<string>();
  for (const c of all) if (await store.isLeased(c.name)) leased.add(c.name);
  const chosen: GcCandidate[] = [];
  const gone = new Set<string>();
  // A replace: the checkpoint it replaces goes when it is published (unless leased, when publish refuses).
  const replaced = incoming?.name !== undefined ? all.find((c) => c.name === incoming.name) : undefined;
  const live = (): GcCandidate[] => all.filter((c) => !gone.has(c.name) && c !== replaced);
  const collect = (filter: (c: GcCandidate) => boolean): boolean => {
    const next = live().find((c) => filter(c) && !leased.has(c.name));
    if (next === undefined) return false;
    gone.add(next.name);
    chosen.push(next);
    return true;
  };
  const sum = (cs: GcCandidate[]): number => cs.reduce((a, c) => a + c.bytes, 0);
  const adding = incoming?.bytes ?? 0;
  let unmet: string | undefined;
  const namespaces = new Set(all.map((c) => c.namespace).filter((n): n is string => n !== undefined));
  if (incoming?.namespace !== undefined) namespaces.add(incoming.namespace);
  for (const ns of [...namespaces].sort()) {
    const quota = limits.namespaceQuotaBytes?.(ns);
    if (quota === undefined) continue;
    const extra = incoming?.namespace === ns ? adding : 0;
    while (sum(live().filter((c) => c.namespace === ns)) + extra > quota) {
      if (!collect((c) => c.namespace === ns)) {
        unmet ??= `namespace ${ns} holds ${sum(live().filter((c) => c.namespace === ns))} bytes${extra > 0 ? ` and needs ${extra} more` : ''}; its quota is ${quota}, and what is left is in use by restores (or nothing is left)`;
        break;
      }
    }
  }
  if (limits.totalQuotaBytes !== undefined) {
    while (sum(live()) + adding > limits.totalQuotaBytes) {
      if (!collect(() => true)) {
        unmet ??= `the store holds ${sum(live())} bytes${adding > 0 ? ` and needs ${adding} more` : ''}; its quota is ${limits.totalQuotaBytes}, and what is left is in use by restores (or nothing is left)`;
        break;
      }
    }
  }
  if (adding > 0 || limits.minFreeBytes !== undefined) {
    const free = await freeBytes(store.root);
    const keep = limits.minFreeBytes ?? 0;
    // What collecting frees is estimated by declared sizes (files shared through the cache free less).
    while (free + sum(chosen) + (replaced?.bytes ?? 0) - adding < keep) {
      if (!collect(() => true)) {
        unmet ??= `the store's filesystem has ${free} bytes free${adding > 0 ? `, ${adding} are needed` : ''} and ${keep} are kept free; what is left is in use by restores (or nothing is left)`;
        break;
      }
    }
  }
  return { chosen, ...(unmet !== undefined ? { unmet } : {}) };
}

/** File cache entries that no checkpoint links (link count 1), with their sizes. */
async function unlinkedCacheFiles(root: string): Promise<Array<{ path: string; bytes: number }>> {
  const dir = join(root, CACHE_SHA256_DIR);
  const names = await readdir(dir).catch(() => [] as string[]);
  const out: Array<{ path: string; bytes: number }> = [];
  for (const name of names.sort()) {
    const st = await lstat(join(dir, name)).catch(() => undefined);
    if (st?.isFile() && st.nlink === 1) out.push({ path: join(dir, name), bytes: st.size });
  }
  return out;
}

export interface CollectOptions {
  limits: StoreLimits;
  /** Make room for this too (a checkpoint about to be written or pulled). */
  incoming?: Incoming;
  /** Choose and report, delete nothing. */
  dryRun?: boolean;
  /** Collect nothing when the limits cannot be met (makeRoom: the checkpoint is refused anyway). */
  allOrNothing?: boolean;
  logger: Logger;
}

/**
 * Collects least recently used checkpoints until the limits hold (with `incoming` added), then the file cache's
 * unlinked entries. A checkpoint leased meanwhile is skipped (delete refuses it) and the next one taken.
 */
export async function collectGarbage(store: GcStore, lastUse: LastUse, o: CollectOptions): Promise<GcResult> {
  let { chosen, unmet } = await plan(store, lastUse, o.limits, o.incoming);
  const collected: GcCandidate[] = [];
  // Room that cannot be made is refused before anything is collected for it.
  if (o.allOrNothing === true && unmet !== undefined) return { collected: [], bytes: 0, cacheFiles: 0, cacheBytes: 0, unmet };
  if (o.dryRun === true) {
    collected.push(...chosen);
  } else {
    for (let round = 0; round < 4 && chosen.length > 0; round++) {
      let raced = false;
      for (const c of chosen) {
        try {
          await store.delete(c.name);
          collected.push(c);
          o.logger.info('checkpoint collected (least recently used)', { name: c.name, namespace: c.namespace ?? '', bytes: c.bytes, lastUsed: new Date(c.lastUsedMs).toISOString() });
        } catch (err) {
          if ((err as StoreError).code !== StoreErrorCode.IN_USE && (err as StoreError).code !== StoreErrorCode.NOT_FOUND) throw err;
          raced = true; // leased (or removed) since the plan: plan again without it
        }
      }
      if (!raced) break;
      ({ chosen, unmet } = await plan(store, lastUse, o.limits, o.incoming));
    }
  }
  const cache = await unlinkedCacheFiles(store.root);
  if (o.dryRun !== true) for (const f of cache) await rm(f.path, { force: true });
  if (cache.length > 0 && o.dryRun !== true) o.logger.info('file cache entries collected (no checkpoint links them)', { files: cache.length, bytes: cache.reduce((a, f) => a + f.bytes, 0) });
  return {
    collected,
    bytes: collected.reduce((a, c) => a + c.bytes, 0),
    cacheFiles: cache.length,
    cacheBytes: cache.reduce((a, f) => a + f.bytes, 0),
    ...(unmet !== undefined ? { unmet } : {}),
  };
}

/**
 * Makes room for `incoming` (collecting as collectGarbage does) or throws STORE_NO_ROOM, before anything of it is
 * written: a 10 TB manifest is refused after a statfs and a listing.
 */
export async function makeRoom(store: GcStore, lastUse: LastUse, limits: StoreLimits, incoming: Incoming, logger: Logger): Promise<GcResult> {
  const result = await collectGarbage(store, lastUse, { limits, incoming, logger, allOrNothing: true });
  if (result.unmet !== undefined) {
    throw new StoreError(StoreErrorCode.NO_ROOM, `no room for ${incoming.bytes} bytes${incoming.namespace !== undefined ? ` of namespace ${incoming.namespace}` : ''}: ${result.unmet}`, {
      step: 'make room in the store',
      evidence: { bytes: incoming.bytes, namespace: incoming.namespace, collected: result.collected.map((c) => c.name) },
    });
  }
  return result;
}
