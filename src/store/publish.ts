/**
 * Writing and publishing a checkpoint. Crash safety: a checkpoint is written into a `.tmp-*` directory, every
 * file and directory is fsynced, and only then is the directory renamed to its name (renameat2
 * RENAME_NOREPLACE, or RENAME_EXCHANGE to replace one atomically). A crash at any point leaves at most a
 * `.tmp-*` directory, which recover (recover.ts) removes.
 */
import { randomUUID } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { chmod, lchown, lstat, mkdir, open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { isPulledKey, namespaceOfKey, parseStoreKey } from '../checkpoint-name.js';
import { checkProvenance, OCI_CONFIG_FILE_NAME, OCI_MANIFEST_FILE_NAME, PROVENANCE_FILE_NAMES, type Provenance } from './provenance.js';
import type { Logger } from '../log.js';
import { forEachLimit, type Limiter } from '../sys/concurrency.js';
import { hashHandle, openRegularNoFollow } from './digest.js';
import { ioError, StoreError, StoreErrorCode, storeAborted, throwIfAborted } from './errors.js';
import { CHECKPOINT_DIR_MODE, CHECKPOINT_FILE_MODE, pathsOf, walk, type CheckpointPaths, type OpenedCheckpoint, type StoreLayout, type Tree } from './layout.js';
import { CRIU_DIR_NAME, MANIFEST_FILE_NAME, MANIFEST_KIND, parseManifest, schemaVersionOf, type Manifest, type ManifestFields, type ManifestFile } from './manifest.js';
import { errnoOf, RENAME_EXCHANGE, RENAME_NOREPLACE, type RenameAt2 } from './rename.js';
import type { RestoreFailures } from './restore-failures.js';
import type { StampCache } from './verify.js';

export interface PublishOptions {
  signal?: AbortSignal;
  /** Atomically replace a checkpoint of the same name (refused with STORE_IN_USE while it is leased). */
  replace?: boolean;
}

/** publishVerified's options: a pulled checkpoint (an `oci-<hex>` key) must bring the registry bytes it came from. */
export interface PublishVerifiedOptions extends PublishOptions {
  provenance?: Provenance;
}

/** What publishing needs of its store. */
export interface PublishContext {
  layout: StoreLayout;
  logger: Logger;
  /** uid that must own every checkpoint directory and file. */
  ownerUid: number;
  /** Files hashed at once by this publish. */
  hashConcurrency: number;
  /** Files hashed at once in the whole process (the agent's bound). */
  hashLimiter: Limiter;
  /** Clock for manifest.createdAt. */
  now: () => Date;
  renameAt2: RenameAt2;
  stamps: StampCache;
  /** A checkpoint published anew is not the one whose restore failed: its mark goes (restore-failures.ts). */
  failures: RestoreFailures;
  /** A replace is refused while the checkpoint is leased (leases.ts). */
  isLeased(name: string): Promise<boolean>;
  /** Records a use of the checkpoint (gc.ts: a checkpoint just published is the most recently used). */
  used(name: string): Promise<void>;
}

/** The name a manifest records: the key's name part (`name` of `namespace/name`; a pulled key as it is). */
export function bareNameOf(key: string): string {
  const parsed = parseStoreKey(key);
  return 'reason' in parsed ? key : parsed.name;
}

export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Starts writing checkpoint `name`: creates `<root>/.tmp-<name>-<pid>-<start>-<random>/` (0700) with an empty
 * `criu/`. The checkpoint flow writes its files there (PendingCheckpoint.paths), then publish() or abort().
 * Nothing is visible under `name` until publish() succeeds.
 */
export async function beginCheckpoint(ctx: PublishContext, name: string): Promise<PendingCheckpoint> {
  const step = 'begin checkpoint';
  ctx.layout.dirOf(name, step);
  const tmpName = ctx.layout.newTmpName(name);
  const dir = ctx.layout.inside(tmpName, step);
  try {
    await mkdir(dir, { mode: CHECKPOINT_DIR_MODE });
    await chmod(dir, CHECKPOINT_DIR_MODE); // the umask may have narrowed or (rarely) the mode differs
    await mkdir(join(dir, CRIU_DIR_NAME), { mode: CHECKPOINT_DIR_MODE });
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw ioError(step, `cannot create ${dir}`, err);
  }
  ctx.logger.debug('checkpoint started', { name, dir });
  return new PendingCheckpoint(ctx, name, tmpName, dir);
}

/** PendingCheckpoint.publish's body: hash, write the manifest, fsync, rename into place. */
async function publishDir(ctx: PublishContext, pending: PendingCheckpoint, fields: ManifestFields, options: PublishOptions): Promise<OpenedCheckpoint> {
  const step = 'publish checkpoint';
  const { name, dir } = pending;
  const signal = options.signal;
  // A checkpoint is owned by the namespace of the pod it was taken from: it is published under that namespace.
  const owner = namespaceOfKey(name);
  if (owner === undefined) {
    throw new StoreError(StoreErrorCode.INVALID_NAME, `${name} is a pulled checkpoint's name: only a pull (or a copy) publishes one, with the manifest it verified`, { step, evidence: { name } });
  }
  const podNamespace = fields.source.pod?.namespace;
  if (podNamespace !== undefined && owner !== podNamespace) {
    throw new StoreError(StoreErrorCode.INVALID_NAME, `checkpoint ${name} was taken from a pod of namespace ${podNamespace}; it can only be published under ${podNamespace}/`, {
      step,
      evidence: { name, podNamespace },
    });
  }
  const tree = await walk(dir, step);
  if (tree.files.some((f) => f.path === MANIFEST_FILE_NAME)) {
    throw new StoreError(StoreErrorCode.BAD_STATE, `${MANIFEST_FILE_NAME} is written by the store, not by the checkpoint flow`, { step });
  }
  const files: ManifestFile[] = new Array(tree.files.length);
  const chown = process.getuid?.() === 0;
  await forEachLimit(
    tree.files,
    ctx.hashConcurrency,
    async (file, index) =>
      ctx.hashLimiter.run(
        async () => {
          const fh = await openRegularNoFollow(join(dir, file.path), step);
          try {
            await fh.chmod(CHECKPOINT_FILE_MODE);
            if (chown) await fh.chown(ctx.ownerUid, 0);
            const digest = await hashHandle(fh, { signal, step });
            await fh.sync();
            files[index] = { path: file.path, size: digest.size, sha256: digest.sha256, mode: CHECKPOINT_FILE_MODE };
          } finally {
            await fh.close();
          }
        },
        { ...(signal ? { signal } : {}), step, aborted: storeAborted(step) },
      ),
    { signal, step, aborted: storeAborted(step) },
  );
  for (const d of tree.dirs) {
    await chmod(join(dir, d.path), CHECKPOINT_DIR_MODE);
    if (chown) await lchown(join(dir, d.path), ctx.ownerUid, 0);
  }
  const totals: Manifest['totals'] = { bytes: files.reduce((a, f) => a + f.size, 0), fileCount: files.length };
  if (fields.liveBytes !== undefined) totals.liveBytes = fields.liveBytes;
  return finishPublish(ctx, pending, {
    schemaVersion: schemaVersionOf(files),
    kind: MANIFEST_KIND,
    name: bareNameOf(name),
    id: randomUUID(),
    createdAt: ctx.now().toISOString(),
    source: fields.source,
    constraints: fields.constraints,
    criu: fields.criu,
    files,
    totals,
    timings: fields.timings ?? { phaseMs: {} },
    ...(fields.weights !== undefined ? { weights: fields.weights } : {}),
    ...(fields.snapshot !== undefined ? { snapshot: fields.snapshot } : {}),
  }, tree, options, step);
}

/**
 * PendingCheckpoint.publishVerified's body: a checkpoint whose files were written and checked elsewhere
 * (pulled from a registry, every byte's sha256 checked on the way) is published under the given manifest as
 * it is (its id kept; its name becomes the pending name). The files on disk must be exactly the manifest's,
 * by path and size; they are not hashed again.
 */
async function publishVerifiedDir(ctx: PublishContext, pending: PendingCheckpoint, manifest: Manifest, options: PublishVerifiedOptions): Promise<OpenedCheckpoint> {
  const step = 'publish checkpoint';
  const { dir } = pending;
  const pulled = isPulledKey(pending.name);
  if (pulled !== (options.provenance !== undefined)) {
    throw new StoreError(StoreErrorCode.BAD_STATE, pulled ? `${pending.name} is a pulled checkpoint: publish it with the registry manifest and config it came from` : 'only a pulled checkpoint keeps registry provenance', { step });
  }
  if (options.provenance !== undefined) {
    for (const [file, bytes] of [[OCI_MANIFEST_FILE_NAME, options.provenance.imageManifest], [OCI_CONFIG_FILE_NAME, options.provenance.config]] as const) {
      const fh = await open(join(dir, file), fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, CHECKPOINT_FILE_MODE);
      try {
        await fh.writeFile(bytes);
      } finally {
        await fh.close();
      }
    }
  }
  // What open() will check on every use is checked now: nothing unprovable is published.
  if (pulled) await checkProvenance(dir, pending.name, { ...manifest, name: bareNameOf(pending.name) }, step);
  const tree = await walk(dir, step);
  const onDisk = new Map(tree.files.map((f) => [f.path, f.stats.size]));
  if (pulled) for (const f of PROVENANCE_FILE_NAMES) onDisk.delete(f);
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
    ctx.hashConcurrency,
    async (file) => {
      const fh = await openRegularNoFollow(join(dir, file.path), step);
      try {
        if ((file.stats.mode & 0o7777) !== CHECKPOINT_FILE_MODE) await fh.chmod(CHECKPOINT_FILE_MODE);
        if (chown && file.stats.uid !== ctx.ownerUid) await fh.chown(ctx.ownerUid, 0);
        await fh.sync();
      } finally {
        await fh.close();
      }
    },
    { signal: options.signal, step, aborted: storeAborted(step) },
  );
  for (const d of tree.dirs) {
    await chmod(join(dir, d.path), CHECKPOINT_DIR_MODE);
    if (chown) await lchown(join(dir, d.path), ctx.ownerUid, 0);
  }
  return finishPublish(ctx, pending, { ...manifest, name: bareNameOf(pending.name) }, tree, options, step);
}

/** Writes manifest.json, fsyncs, renames into place and records the files as verified. */
async function finishPublish(ctx: PublishContext, pending: PendingCheckpoint, manifest: Manifest, tree: Tree, options: PublishOptions, step: string): Promise<OpenedCheckpoint> {
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
    await renameIntoPlace(ctx, pending, options.replace === true, step);
  } catch (err) {
    // Leave the directory as the flow wrote it (minus our manifest), so publish can be retried or aborted.
    await rm(manifestPath, { force: true });
    throw err;
  }
  ctx.logger.info('checkpoint published', { name, id: manifest.id, bytes: totals.bytes, files: totals.fileCount });
  const publishedDir = ctx.layout.dirOf(name, step);
  // Every file was just hashed in our own 0700 directory: the first restore need not hash it again.
  await ctx.stamps.recordPublished(name, publishedDir, manifest);
  await ctx.used(name);
  await ctx.failures.clear(name).catch((err: unknown) => ctx.logger.warn('cannot remove the restore-failure mark of a replaced checkpoint', { name, error: (err as Error).message }));
  const namespace = namespaceOfKey(name);
  return { name, ...(namespace !== undefined ? { namespace } : {}), manifest, paths: pathsOf(publishedDir) };
}

async function renameIntoPlace(ctx: PublishContext, pending: PendingCheckpoint, replace: boolean, step: string): Promise<void> {
  const root = ctx.layout.root;
  const target = ctx.layout.dirOf(pending.name, step);
  // The namespace's directory (or .oci), made on its first checkpoint; the rename then moves the checkpoint
  // from the root into it (the same filesystem), and both directories are fsynced.
  const parent = ctx.layout.parentOf(pending.name, step);
  await ensureParent(root, parent, step);
  const exists = (): StoreError =>
    new StoreError(StoreErrorCode.EXISTS, `checkpoint ${pending.name} exists (publish with replace: true to replace it)`, {
      step,
      evidence: { name: pending.name },
    });
  let errno = ctx.renameAt2(pending.dir, target, RENAME_NOREPLACE);
  if (errno === errnoOf('EINVAL') || errno === errnoOf('ENOSYS')) {
    // This filesystem lacks renameat2 flags: check then rename (racy only against another publisher).
    if (await lstat(target).then(() => true, () => false)) errno = errnoOf('EEXIST');
    else errno = await rename(pending.dir, target).then(() => 0, (err: NodeJS.ErrnoException) => err.errno ?? -1);
  }
  if (errno === 0) {
    await fsyncPath(parent);
    await fsyncPath(root);
    return;
  }
  if (errno !== errnoOf('EEXIST') && errno !== errnoOf('ENOTEMPTY')) {
    throw new StoreError(StoreErrorCode.IO, `cannot rename ${pending.dir} to ${target} (errno ${errno})`, { step, evidence: { errno } });
  }
  if (!replace) throw exists();
  if (await ctx.isLeased(pending.name)) {
    throw new StoreError(StoreErrorCode.IN_USE, `checkpoint ${pending.name} is in use by a restore; not replaced`, {
      step,
      evidence: { name: pending.name },
    });
  }
  // The swap leaves the old checkpoint under our .tmp name: removed below, or by recover() after a crash.
  errno = ctx.renameAt2(pending.dir, target, RENAME_EXCHANGE);
  if (errno === errnoOf('EINVAL') || errno === errnoOf('ENOSYS')) {
    const aside = join(root, ctx.layout.newTmpName(pending.name));
    await rename(target, aside);
    await rename(pending.dir, target); // a moment without <name>; only where RENAME_EXCHANGE is missing
    await rename(aside, pending.dir);
    errno = 0;
  }
  if (errno !== 0) {
    throw new StoreError(StoreErrorCode.IO, `cannot exchange ${pending.dir} and ${target} (errno ${errno})`, { step, evidence: { errno } });
  }
  await fsyncPath(parent);
  await fsyncPath(root);
  await rm(pending.dir, { recursive: true, force: true });
  ctx.logger.info('replaced checkpoint; removed the old one', { name: pending.name });
}

/**
 * Creates `parent` (a namespace's directory, or .oci) 0700 under the root when missing, and refuses one that is
 * not a plain directory of ours: a symlink there would publish a checkpoint outside the store.
 */
export async function ensureParent(root: string, parent: string, step: string): Promise<void> {
  try {
    await mkdir(parent, { mode: CHECKPOINT_DIR_MODE });
    await fsyncPath(root);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(step, `cannot create ${parent}`, err);
  }
  const st = await lstat(parent);
  if (!st.isDirectory()) {
    throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${parent} is not a directory${st.isSymbolicLink() ? ' (a symlink)' : ''}`, { step, evidence: { path: parent } });
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
  private readonly ctx: PublishContext;
  private state: PendingState = 'writing';

  constructor(ctx: PublishContext, name: string, tmpName: string, dir: string) {
    this.ctx = ctx;
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
      const opened = await publishDir(this.ctx, this, fields, options);
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
  async publishVerified(manifest: Manifest, options: PublishVerifiedOptions = {}): Promise<OpenedCheckpoint> {
    if (this.state !== 'writing') {
      throw new StoreError(StoreErrorCode.BAD_STATE, `checkpoint ${this.name} is already ${this.state}`, { step: 'publish checkpoint' });
    }
    this.state = 'publishing';
    try {
      const opened = await publishVerifiedDir(this.ctx, this, manifest, options);
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
    await rm(this.dir, { recursive: true, force: true });
    this.ctx.logger.info('checkpoint aborted', { name: this.name, dir: this.dir });
  }
}
