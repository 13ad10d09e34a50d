/**
 * The store's namespaced layout on a real filesystem: `<root>/<namespace>/<name>`, pulled checkpoints in
 * `<root>/.oci/`, the same name in two namespaces two checkpoints, and the one-time migration of a store of the
 * old flat layout (every move checked on disk, a crash between its two renames finished by the next open).
 */
import { lstat, mkdir, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { Provenance } from '../../src/store/provenance.js';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { manifestFields, tempRoot, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { rejection } from '../helpers/rejection.js';


function fieldsOf(namespace: string | undefined) {
  const base = manifestFields();
  const { pod: _pod, ...source } = base.source;
  return { ...base, source: namespace === undefined ? source : { ...source, pod: { name: 'p-0', namespace, uid: 'u-1' } } };
}

async function publish(store: LocalStore, key: string, namespace: string | undefined, pagesBytes = 4096) {
  const pending = await store.beginCheckpoint(key);
  await writeCheckpointFiles(pending.paths, pagesBytes);
  return pending.publish(fieldsOf(namespace));
}

/**
 * A pulled checkpoint as a pull publishes it: files checked elsewhere, under the manifest they were checked
 * against, with the registry bytes its name is the digest of (an image manifest naming the config by digest).
 */
async function publishPulled(store: LocalStore, namespace: string, edit?: (p: Provenance) => Provenance) {
  const src = await publish(store, `${namespace}/src`, namespace);
  const config = Buffer.from(JSON.stringify(src.manifest));
  const imageManifest = Buffer.from(JSON.stringify({ schemaVersion: 2, config: { digest: `sha256:${createHash('sha256').update(config).digest('hex')}`, size: config.length } }));
  const provenance = edit ? edit({ imageManifest, config }) : { imageManifest, config };
  const key = `oci-${createHash('sha256').update(provenance.imageManifest).digest('hex')}`;
  const pending = await store.beginCheckpoint(key);
  await writeCheckpointFiles(pending.paths, 4096);
  return pending.publishVerified(src.manifest, { provenance });
}

describe('namespaced store layout', () => {
  let root: string;
  let cleanup: () => Promise<void>;
  let store: LocalStore;

  beforeEach(async () => {
    ({ root, cleanup } = await tempRoot());
    store = await openLocalStore({ root });
  });
  afterEach(async () => cleanup());

  it('keeps the same name of two namespaces as two checkpoints, each under its namespace', async () => {
    const a = await publish(store, 'team-a/llm', 'team-a');
    const b = await publish(store, 'team-b/llm', 'team-b', 8192);
    expect(a.paths.dir).toBe(join(root, 'team-a', 'llm'));
    expect(b.paths.dir).toBe(join(root, 'team-b', 'llm'));
    expect([a.namespace, b.namespace]).toEqual(['team-a', 'team-b']);
    expect((await store.open('team-a/llm')).manifest.id).toBe(a.manifest.id);
    expect((await store.open('team-b/llm')).manifest.id).toBe(b.manifest.id);
    expect(a.manifest.name, 'the manifest records the bare name').toBe('llm');
    expect((await store.list()).map((l) => [l.name, l.namespace])).toEqual([['team-a/llm', 'team-a'], ['team-b/llm', 'team-b']]);
    expect((await store.list({ namespace: 'team-b' })).map((l) => l.name)).toEqual(['team-b/llm']);
    expect(await store.list({ namespace: 'team-c' })).toEqual([]);
    // Deleting one leaves the other.
    await store.delete('team-a/llm');
    expect((await rejection(store.open('team-a/llm'))).code).toBe('STORE_NOT_FOUND');
    expect((await store.open('team-b/llm')).manifest.id).toBe(b.manifest.id);
    for (const ns of ['team-a', 'team-b']) expect(((await lstat(join(root, ns))).mode & 0o7777).toString(8)).toBe('700');
  });

  it('publishes a checkpoint only under the namespace of the pod it was taken from', async () => {
    const pending = await store.beginCheckpoint('team-a/llm');
    await writeCheckpointFiles(pending.paths);
    const err = await rejection(pending.publish(fieldsOf('team-b')));
    expect(err.code).toBe('STORE_INVALID_NAME');
    expect(err.message).toMatch(/taken from a pod of namespace team-b; it can only be published under team-b\//);
    await pending.abort();
    expect((await readdir(root)).filter((e) => !e.startsWith('.'))).toEqual([]);
  });

  it('refuses a checkpoint moved by hand into another namespace, and a namespace directory that is a symlink', async () => {
    await publish(store, 'team-a/llm', 'team-a');
    await mkdir(join(root, 'team-b'), { mode: 0o700 });
    await rename(join(root, 'team-a', 'llm'), join(root, 'team-b', 'llm'));
    const err = await rejection(store.open('team-b/llm'));
    expect([err.code, err.message]).toEqual(['STORE_MANIFEST_INVALID', 'open checkpoint team-b/llm: checkpoint team-b/llm was taken from a pod of namespace team-a but lies under team-b/']);

    await rename(join(root, 'team-b', 'llm'), join(root, 'team-a', 'llm'));
    await symlink(join(root, 'team-a'), join(root, 'team-c'));
    expect((await rejection(store.open('team-c/llm'))).code).toBe('STORE_PATH_ESCAPE');
    const pending = await store.beginCheckpoint('team-c/other');
    await writeCheckpointFiles(pending.paths);
    expect((await rejection(pending.publish(fieldsOf('team-c')))).code, 'nothing is published through a symlinked namespace').toBe('STORE_PATH_ESCAPE');
    await pending.abort();
    expect(await readdir(join(root, 'team-a'))).toEqual(['llm']);
  });

  it('keeps pulled checkpoints in .oci, apart from every namespace, each proving its name by the registry bytes kept', async () => {
    const fresh = await store.beginCheckpoint(`oci-${'ab'.repeat(32)}`);
    await writeCheckpointFiles(fresh.paths);
    expect((await rejection(fresh.publish(fieldsOf(undefined)))).message, 'a pulled name is published only by a pull').toMatch(/only a pull \(or a copy\) publishes one/);
    await fresh.abort();
    const published = await publishPulled(store, 'team-a');
    await store.delete('team-a/src');
    const PULLED = published.name;
    expect(published.paths.dir).toBe(join(root, '.oci', PULLED));
    expect(published.namespace).toBeUndefined();
    expect((await store.list()).map((l) => [l.name, l.namespace])).toEqual([[PULLED, undefined]]);
    expect(await store.list({ namespace: 'team-a' })).toEqual([]);
    expect((await rejection(store.open(`team-a/${PULLED}`))).code, 'oci- is no name of a namespace').toBe('STORE_INVALID_NAME');
    await store.verify(PULLED);
    // Its manifest.json edited after the pull (constraints loosened to pass a check): refused on the next use.
    const manifestPath = join(published.paths.dir, 'manifest.json');
    const original = await readFile(manifestPath, 'utf8');
    await writeFile(manifestPath, original.replace('"kernelRelease": "6.8.0-45-generic"', '"kernelRelease": "6.8.0-46-generic"'));
    const edited = await rejection(store.open(PULLED));
    expect([edited.code, edited.message]).toEqual(['STORE_MANIFEST_INVALID', `open checkpoint ${PULLED}: pulled checkpoint ${PULLED}: its manifest.json is not the config its registry manifest names (edited after the pull)`]);
    await writeFile(manifestPath, original);
    // The kept registry manifest changed: its sha256 is no longer the name's.
    const imPath = join(published.paths.dir, 'oci-manifest.json');
    const im = await readFile(imPath);
    await writeFile(imPath, Buffer.concat([im, Buffer.from(' ')]));
    expect((await rejection(store.open(PULLED))).message).toMatch(/its registry manifest's sha256 is [0-9a-f]{64}, not the [0-9a-f]{64} its name says/);
    await writeFile(imPath, im);
    // Gone: the name cannot be proven.
    await rm(imPath);
    expect((await rejection(store.open(PULLED))).message).toMatch(/are not kept; pull it again/);
    await writeFile(imPath, im, { mode: 0o600 });
    expect((await store.open(PULLED)).manifest.id).toBe(published.manifest.id);
  });

  it('refuses to publish a pulled checkpoint whose config is not its manifest, or without its registry bytes', async () => {
    // The image manifest names the config it comes with, but that config is another manifest than the one published.
    const err = await rejection(publishPulled(store, 'team-a', (p) => {
      const config = Buffer.from(p.config.toString().replace('"kernelRelease":"6.8.0-45-generic"', '"kernelRelease":"6.9.0"'));
      expect(config.equals(p.config)).toBe(false);
      const imageManifest = Buffer.from(JSON.stringify({ schemaVersion: 2, config: { digest: `sha256:${createHash('sha256').update(config).digest('hex')}`, size: config.length } }));
      return { imageManifest, config };
    }));
    expect([err.code, err.message]).toEqual(['STORE_MANIFEST_INVALID', expect.stringMatching(/its manifest.json is not the config its registry manifest names/)]);
    const src = (await store.open('team-a/src')).manifest;
    const pending = await store.beginCheckpoint(`oci-${'cd'.repeat(32)}`);
    await writeCheckpointFiles(pending.paths, 4096);
    expect((await rejection(pending.publishVerified(src))).code).toBe('STORE_BAD_STATE');
    await pending.abort();
  });
});

describe('migration of the flat layout', () => {
  let PULLED = '';
  let root: string;
  let cleanup: () => Promise<void>;

  beforeEach(async () => {
    ({ root, cleanup } = await tempRoot());
  });
  afterEach(async () => cleanup());

  /** Writes checkpoints the way the flat layout had them: a namespaced store's, moved up to the root. */
  async function flatStore(): Promise<Record<string, string>> {
    const staging = await openLocalStore({ root });
    const ids: Record<string, string> = {};
    ids['llm'] = (await publish(staging, 'team-a/llm', 'team-a')).manifest.id;
    ids['default'] = (await publish(staging, 'default/default', 'default')).manifest.id;
    ids['orphan'] = (await publish(staging, 'x/orphan', undefined)).manifest.id;
    ids['dup'] = (await publish(staging, 'team-b/dup', 'team-b')).manifest.id;
    const pulled = await publishPulled(staging, 'team-a');
    PULLED = pulled.name;
    ids[PULLED] = pulled.manifest.id;
    await staging.delete('team-a/src');
    await rename(join(root, 'team-a', 'llm'), join(root, 'llm'));
    await rename(join(root, 'default'), join(root, 'default-ns'));
    await rename(join(root, 'default-ns', 'default'), join(root, 'default'));
    await rm(join(root, 'default-ns'), { recursive: true });
    await rename(join(root, 'x', 'orphan'), join(root, 'orphan'));
    await rm(join(root, 'x'), { recursive: true });
    await rename(join(root, '.oci', PULLED), join(root, PULLED));
    // A second `dup` of team-b at the top: its place is taken.
    await mkdir(join(root, 'dup'), { mode: 0o700 });
    for (const f of await readdir(join(root, 'team-b', 'dup'), { recursive: true })) {
      const st = await lstat(join(root, 'team-b', 'dup', f));
      if (st.isDirectory()) await mkdir(join(root, 'dup', f), { mode: 0o700 });
      else await writeFile(join(root, 'dup', f), await readFile(join(root, 'team-b', 'dup', f)), { mode: 0o600 });
    }
    // The old stamps were named by the bare name.
    await rename(join(root, '.verified', 'team-a+llm.json'), join(root, '.verified', 'llm.json'));
    return ids;
  }

  it('moves every old checkpoint once: to its namespace, pulled ones to .oci, the rest to .unowned', async () => {
    const ids = await flatStore();
    expect((await readdir(root)).sort()).toEqual(['.oci', '.used', '.verified', 'default', 'dup', 'llm', PULLED, 'orphan', 'team-a', 'team-b'].sort());
    const logger = createCollectingLogger();
    const store = await openLocalStore({ root, logger });
    expect(store.migrated.map((m) => [m.from, m.to, m.reason])).toEqual([
      ['default', 'default/default', undefined],
      ['dup', '.unowned/dup', 'team-b/dup exists already'],
      ['llm', 'team-a/llm', undefined],
      [PULLED, `.oci/${PULLED}`, undefined],
      ['orphan', '.unowned/orphan', 'its manifest records no namespace'],
    ]);
    expect((await readdir(root)).sort()).toEqual(['.oci', '.unowned', '.used', '.verified', 'default', 'team-a', 'team-b']);
    expect((await store.open('team-a/llm')).manifest.id).toBe(ids['llm']);
    expect((await store.open('default/default')).manifest.id).toBe(ids['default']);
    expect((await store.open(PULLED)).manifest.id).toBe(ids[PULLED]);
    expect((await store.open('team-b/dup')).manifest.id, 'the checkpoint in place is kept').toBe(ids['dup']);
    expect((await readdir(join(root, '.unowned'))).sort()).toEqual(['dup', 'orphan']);
    expect((await store.verify('team-a/llm')).hashed, 'its stamp moved with it').toBe(false);
    expect((await store.list()).map((l) => l.name)).toEqual(['default/default', 'team-a/llm', 'team-b/dup', PULLED]);
    expect(logger.lines.filter((l) => l.level === 'warn').map((l) => l.fields?.['from'])).toEqual(['dup', 'orphan']);
    // Once: a second open moves nothing.
    expect((await openLocalStore({ root })).migrated).toEqual([]);
  });

  it('finishes a migration that crashed between its two renames', async () => {
    const ids = await flatStore();
    await mkdir(join(root, '.migrating'), { mode: 0o700 });
    await rename(join(root, 'llm'), join(root, '.migrating', 'llm'));
    const store = await openLocalStore({ root });
    expect(store.migrated.map((m) => m.to)).toContain('team-a/llm');
    expect((await store.open('team-a/llm')).manifest.id).toBe(ids['llm']);
    expect((await readdir(root)).includes('.migrating')).toBe(false);
  });
});
