/**
 * Opening the store and its checkpoints, with the permission checks: the root must not be writable by group
 * or others and must be owned by the store's uid; a checkpoint's directories must be 0700 and its files 0600,
 * owned by that uid; its files must be exactly its manifest's, by path and size.
 */
import type { Stats } from 'node:fs';
import { lstat, mkdir, realpath, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { parseStoreKey, type ParsedStoreKey } from '../checkpoint-name.js';
import { openRegularNoFollow } from './digest.js';
import { ioError, StoreError, StoreErrorCode } from './errors.js';
import { CHECKPOINT_DIR_MODE, CHECKPOINT_FILE_MODE, pathsOf, walk, type OpenedCheckpoint, type StoreLayout } from './layout.js';
import { checkRelativePath, MANIFEST_FILE_NAME, parseManifest, type Manifest } from './manifest.js';
import { checkProvenance, PROVENANCE_FILE_NAMES } from './provenance.js';

/** Creates the root when missing (0700) and checks it; returns its canonical path. */
export async function openStoreRoot(requested: string, ownerUid: number, step: string): Promise<string> {
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
  return root;
}

function checkOwnership(path: string, st: Stats, mode: number, ownerUid: number, step: string): void {
  if ((st.mode & 0o7777) !== mode || st.uid !== ownerUid) {
    throw new StoreError(
      StoreErrorCode.INSECURE_PERMISSIONS,
      `${path} is mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')} owned by uid ${st.uid} (must be ${mode.toString(8).padStart(4, '0')} owned by uid ${ownerUid})`,
      { step, evidence: { path, mode: st.mode & 0o7777, uid: st.uid } },
    );
  }
}

/**
 * Opens a published checkpoint: checks its permissions (dir 0700, files 0600, owner), parses its manifest,
 * and compares the files on disk with the manifest by name and size (cheap: no hashing; verify() hashes).
 * Errors: STORE_INVALID_NAME, STORE_NOT_FOUND, STORE_INSECURE_PERMISSIONS, STORE_PATH_ESCAPE,
 * STORE_MANIFEST_INVALID, STORE_FILE_MISSING, STORE_FILE_UNEXPECTED, STORE_DIGEST_MISMATCH (size).
 */
export async function openCheckpoint(layout: StoreLayout, ownerUid: number, name: string): Promise<OpenedCheckpoint> {
  const dir = layout.dirOf(name, 'open checkpoint');
  const step = `open checkpoint ${name}`;
  let top: Stats;
  try {
    top = await lstat(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new StoreError(StoreErrorCode.NOT_FOUND, `no checkpoint named ${name} in ${layout.root}`, { step, evidence: { name } });
    }
    throw ioError(step, `cannot stat ${dir}`, err);
  }
  const parent = dirname(dir);
  const parentStats = await lstat(parent);
  if (!parentStats.isDirectory()) {
    throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${parent} is not a directory${parentStats.isSymbolicLink() ? ' (a symlink)' : ''}`, { step });
  }
  if (!top.isDirectory()) {
    throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${dir} is not a directory${top.isSymbolicLink() ? ' (a symlink)' : ''}`, { step });
  }
  const tree = await walk(dir, step);
  for (const d of tree.dirs) checkOwnership(join(dir, d.path), d.stats, CHECKPOINT_DIR_MODE, ownerUid, step);
  for (const f of tree.files) checkOwnership(join(dir, f.path), f.stats, CHECKPOINT_FILE_MODE, ownerUid, step);
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
  const key = parseStoreKey(name) as ParsedStoreKey;
  if (manifest.name !== key.name) {
    throw new StoreError(StoreErrorCode.MANIFEST_INVALID, `manifest.name is ${JSON.stringify(manifest.name)} but the directory is ${JSON.stringify(key.name)}`, {
      step,
    });
  }
  // A checkpoint directory moved by hand into another namespace's directory is not that namespace's.
  const namespace = key.kind === 'owned' ? key.namespace : undefined;
  const podNamespace = manifest.source.pod?.namespace;
  if (namespace !== undefined && podNamespace !== undefined && podNamespace !== namespace) {
    throw new StoreError(StoreErrorCode.MANIFEST_INVALID, `checkpoint ${name} was taken from a pod of namespace ${podNamespace} but lies under ${namespace}/`, {
      step,
      evidence: { name, podNamespace },
    });
  }
  const onDisk = new Map(tree.files.map((f) => [f.path, f.stats.size]));
  onDisk.delete(MANIFEST_FILE_NAME);
  // A pulled checkpoint: the registry bytes its name commits to, checked before anything reads its files.
  if (key.kind === 'pulled') {
    await checkProvenance(dir, name, manifest, step);
    for (const f of PROVENANCE_FILE_NAMES) onDisk.delete(f);
  }
  for (const file of manifest.files) {
    const bad = checkRelativePath(file.path);
    if (bad !== undefined) throw new StoreError(StoreErrorCode.PATH_ESCAPE, `manifest path ${JSON.stringify(file.path)} ${bad}`, { step });
    layout.inside(file.path, step, dir);
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
  return { name, ...(namespace !== undefined ? { namespace } : {}), manifest, paths };
}

/** STORE_NOT_FOUND unless `dir` (the checkpoint `name`'s) exists. */
export async function requireExists(layout: StoreLayout, name: string, dir: string, step: string): Promise<void> {
  try {
    await lstat(dir);
  } catch {
    throw new StoreError(StoreErrorCode.NOT_FOUND, `no checkpoint named ${name} in ${layout.root}`, { step, evidence: { name } });
  }
}

/** Reads manifest.json without the directory checks of openCheckpoint; for tools that inspect broken checkpoints. */
export async function readManifestUnchecked(layout: StoreLayout, name: string): Promise<Manifest> {
  const fh = await openRegularNoFollow(join(layout.dirOf(name, 'read checkpoint manifest'), MANIFEST_FILE_NAME), `read manifest of ${name}`);
  try {
    return parseManifest(await fh.readFile('utf8'));
  } finally {
    await fh.close();
  }
}
