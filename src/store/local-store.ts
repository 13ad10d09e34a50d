/**
 * The local checkpoint store (design.md, Store): one directory per checkpoint under a root
 * (default /var/lib/thaw/checkpoints):
 *
 *   <root>/<name>/manifest.json        see manifest.ts
 *   <root>/<name>/criu/                CRIU image files
 *   <root>/<name>/rootfs-diff.tar      the container's overlay upperdir
 *   <root>/<name>/deleted-files.json   the upperdir's whiteouts
 *   <root>/.tmp-<name>-<pid>-<start>-<random>/  a checkpoint being written, or an old one being removed
 *   <root>/.leases/<name>@<pid>-<start>-<token>  "this process is reading <name>" (see acquireLease)
 *
 * Directories are 0700 and files 0600, owned by root: a checkpoint is process memory, secrets included.
 *
 * Crash safety: a checkpoint is written into a `.tmp-*` directory, every file and directory is fsynced,
 * and only then is the directory renamed to its name (renameat2 RENAME_NOREPLACE, or RENAME_EXCHANGE to
 * replace one atomically). A crash at any point leaves at most a `.tmp-*` directory, which recover() (run by
 * openLocalStore) removes. `.tmp-*` names carry the writer's pid and start time so that a store opened by a
 * second process (the CLI beside the agent) leaves a live writer's directory alone. The processes using one
 * store are expected to share the host's pid namespace (the agent runs with hostPID).
 *
 * Path safety: names pass the checkpoint name rule; every path is resolved under the root and checked to
 * stay there; checkpoint files are opened with O_NOFOLLOW and any symlink, device or FIFO found inside a
 * checkpoint directory is refused (STORE_PATH_ESCAPE), so a planted link cannot make thaw read, hash or
 * chmod a file outside the store.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { constants as fsConstants, readFileSync, type Stats } from 'node:fs';
import { chmod, lchown, lstat, mkdir, open, readdir, realpath, rename, rm, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { join, resolve, sep } from 'node:path';
import { checkCheckpointName } from '../checkpoint-name.js';
import { silentLogger, type Logger } from '../log.js';
import { DEFAULT_FILE_CONCURRENCY, forEachLimit, hashFile, hashHandle, openRegularNoFollow } from './digest.js';
import { StoreError, StoreErrorCode, throwIfAborted } from './errors.js';
import {
  CRIU_DIR_NAME,
  DELETED_FILES_FILE_NAME,
  MANIFEST_FILE_NAME,
  MANIFEST_KIND,
  MANIFEST_SCHEMA_VERSION,
  ROOTFS_DIFF_FILE_NAME,
  checkRelativePath,
  parseManifest,
  type Manifest,
  type ManifestFields,
  type ManifestFile,
} from './manifest.js';
import { bindPageCache, type PageCache } from './page-cache.js';
import { bindRenameAt2, errnoOf, RENAME_EXCHANGE, RENAME_NOREPLACE, type RenameAt2 } from './rename.js';
import { DEFAULT_STORE_ROOT } from '../defaults.js';

export const CHECKPOINT_DIR_MODE = 0o700;
export const CHECKPOINT_FILE_MODE = 0o600;
/** Readers of the prefetch; each holds one PREFETCH_CHUNK_BYTES buffer. */
export const DEFAULT_PREFETCH_CONCURRENCY = 4;
/** A large file is prefetched as segments of this size, read by several readers at once, in file order. */
export const PREFETCH_SEGMENT_BYTES = 64 * 1024 * 1024;
/** Read size of the prefetch: large reads keep the disk queue full; one buffer per reader. */
export const PREFETCH_CHUNK_BYTES = 8 * 1024 * 1024;
/** A file at least this much in the page cache is not read again. */
export const PREFETCH_RESIDENT_FRACTION = 0.99;

const TMP_PREFIX = '.tmp-';
const LEASES_DIR_NAME = '.leases';
const TMP_PATTERN = /^\.tmp-(.+)-(\d+)-(\d+)-([0-9a-f]{16})$/;
const LEASE_PATTERN = /^(.+)@(\d+)-(\d+)-([0-9a-f]{8})$/;

export interface LocalStoreOptions {
  /** Store root; default DEFAULT_STORE_ROOT. Created 0700 when missing. */
  root?: string;
  logger?: Logger;
  /** uid that must own every checkpoint directory and file (default 0: root). */
  ownerUid?: number;
  /** Files hashed at once by publish() and verify() (default DEFAULT_FILE_CONCURRENCY). */
  hashConcurrency?: number;
  /** Clock for manifest.createdAt; injectable for tests. */
  now?: () => Date;
}

export interface CheckpointPaths {
  dir: string;
  manifest: string;
  criuDir: string;
  rootfsDiff: string;
  deletedFiles: string;
}

export interface OpenedCheckpoint {
  name: string;
  manifest: Manifest;
  paths: CheckpointPaths;
}

export interface ListedCheckpoint {
  name: string;
  /** Present when the checkpoint opened cleanly. */
  manifest?: Manifest;
  /** Why it did not (a corrupt or foreign directory is listed, not hidden, so that an operator can delete it). */
  problem?: { code: string; message: string };
}

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
}

/** Where verify() keeps, per checkpoint, the file identities it last hashed successfully. */
export const VERIFIED_STAMPS_DIR = '.verified';

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

export interface PrefetchResult {
  /** Bytes of the checkpoint's files. */
  bytes: number;
  /** Bytes read because they were not in the page cache. */
  bytesRead: number;
  ms: number;
}

export interface PublishOptions {
  signal?: AbortSignal;
  /** Atomically replace a checkpoint of the same name (refused with STORE_IN_USE while it is leased). */
  replace?: boolean;
}

/** Release a lease; idempotent. */
export type ReleaseLease = () => Promise<void>;

function pathsOf(dir: string): CheckpointPaths {
  return {
    dir,
    manifest: join(dir, MANIFEST_FILE_NAME),
    criuDir: join(dir, CRIU_DIR_NAME),
    rootfsDiff: join(dir, ROOTFS_DIFF_FILE_NAME),
    deletedFiles: join(dir, DELETED_FILES_FILE_NAME),
  };
}

function ioError(step: string, what: string, err: unknown): StoreError {
  return new StoreError(StoreErrorCode.IO, `${what}: ${(err as Error).message}`, {
    step,
    cause: err,
    evidence: { errno: (err as NodeJS.ErrnoException).code },
  });
}

/**
 * A process's start time (field 22 of /proc/<pid>/stat, in clock ticks since boot), or undefined when it is
 * gone. pid + start time names one process for good: a reused pid has another start time.
 */
function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command (which may contain spaces and ')'): state is field 3, starttime field 22.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function processAlive(pid: number, startTime: string): boolean {
  return processStartTime(pid) === startTime;
}

async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

interface Tree {
  /** Relative posix paths of regular files, sorted. */
  files: Array<{ path: string; stats: Stats }>;
  /** Relative paths of directories, parents before children ('' is the top). */
  dirs: Array<{ path: string; stats: Stats }>;
}

/** Lists a checkpoint directory with lstat, refusing anything but regular files and directories. */
async function walk(top: string, step: string): Promise<Tree> {
  const tree: Tree = { files: [], dirs: [{ path: '', stats: await lstat(top) }] };
  const visit = async (rel: string): Promise<void> => {
    const entries = await readdir(join(top, rel));
    entries.sort();
    for (const entry of entries) {
      const childRel = rel === '' ? entry : `${rel}/${entry}`;
      const st = await lstat(join(top, childRel));
      if (st.isDirectory()) {
        tree.dirs.push({ path: childRel, stats: st });
        await visit(childRel);
      } else if (st.isFile()) {
        tree.files.push({ path: childRel, stats: st });
      } else {
        const kind = st.isSymbolicLink() ? 'a symlink' : 'not a regular file or directory';
        throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${childRel} is ${kind} (a checkpoint holds only files and directories)`, {
          step,
          evidence: { path: join(top, childRel), mode: st.mode },
        });
      }
    }
  };
  await visit('');
  return tree;
}

/**
 * Opens (creating when missing) the store at `options.root` and runs recover(). The root must not be
 * writable by group or others, and must be owned by `ownerUid`.
 */
export async function openLocalStore(options: LocalStoreOptions = {}): Promise<LocalStore> {
  const step = 'open checkpoint store';
  const requested = resolve(options.root ?? DEFAULT_STORE_ROOT);
  const ownerUid = options.ownerUid ?? 0;
  try {
    await mkdir(requested, { recursive: true, mode: CHECKPOINT_DIR_MODE });
  } catch (err) {
    throw ioError(step, `cannot create store root ${requested}`, err);
  }
  // Containment checks compare canonical paths: a root reached through a symlink is resolved once, here.
  const root = await realpath(requested);
  const st = await stat(root);
  if ((st.mode & 0o022) !== 0 || st.uid !== ownerUid) {
    throw new StoreError(
      StoreErrorCode.INSECURE_PERMISSIONS,
      `store root ${root} is mode ${(st.mode & 0o777).toString(8)} owned by uid ${st.uid} (must be owned by uid ${ownerUid} and not writable by group or others)`,
      { step, evidence: { root, mode: st.mode & 0o7777, uid: st.uid } },
    );
  }
  const store = new LocalStore(root, options);
  await store.recover();
  return store;
}

export class LocalStore {
  readonly root: string;
  private readonly logger: Logger;
  private readonly ownerUid: number;
  private readonly hashConcurrency: number;
  private readonly now: () => Date;
  private readonly renameAt2: RenameAt2;
  private readonly pageCache: PageCache;
  /** This process, as `<pid>-<start time>`, in `.tmp-*` and lease names (see recover). */
  private readonly processTag: string;
  /** Tells this instance's lease files from other instances' of the same process. */
  private readonly instanceToken = randomBytes(4).toString('hex');
  /** name → number of leases this process holds. */
  private readonly leaseCounts = new Map<string, number>();

  /** Use openLocalStore(), which checks the root and recovers. */
  constructor(root: string, options: LocalStoreOptions) {
    this.root = root;
    this.logger = (options.logger ?? silentLogger).child({ component: 'store' });
    this.ownerUid = options.ownerUid ?? 0;
    this.hashConcurrency = options.hashConcurrency ?? DEFAULT_FILE_CONCURRENCY;
    this.now = options.now ?? (() => new Date());
    this.renameAt2 = bindRenameAt2();
    this.pageCache = bindPageCache();
    this.processTag = `${process.pid}-${processStartTime(process.pid) ?? '0'}`;
  }

  /**
   * Validates a name and returns `<root>/<name>`; STORE_INVALID_NAME with the rule's reason otherwise. Callers
   * name their step without the name until it is valid: a bad name may hold NUL or escapes, and the reason
   * already quotes it.
   */
  dirOf(name: string, step = 'resolve checkpoint name'): string {
    const bad = checkCheckpointName(name);
    if (bad !== undefined) throw new StoreError(StoreErrorCode.INVALID_NAME, bad, { step, evidence: { name } });
    return this.inside(name, step);
  }

  /** Paths of a published checkpoint (nothing is checked on disk; use open() for that). */
  pathsOf(name: string): CheckpointPaths {
    return pathsOf(this.dirOf(name));
  }

  /** Resolves `rel` under the root and refuses a result outside it. */
  private inside(rel: string, step: string, base = this.root): string {
    const path = resolve(base, rel);
    if (!path.startsWith(this.root + sep)) {
      throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${JSON.stringify(rel)} resolves outside the store (${path})`, {
        step,
        evidence: { rel, path },
      });
    }
    return path;
  }

  private newTmpName(name: string): string {
    return `${TMP_PREFIX}${name}-${this.processTag}-${randomBytes(8).toString('hex')}`;
  }

  /**
   * Removes what a crashed writer (or an interrupted delete/replace) left: `.tmp-*` directories whose writer
   * is gone, and lease files of dead processes. "Gone" is judged by pid and process start time, so a
   * directory of a live writer (this process included) is kept, and one of an earlier process that had the
   * same pid (an agent restarted as pid 1 of its container) is removed. A `.tmp-*` name without a writer
   * tag is removed. Called by openLocalStore; safe to call again. Returns the removed paths, each logged.
   */
  async recover(): Promise<string[]> {
    const step = 'recover checkpoint store';
    const removed: string[] = [];
    for (const entry of await readdir(this.root)) {
      if (!entry.startsWith(TMP_PREFIX)) continue;
      const match = TMP_PATTERN.exec(entry);
      const pid = match ? Number(match[2]) : undefined;
      // A live process's directory is a checkpoint being written (or removed) right now.
      if (match && processAlive(pid!, match[3]!)) continue;
      const path = join(this.root, entry);
      try {
        await rm(path, { recursive: true, force: true });
      } catch (err) {
        throw ioError(step, `cannot remove ${path}`, err);
      }
      removed.push(path);
      this.logger.info('removed an unfinished checkpoint directory', { path, writerPid: pid });
    }
    for (const lease of await this.leaseFiles()) {
      if (!processAlive(lease.pid, lease.startTime)) {
        await rm(lease.path, { force: true });
        removed.push(lease.path);
        this.logger.info('removed a stale checkpoint lease', { path: lease.path, pid: lease.pid });
      }
    }
    return removed;
  }

  /**
   * Starts writing checkpoint `name`: creates `<root>/.tmp-<name>-<pid>-<start>-<random>/` (0700) with an empty
   * `criu/`. The checkpoint flow writes its files there (PendingCheckpoint.paths), then publish() or abort().
   * Nothing is visible under `name` until publish() succeeds.
   */
  async beginCheckpoint(name: string): Promise<PendingCheckpoint> {
    const step = 'begin checkpoint';
    this.dirOf(name, step);
    const tmpName = this.newTmpName(name);
    const dir = this.inside(tmpName, step);
    try {
      await mkdir(dir, { mode: CHECKPOINT_DIR_MODE });
      await chmod(dir, CHECKPOINT_DIR_MODE); // the umask may have narrowed or (rarely) the mode differs
      await mkdir(join(dir, CRIU_DIR_NAME), { mode: CHECKPOINT_DIR_MODE });
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw ioError(step, `cannot create ${dir}`, err);
    }
    this.logger.debug('checkpoint started', { name, dir });
    return new PendingCheckpoint(this, name, tmpName, dir);
  }

  /** @internal PendingCheckpoint.publish's body: hash, write the manifest, fsync, rename into place. */
  async publishDir(pending: PendingCheckpoint, fields: ManifestFields, options: PublishOptions): Promise<OpenedCheckpoint> {
    const step = 'publish checkpoint';
    const { name, dir } = pending;
    const signal = options.signal;
    const tree = await walk(dir, step);
    if (tree.files.some((f) => f.path === MANIFEST_FILE_NAME)) {
      throw new StoreError(StoreErrorCode.BAD_STATE, `${MANIFEST_FILE_NAME} is written by the store, not by the checkpoint flow`, { step });
    }
    const files: ManifestFile[] = new Array(tree.files.length);
    const chown = process.getuid?.() === 0;
    await forEachLimit(
      tree.files,
      this.hashConcurrency,
      async (file, index) => {
        const fh = await openRegularNoFollow(join(dir, file.path), step);
        try {
          await fh.chmod(CHECKPOINT_FILE_MODE);
          if (chown) await fh.chown(this.ownerUid, 0);
          const digest = await hashHandle(fh, { signal, step });
          await fh.sync();
          files[index] = { path: file.path, size: digest.size, sha256: digest.sha256, mode: CHECKPOINT_FILE_MODE };
        } finally {
          await fh.close();
        }
      },
      { signal, step },
    );
    for (const d of tree.dirs) {
      await chmod(join(dir, d.path), CHECKPOINT_DIR_MODE);
      if (chown) await lchown(join(dir, d.path), this.ownerUid, 0);
    }
    const totals: Manifest['totals'] = { bytes: files.reduce((a, f) => a + f.size, 0), fileCount: files.length };
    if (fields.liveBytes !== undefined) totals.liveBytes = fields.liveBytes;
    return this.finishPublish(pending, {
      schemaVersion: MANIFEST_SCHEMA_VERSION,
      kind: MANIFEST_KIND,
      name,
      id: randomUUID(),
      createdAt: this.now().toISOString(),
      source: fields.source,
      constraints: fields.constraints,
      criu: fields.criu,
      files,
      totals,
      timings: fields.timings ?? { phaseMs: {} },
    }, tree, options, step);
  }

  /**
   * @internal PendingCheckpoint.publishVerified's body: a checkpoint whose files were written and checked
   * elsewhere (pulled from a registry, every byte's sha256 checked on the way) is published under the given
   * manifest as it is (its id kept; its name becomes the pending name). The files on disk must be exactly the
   * manifest's, by path and size; they are not hashed again.
   */
  async publishVerifiedDir(pending: PendingCheckpoint, manifest: Manifest, options: PublishOptions): Promise<OpenedCheckpoint> {
    const step = 'publish checkpoint';
    const { dir } = pending;
    const tree = await walk(dir, step);
    const onDisk = new Map(tree.files.map((f) => [f.path, f.stats.size]));
    for (const file of manifest.files) {
      const size = onDisk.get(file.path);
      if (size === undefined) throw new StoreError(StoreErrorCode.FILE_MISSING, `${file.path} was not written`, { step, evidence: { file: file.path } });
      if (size !== file.size) {
        throw new StoreError(StoreErrorCode.DIGEST_MISMATCH, `${file.path} is ${size} bytes, the manifest says ${file.size}`, { step, evidence: { file: file.path, expectedSize: file.size, actualSize: size } });
      }
      onDisk.delete(file.path);
    }
    if (onDisk.size > 0) throw new StoreError(StoreErrorCode.FILE_UNEXPECTED, `${[...onDisk.keys()][0]} is not in the manifest`, { step, evidence: { files: [...onDisk.keys()] } });
    const chown = process.getuid?.() === 0;
    await forEachLimit(
      tree.files,
      this.hashConcurrency,
      async (file) => {
        const fh = await openRegularNoFollow(join(dir, file.path), step);
        try {
          if ((file.stats.mode & 0o7777) !== CHECKPOINT_FILE_MODE) await fh.chmod(CHECKPOINT_FILE_MODE);
          if (chown && file.stats.uid !== this.ownerUid) await fh.chown(this.ownerUid, 0);
          await fh.sync();
        } finally {
          await fh.close();
        }
      },
      { signal: options.signal, step },
    );
    for (const d of tree.dirs) {
      await chmod(join(dir, d.path), CHECKPOINT_DIR_MODE);
      if (chown) await lchown(join(dir, d.path), this.ownerUid, 0);
    }
    return this.finishPublish(pending, { ...manifest, name: pending.name }, tree, options, step);
  }

  /** Writes manifest.json, fsyncs, renames into place and records the files as verified. */
  private async finishPublish(pending: PendingCheckpoint, manifest: Manifest, tree: Tree, options: PublishOptions, step: string): Promise<OpenedCheckpoint> {
    const { name, dir } = pending;
    const signal = options.signal;
    const totals = manifest.totals;
    // What we write must be what open() accepts: a bad field from the checkpoint flow fails here, not at restore.
    parseManifest(JSON.parse(JSON.stringify(manifest)));
    const manifestPath = join(dir, MANIFEST_FILE_NAME);
    throwIfAborted(signal, step);
    try {
      const fh = await open(manifestPath, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, CHECKPOINT_FILE_MODE);
      try {
        await fh.writeFile(`${JSON.stringify(manifest, null, 2)}\n`);
        await fh.chmod(CHECKPOINT_FILE_MODE);
        await fh.sync();
      } finally {
        await fh.close();
      }
      // Children before parents, so that every entry a directory names is durable before the directory is.
      for (const d of [...tree.dirs].reverse()) await fsyncPath(join(dir, d.path));
    } catch (err) {
      await rm(manifestPath, { force: true });
      throw ioError(step, `cannot write ${manifestPath}`, err);
    }
    try {
      throwIfAborted(signal, step);
      await this.renameIntoPlace(pending, options.replace === true, step);
    } catch (err) {
      // Leave the directory as the flow wrote it (minus our manifest), so publish can be retried or aborted.
      await rm(manifestPath, { force: true });
      throw err;
    }
    this.logger.info('checkpoint published', { name, id: manifest.id, bytes: totals.bytes, files: totals.fileCount });
    const publishedDir = join(this.root, name);
    // Every file was just hashed in our own 0700 directory: the first restore need not hash it again.
    const identities = Object.fromEntries(
      await Promise.all(manifest.files.map(async (f) => [f.path, await fileIdentity(join(publishedDir, f.path))] as const)),
    );
    await this.writeStamp(join(this.root, VERIFIED_STAMPS_DIR, `${name}.json`), { id: manifest.id, files: identities });
    return { name, manifest, paths: pathsOf(publishedDir) };
  }

  private async renameIntoPlace(pending: PendingCheckpoint, replace: boolean, step: string): Promise<void> {
    const target = this.dirOf(pending.name, step);
    const exists = (): StoreError =>
      new StoreError(StoreErrorCode.EXISTS, `checkpoint ${pending.name} exists (publish with replace: true to replace it)`, {
        step,
        evidence: { name: pending.name },
      });
    let errno = this.renameAt2(pending.dir, target, RENAME_NOREPLACE);
    if (errno === errnoOf('EINVAL') || errno === errnoOf('ENOSYS')) {
      // This filesystem lacks renameat2 flags: check then rename (racy only against another publisher).
      if (await lstat(target).then(() => true, () => false)) errno = errnoOf('EEXIST');
      else errno = await rename(pending.dir, target).then(() => 0, (err: NodeJS.ErrnoException) => err.errno ?? -1);
    }
    if (errno === 0) {
      await fsyncPath(this.root);
      return;
    }
    if (errno !== errnoOf('EEXIST') && errno !== errnoOf('ENOTEMPTY')) {
      throw new StoreError(StoreErrorCode.IO, `cannot rename ${pending.dir} to ${target} (errno ${errno})`, { step, evidence: { errno } });
    }
    if (!replace) throw exists();
    if (await this.isLeased(pending.name)) {
      throw new StoreError(StoreErrorCode.IN_USE, `checkpoint ${pending.name} is in use by a restore; not replaced`, {
        step,
        evidence: { name: pending.name },
      });
    }
    // The swap leaves the old checkpoint under our .tmp name: removed below, or by recover() after a crash.
    errno = this.renameAt2(pending.dir, target, RENAME_EXCHANGE);
    if (errno === errnoOf('EINVAL') || errno === errnoOf('ENOSYS')) {
      const aside = join(this.root, this.newTmpName(pending.name));
      await rename(target, aside);
      await rename(pending.dir, target); // a moment without <name>; only where RENAME_EXCHANGE is missing
      await rename(aside, pending.dir);
      errno = 0;
    }
    if (errno !== 0) {
      throw new StoreError(StoreErrorCode.IO, `cannot exchange ${pending.dir} and ${target} (errno ${errno})`, { step, evidence: { errno } });
    }
    await fsyncPath(this.root);
    await rm(pending.dir, { recursive: true, force: true });
    this.logger.info('replaced checkpoint; removed the old one', { name: pending.name });
  }

  /** @internal PendingCheckpoint.abort's body. */
  async abortDir(pending: PendingCheckpoint): Promise<void> {
    await rm(pending.dir, { recursive: true, force: true });
    this.logger.info('checkpoint aborted', { name: pending.name, dir: pending.dir });
  }

  /**
   * Opens a published checkpoint: checks its permissions (dir 0700, files 0600, owner), parses its manifest,
   * and compares the files on disk with the manifest by name and size (cheap: no hashing; verify() hashes).
   * Errors: STORE_INVALID_NAME, STORE_NOT_FOUND, STORE_INSECURE_PERMISSIONS, STORE_PATH_ESCAPE,
   * STORE_MANIFEST_INVALID, STORE_FILE_MISSING, STORE_FILE_UNEXPECTED, STORE_DIGEST_MISMATCH (size).
   */
  async open(name: string): Promise<OpenedCheckpoint> {
    const dir = this.dirOf(name, 'open checkpoint');
    const step = `open checkpoint ${name}`;
    let top: Stats;
    try {
      top = await lstat(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new StoreError(StoreErrorCode.NOT_FOUND, `no checkpoint named ${name} in ${this.root}`, { step, evidence: { name } });
      }
      throw ioError(step, `cannot stat ${dir}`, err);
    }
    if (!top.isDirectory()) {
      throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${dir} is not a directory${top.isSymbolicLink() ? ' (a symlink)' : ''}`, { step });
    }
    const tree = await walk(dir, step);
    for (const d of tree.dirs) this.checkOwnership(join(dir, d.path), d.stats, CHECKPOINT_DIR_MODE, step);
    for (const f of tree.files) this.checkOwnership(join(dir, f.path), f.stats, CHECKPOINT_FILE_MODE, step);
    const paths = pathsOf(dir);
    if (!tree.files.some((f) => f.path === MANIFEST_FILE_NAME)) {
      throw new StoreError(StoreErrorCode.MANIFEST_INVALID, `checkpoint ${name} has no ${MANIFEST_FILE_NAME} (an unfinished or foreign directory)`, {
        step,
        evidence: { path: paths.manifest },
      });
    }
    const fh = await openRegularNoFollow(paths.manifest, step);
    let manifest: Manifest;
    try {
      manifest = parseManifest(await fh.readFile('utf8'));
    } finally {
      await fh.close();
    }
    if (manifest.name !== name) {
      throw new StoreError(StoreErrorCode.MANIFEST_INVALID, `manifest.name is ${JSON.stringify(manifest.name)} but the directory is ${JSON.stringify(name)}`, {
        step,
      });
    }
    const onDisk = new Map(tree.files.map((f) => [f.path, f.stats.size]));
    onDisk.delete(MANIFEST_FILE_NAME);
    for (const file of manifest.files) {
      const bad = checkRelativePath(file.path);
      if (bad !== undefined) throw new StoreError(StoreErrorCode.PATH_ESCAPE, `manifest path ${JSON.stringify(file.path)} ${bad}`, { step });
      this.inside(file.path, step, dir);
      const size = onDisk.get(file.path);
      if (size === undefined) {
        throw new StoreError(StoreErrorCode.FILE_MISSING, `${file.path} is listed in the manifest but missing from checkpoint ${name}`, {
          step,
          evidence: { file: file.path },
        });
      }
      if (size !== file.size) {
        throw new StoreError(StoreErrorCode.DIGEST_MISMATCH, `${file.path} is ${size} bytes, the manifest says ${file.size} (truncated or rewritten)`, {
          step,
          evidence: { file: file.path, expectedSize: file.size, actualSize: size },
        });
      }
      onDisk.delete(file.path);
    }
    const extra = [...onDisk.keys()];
    if (extra.length > 0) {
      throw new StoreError(StoreErrorCode.FILE_UNEXPECTED, `${extra[0]} is in checkpoint ${name} but not in its manifest`, {
        step,
        evidence: { files: extra },
      });
    }
    return { name, manifest, paths };
  }

  private checkOwnership(path: string, st: Stats, mode: number, step: string): void {
    if ((st.mode & 0o7777) !== mode || st.uid !== this.ownerUid) {
      throw new StoreError(
        StoreErrorCode.INSECURE_PERMISSIONS,
        `${path} is mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')} owned by uid ${st.uid} (must be ${mode.toString(8).padStart(4, '0')} owned by uid ${this.ownerUid})`,
        { step, evidence: { path, mode: st.mode & 0o7777, uid: st.uid } },
      );
    }
  }

  /**
   * Re-hashes every file of a checkpoint against its manifest (after open()'s checks). Throws
   * STORE_DIGEST_MISMATCH naming the first bad file (manifest order) with expected and actual digests;
   * `evidence.mismatches` lists them all.
   */
  async verify(name: string, options: VerifyOptions = {}): Promise<VerifyResult> {
    this.dirOf(name, 'verify checkpoint');
    const step = `verify checkpoint ${name}`;
    throwIfAborted(options.signal, step);
    const started = performance.now();
    const opened = await this.open(name);
    const files = opened.manifest.files;
    // Identities are taken before hashing: a file changed while it is hashed then fails the next comparison.
    const identities = Object.fromEntries(
      await Promise.all(files.map(async (f) => [f.path, await fileIdentity(join(opened.paths.dir, f.path))] as const)),
    );
    const stampPath = join(this.root, VERIFIED_STAMPS_DIR, `${name}.json`);
    if (!options.rehash) {
      const stamp = await readStamp(stampPath);
      if (stamp && stamp.id === opened.manifest.id && files.every((f) => stamp.files[f.path] === identities[f.path])) {
        return { files: files.length, bytes: opened.manifest.totals.bytes, ms: performance.now() - started, hashed: false };
      }
    }
    const bad: Array<{ file: string; expected: string; actual: string }> = [];
    await forEachLimit(
      files,
      options.concurrency ?? this.hashConcurrency,
      async (file) => {
        const actual = await hashFile(join(opened.paths.dir, file.path), { signal: options.signal, step });
        if (actual.sha256 !== file.sha256 || actual.size !== file.size) {
          bad.push({ file: file.path, expected: `sha256:${file.sha256} (${file.size} bytes)`, actual: `sha256:${actual.sha256} (${actual.size} bytes)` });
        }
      },
      { signal: options.signal, step },
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
    await this.writeStamp(stampPath, { id: opened.manifest.id, files: identities });
    return { files: files.length, bytes: opened.manifest.totals.bytes, ms: performance.now() - started, hashed: true };
  }

  /** Records a successful hash (0600, atomic); a failure to record only costs a re-hash next time. */
  private async writeStamp(path: string, stamp: VerifiedStamp): Promise<void> {
    try {
      await mkdir(join(this.root, VERIFIED_STAMPS_DIR), { mode: 0o700, recursive: true });
      const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
      await writeFile(tmp, JSON.stringify(stamp), { mode: 0o600 });
      await rename(tmp, path);
    } catch (err) {
      this.logger.warn('cannot record a verified checkpoint; it will be hashed again', { path, error: (err as Error).message });
    }
  }

  /** Every checkpoint directory, sorted by name; broken ones carry `problem` instead of `manifest`. */
  async list(): Promise<ListedCheckpoint[]> {
    const names = (await readdir(this.root)).filter((e) => !e.startsWith('.')).sort();
    const out: ListedCheckpoint[] = [];
    for (const name of names) {
      try {
        out.push({ name, manifest: (await this.open(name)).manifest });
      } catch (err) {
        const e = err as StoreError;
        out.push({ name, problem: { code: e.code ?? StoreErrorCode.IO, message: e.message } });
      }
    }
    return out;
  }

  /** Bytes of every file in the checkpoint directory, manifest included (apparent sizes). */
  async sizeOf(name: string): Promise<number> {
    const dir = this.dirOf(name, 'size of checkpoint');
    const step = `size of checkpoint ${name}`;
    await this.requireExists(name, dir, step);
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
    await this.requireExists(name, dir, step);
    if (await this.isLeased(name)) {
      throw new StoreError(StoreErrorCode.IN_USE, `checkpoint ${name} is in use by a restore`, { step, evidence: { name } });
    }
    const aside = this.inside(this.newTmpName(name), step);
    try {
      await rm(join(this.root, VERIFIED_STAMPS_DIR, `${name}.json`), { force: true });
      await rename(dir, aside);
      await fsyncPath(this.root);
      await rm(aside, { recursive: true, force: true });
    } catch (err) {
      throw ioError(step, `cannot delete ${dir}`, err);
    }
    this.logger.info('checkpoint deleted', { name });
  }

  private async requireExists(name: string, dir: string, step: string): Promise<void> {
    try {
      await lstat(dir);
    } catch {
      throw new StoreError(StoreErrorCode.NOT_FOUND, `no checkpoint named ${name} in ${this.root}`, { step, evidence: { name } });
    }
  }

  /**
   * Marks checkpoint `name` as in use (a restore reads it) until the returned function is called. Leases
   * are counted by this store instance; the first one also writes `<root>/.leases/<name>@<pid>-<start>-<token>`,
   * so that another process (the CLI's delete) or store instance sees it, and the last release removes that
   * file. A lease file whose process is gone (pid and start time) is ignored and removed by recover().
   * No flock: Node has none, and a file per holder is enough for "is anyone reading this?".
   */
  async acquireLease(name: string): Promise<ReleaseLease> {
    const dir = this.dirOf(name, 'lease checkpoint');
    const step = `lease checkpoint ${name}`;
    await this.requireExists(name, dir, step);
    const count = this.leaseCounts.get(name) ?? 0;
    this.leaseCounts.set(name, count + 1);
    if (count === 0) {
      try {
        await mkdir(join(this.root, LEASES_DIR_NAME), { mode: CHECKPOINT_DIR_MODE, recursive: true });
        await writeFile(this.leasePath(name), JSON.stringify({ pid: process.pid, since: this.now().toISOString() }), {
          mode: CHECKPOINT_FILE_MODE,
        });
      } catch (err) {
        this.leaseCounts.set(name, (this.leaseCounts.get(name) ?? 1) - 1);
        throw ioError(step, 'cannot write the lease file', err);
      }
    }
    let released = false;
    return async () => {
      if (released) return;
      released = true;
      const left = (this.leaseCounts.get(name) ?? 1) - 1;
      if (left > 0) {
        this.leaseCounts.set(name, left);
        return;
      }
      this.leaseCounts.delete(name);
      await unlink(this.leasePath(name)).catch(() => undefined);
    };
  }

  /** True while this instance, or another live instance or process, holds a lease on `name`. */
  async isLeased(name: string): Promise<boolean> {
    if ((this.leaseCounts.get(name) ?? 0) > 0) return true;
    const own = this.leasePath(name);
    return (await this.leaseFiles()).some((l) => l.name === name && l.path !== own && processAlive(l.pid, l.startTime));
  }

  private leasePath(name: string): string {
    return join(this.root, LEASES_DIR_NAME, `${name}@${this.processTag}-${this.instanceToken}`);
  }

  private async leaseFiles(): Promise<Array<{ name: string; pid: number; startTime: string; path: string }>> {
    let entries: string[];
    try {
      entries = await readdir(join(this.root, LEASES_DIR_NAME));
    } catch {
      return [];
    }
    return entries.flatMap((entry) => {
      const match = LEASE_PATTERN.exec(entry);
      if (!match) return [];
      return [{ name: match[1]!, pid: Number(match[2]), startTime: match[3]!, path: join(this.root, LEASES_DIR_NAME, entry) }];
    });
  }

  /**
   * Brings every file of a checkpoint into the page cache, so that a restore starting soon after reads from
   * memory: a file already cached (mincore) is left alone, any other is read once, sequentially. Starts at the
   * first NRI event of a restore, and the restore does not wait for it. Cancellable between chunks
   * (STORE_ABORTED). `bytesRead` says how much it had to read.
   */
  async prefetch(
    name: string,
    options: {
      signal?: AbortSignal;
      concurrency?: number;
      /** Default PREFETCH_SEGMENT_BYTES. */
      segmentBytes?: number;
      /** Awaited before each read: lets smaller, more urgent reads have the disk first (the restore's file pages). */
      gate?: () => Promise<void>;
    } = {},
  ): Promise<PrefetchResult> {
    this.dirOf(name, 'prefetch checkpoint');
    const step = `prefetch checkpoint ${name}`;
    const started = performance.now();
    const opened = await this.open(name);
    // Largest first: the long reads start early and the small files fill in around them.
    const files = [...opened.manifest.files].sort((a, b) => b.size - a.size);
    const handles: FileHandle[] = [];
    const segments: Array<{ fh: FileHandle; start: number; end: number }> = [];
    let bytes = 0;
    let bytesRead = 0;
    try {
      for (const file of files) {
        throwIfAborted(options.signal, step);
        const fh = await openRegularNoFollow(join(opened.paths.dir, file.path), step);
        handles.push(fh);
        bytes += file.size;
        await this.pageCache.adviseWillNeed(fh.fd);
        if (this.pageCache.residentBytes(fh.fd, file.size) >= file.size * PREFETCH_RESIDENT_FRACTION) continue;
        // A large file is read as consecutive segments by several readers at once: CRIU reads its pages image
        // from the start, so the front of what is cached advances at what the disk gives to parallel reads
        // (one stream here: 1.0-1.2 GB/s, four or eight: 1.3-1.65 GB/s), ahead of CRIU.
        const segmentBytes = options.segmentBytes ?? PREFETCH_SEGMENT_BYTES;
        for (let start = 0; start < file.size; start += segmentBytes) {
          segments.push({ fh, start, end: Math.min(file.size, start + segmentBytes) });
        }
      }
      const buffers: Buffer[] = [];
      await forEachLimit(
        segments,
        options.concurrency ?? DEFAULT_PREFETCH_CONCURRENCY,
        async ({ fh, start, end }) => {
          const buffer = buffers.pop() ?? Buffer.allocUnsafe(PREFETCH_CHUNK_BYTES);
          try {
            for (let position = start; position < end; ) {
              if (options.gate) await options.gate();
              throwIfAborted(options.signal, step);
              const { bytesRead: n } = await fh.read(buffer, 0, Math.min(buffer.length, end - position), position);
              if (n === 0) break;
              position += n;
              bytesRead += n;
            }
          } finally {
            buffers.push(buffer);
          }
        },
        { signal: options.signal, step },
      );
    } finally {
      await Promise.all(handles.map((fh) => fh.close()));
    }
    const ms = performance.now() - started;
    this.logger.debug('checkpoint prefetched', { name, bytes, bytesRead, ms });
    return { bytes, bytesRead, ms };
  }

  /** Reads manifest.json without the directory checks of open(); for tools that inspect broken checkpoints. */
  async readManifestUnchecked(name: string): Promise<Manifest> {
    const fh = await openRegularNoFollow(join(this.dirOf(name, 'read checkpoint manifest'), MANIFEST_FILE_NAME), `read manifest of ${name}`);
    try {
      return parseManifest(await fh.readFile('utf8'));
    } finally {
      await fh.close();
    }
  }
}

type PendingState = 'writing' | 'publishing' | 'published' | 'aborted';

/**
 * A checkpoint being written. The checkpoint flow writes CRIU's images into `paths.criuDir`, the rootfs diff
 * into `paths.rootfsDiff` and `paths.deletedFiles`, then calls publish(); on any failure it calls abort().
 * A publish() that fails leaves the directory as the flow wrote it: retry (e.g. with `replace`) or abort().
 */
export class PendingCheckpoint {
  readonly name: string;
  /** The temporary directory (`<root>/.tmp-<name>-<pid>-<start>-<random>`). */
  readonly dir: string;
  readonly paths: CheckpointPaths;
  /** @internal */
  readonly tmpName: string;
  private readonly store: LocalStore;
  private state: PendingState = 'writing';

  constructor(store: LocalStore, name: string, tmpName: string, dir: string) {
    this.store = store;
    this.name = name;
    this.tmpName = tmpName;
    this.dir = dir;
    this.paths = pathsOf(dir);
  }

  /**
   * Hashes every file (bounded parallelism), sets modes 0600/0700, writes manifest.json, fsyncs every file and
   * directory, and renames the directory to `<root>/<name>`. Errors: STORE_EXISTS (without `replace`),
   * STORE_IN_USE (replace of a leased checkpoint), STORE_PATH_ESCAPE (a symlink or device in the directory),
   * STORE_MANIFEST_INVALID (bad fields), STORE_ABORTED, STORE_IO.
   */
  async publish(fields: ManifestFields, options: PublishOptions = {}): Promise<OpenedCheckpoint> {
    if (this.state !== 'writing') {
      throw new StoreError(StoreErrorCode.BAD_STATE, `checkpoint ${this.name} is already ${this.state}`, { step: 'publish checkpoint' });
    }
    this.state = 'publishing';
    try {
      const opened = await this.store.publishDir(this, fields, options);
      this.state = 'published';
      return opened;
    } catch (err) {
      this.state = 'writing';
      throw err;
    }
  }

  /**
   * Publishes files that were checked elsewhere (a pull verified every byte against the registry's digests)
   * under `manifest` as given, keeping its id; only its name becomes this checkpoint's. Same errors as publish().
   */
  async publishVerified(manifest: Manifest, options: PublishOptions = {}): Promise<OpenedCheckpoint> {
    if (this.state !== 'writing') {
      throw new StoreError(StoreErrorCode.BAD_STATE, `checkpoint ${this.name} is already ${this.state}`, { step: 'publish checkpoint' });
    }
    this.state = 'publishing';
    try {
      const opened = await this.store.publishVerifiedDir(this, manifest, options);
      this.state = 'published';
      return opened;
    } catch (err) {
      this.state = 'writing';
      throw err;
    }
  }

  /** Removes the temporary directory. Idempotent; refused after publish() succeeded or while it runs. */
  async abort(): Promise<void> {
    if (this.state === 'aborted') return;
    if (this.state !== 'writing') {
      throw new StoreError(StoreErrorCode.BAD_STATE, `checkpoint ${this.name} is ${this.state}; cannot abort`, { step: 'abort checkpoint' });
    }
    this.state = 'aborted';
    await this.store.abortDir(this);
  }
}
