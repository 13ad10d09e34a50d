/**
 * The one-time migration of a store of the old flat layout (`<root>/<name>/`, one namespace for every tenant)
 * to the namespaced one (layout.ts), run by openLocalStore before anything else reads the store:
 *
 *   <root>/oci-<hex>/    → <root>/.oci/oci-<hex>/        a pulled checkpoint with its registry bytes (provenance.ts);
 *                                                        one without them to .unowned/ (pull it again)
 *   <root>/<name>/       → <root>/<namespace>/<name>/    its manifest's source.pod.namespace
 *   <root>/<name>/       → <root>/.unowned/<name>/       no namespace recorded, or the target exists: it
 *                                                        restores nowhere and is left to the operator
 *
 * An old checkpoint is told from a namespace directory by its `manifest.json` right under it. Each one moves in
 * two renames through `<root>/.migrating/<name>`, so that a crash between them is finished by the next open (and
 * a checkpoint named like its own namespace, `default/` holding `default`, needs no rename into itself). Its
 * `.verified` stamp follows it (file identities survive a rename), so it is not hashed again. Nothing is
 * rewritten: the manifest's name is the directory's name in both layouts.
 */
import { lstat, mkdir, readdir, readFile, rename, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { checkCheckpointName, checkNamespaceName, isPulledKey, RESERVED_NAME_PREFIX } from '../checkpoint-name.js';
import type { Logger } from '../log.js';
import { ioError } from './errors.js';
import { CHECKPOINT_DIR_MODE, keyToFileName, PULLED_DIR_NAME, UNOWNED_DIR_NAME, type StoreLayout } from './layout.js';
import { MANIFEST_FILE_NAME } from './manifest.js';
import { OCI_MANIFEST_FILE_NAME } from './provenance.js';
import { fsyncPath } from './publish.js';
import { VERIFIED_STAMPS_DIR } from './verify.js';

export const MIGRATING_DIR_NAME = '.migrating';

export interface Migration {
  /** The old directory name under the root. */
  from: string;
  /** Where it went, relative to the root (`team-a/llm`, `.oci/oci-<hex>`, `.unowned/llm`). */
  to: string;
  /** Why it went to .unowned, when it did. */
  reason?: string;
}

async function isFile(path: string): Promise<boolean> {
  return lstat(path).then((st) => st.isFile(), () => false);
}

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(() => true, () => false);
}

/** The namespace an old checkpoint's manifest records (read as plain JSON: a broken manifest is still moved). */
async function recordedNamespace(dir: string): Promise<string | undefined> {
  try {
    const raw = JSON.parse(await readFile(join(dir, MANIFEST_FILE_NAME), 'utf8')) as { source?: { pod?: { namespace?: unknown } } };
    const ns = raw.source?.pod?.namespace;
    return typeof ns === 'string' && checkNamespaceName(ns) === undefined ? ns : undefined;
  } catch {
    return undefined;
  }
}

/** Moves every old-layout checkpoint into place; returns what moved (each logged). Safe to call again. */
export async function migrateFlatLayout(layout: StoreLayout, logger: Logger): Promise<Migration[]> {
  const step = 'migrate the checkpoint store to the namespaced layout';
  const root = layout.root;
  const staging = join(root, MIGRATING_DIR_NAME);
  const moved: Migration[] = [];
  // 1. Old checkpoints at the top move to .migrating/ (one rename each; nothing else reads .migrating).
  for (const entry of await readdir(root)) {
    if (entry.startsWith('.')) continue;
    if (!(await isFile(join(root, entry, MANIFEST_FILE_NAME)))) continue; // a namespace directory
    try {
      await mkdir(staging, { mode: CHECKPOINT_DIR_MODE, recursive: true });
      await rename(join(root, entry), join(staging, entry));
    } catch (err) {
      throw ioError(step, `cannot move ${join(root, entry)} aside`, err);
    }
  }
  let staged: string[];
  try {
    staged = (await readdir(staging)).sort();
  } catch {
    return moved; // nothing to migrate, now or before
  }
  await fsyncPath(root);
  // 2. From .migrating/ to their place (also what a crash left there).
  for (const entry of staged) {
    const from = join(staging, entry);
    let parent: string;
    let reason: string | undefined;
    if (isPulledKey(entry)) {
      // One pulled before its registry bytes were kept cannot prove its name any more (provenance.ts).
      const kept = await isFile(join(from, OCI_MANIFEST_FILE_NAME));
      if (!kept) reason = 'pulled before its registry manifest was kept: it cannot prove its name; pull it again';
      parent = kept ? PULLED_DIR_NAME : UNOWNED_DIR_NAME;
    } else {
      const ns = await recordedNamespace(from);
      const badName = checkCheckpointName(entry) ?? (entry.startsWith(RESERVED_NAME_PREFIX) ? `${entry} begins with ${RESERVED_NAME_PREFIX} but is not a pulled checkpoint's name` : undefined);
      if (ns === undefined) reason = 'its manifest records no namespace';
      else if (badName !== undefined) reason = badName;
      parent = reason === undefined ? ns! : UNOWNED_DIR_NAME;
    }
    let to = join(parent, entry);
    if (reason === undefined && (await exists(join(root, to)))) {
      reason = `${to} exists already`;
      parent = UNOWNED_DIR_NAME;
      to = join(parent, entry);
    }
    if (parent === UNOWNED_DIR_NAME && (await exists(join(root, to)))) to = join(parent, `${entry}-${Date.now()}`);
    try {
      await mkdir(join(root, parent), { mode: CHECKPOINT_DIR_MODE, recursive: true });
      await rename(from, join(root, to));
      await fsyncPath(join(root, parent));
      if (parent !== UNOWNED_DIR_NAME) {
        const key = parent === PULLED_DIR_NAME ? entry : `${parent}/${entry}`;
        const oldStamp = join(root, VERIFIED_STAMPS_DIR, `${entry}.json`);
        if (key !== entry && (await exists(oldStamp))) await rename(oldStamp, join(root, VERIFIED_STAMPS_DIR, `${keyToFileName(key)}.json`));
      }
    } catch (err) {
      throw ioError(step, `cannot move ${from} to ${join(root, to)}`, err);
    }
    const m: Migration = { from: entry, to, ...(reason !== undefined ? { reason } : {}) };
    moved.push(m);
    if (reason === undefined) logger.info('checkpoint moved to the namespaced store layout', { ...m });
    else logger.warn('checkpoint of the old store layout restores nowhere; kept for the operator', { ...m });
  }
  try {
    await rmdir(staging);
  } catch (err) {
    throw ioError(step, `cannot remove ${staging}`, err);
  }
  await fsyncPath(root);
  return moved;
}
