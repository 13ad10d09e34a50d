/**
 * How the agent finds a restore target's checkpoint (src/agent/checkpoint-sources.ts): the local store, then the
 * shared store (copied in, every byte checked), or a registry reference (manifest and config now, layers in the
 * background, one transfer for concurrent restores, found locally by digest afterwards without the registry).
 */
import { mkdtemp, open as openFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCheckpointSources } from '../../src/agent/checkpoint-sources.js';
import { parseTenancyPolicy } from '../../src/agent/tenancy.js';
import { parseCheckpointReference, type CheckpointReference } from '../../src/checkpoint-reference.js';
import { isThawError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { StoreErrorCode } from '../../src/store/errors.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { OciErrorCode } from '../../src/store/oci/errors.js';
import { pushCheckpoint } from '../../src/store/oci/push.js';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { rejection } from '../helpers/rejection.js';

/** manifestFields() records namespace "default": the pods here ask from it. */
const NS = { namespace: 'default' };

const ref = (text: string): CheckpointReference => {
  const r = parseCheckpointReference(text);
  if ('reason' in r) throw new Error(r.reason);
  return r.reference;
};

describe('checkpoint sources: local, shared store, registry', () => {
  let dir: string;
  let local: LocalStore;
  let shared: LocalStore;
  let registry: RunningRegistry;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-sources-'));
    local = await openLocalStore({ root: join(dir, 'local') });
    shared = await openLocalStore({ root: join(dir, 'shared') });
    for (const [store, name] of [[local, 'default/here'], [shared, 'default/on-the-volume'], [shared, 'default/damaged']] as const) {
      const p = await store.beginCheckpoint(name);
      await writeCheckpointFiles(p.paths);
      await p.publish(manifestFields());
    }
    registry = await startRegistry();
  });
  afterAll(async () => {
    await registry?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it('finds a local name locally, else copies it from the shared store, verified, keeping its manifest id', async () => {
    const sources = createCheckpointSources({ local, shared, logger: silentLogger });
    try {
      expect(await sources.find('default/here', undefined, NS)).toMatchObject({ kind: 'local', checkpoint: { name: 'default/here' } });
      const found = await sources.find('default/on-the-volume', undefined, NS);
      expect(found).toMatchObject({ kind: 'incoming', from: 'shared', checkpoint: { name: 'default/on-the-volume', paths: { dir: join(local.root, 'default/on-the-volume') } } });
      const copied = await (found as { ready: Promise<{ manifest: { id: string } }> }).ready;
      expect(copied.manifest.id).toBe((await shared.open('default/on-the-volume')).manifest.id);
      await expect(local.verify('default/on-the-volume', { rehash: true })).resolves.toMatchObject({ hashed: true });
      expect(await sources.find('default/on-the-volume', undefined, NS)).toMatchObject({ kind: 'local' });
      const err = await rejection(sources.find('default/nowhere', undefined, NS));
      expect(err.code).toBe(StoreErrorCode.NOT_FOUND);
    } finally {
      await sources.close();
    }
  });

  it('refuses a shared checkpoint whose bytes changed on the volume, leaving nothing locally', async () => {
    const fh = await openFile(join(shared.root, 'default/damaged', 'criu', 'pages-1.img'), 'r+');
    await fh.write(Buffer.from('flipped'), 0, undefined, 100);
    await fh.close();
    const sources = createCheckpointSources({ local, shared, logger: silentLogger });
    try {
      const found = await sources.find('default/damaged', undefined, NS);
      const err = await rejection((found as { ready: Promise<unknown> }).ready);
      expect(isThawError(err, StoreErrorCode.DIGEST_MISMATCH), String(err)).toBe(true);
      expect((await readdir(local.root)).filter((e) => e.startsWith('.tmp-'))).toEqual([]);
      expect(await readdir(join(local.root, 'default'))).not.toContain('damaged');
    } finally {
      await sources.close();
    }
  });

  it('pulls a registry reference once for concurrent restores, then finds it by digest without the registry', async () => {
    const pushed = await pushCheckpoint({ store: local, name: 'default/here', reference: `${registry.host}/team/here:v1`, access: { plainHttp: true } });
    const policy = parseTenancyPolicy({ namespaces: { default: { registries: [{ prefix: `${registry.host}/team`, allowUnsigned: true }] } } });
    const sources = createCheckpointSources({ local, logger: silentLogger, policy, registry: { access: { [registry.host]: { plainHttp: true } } } });
    try {
      const [a, b] = await Promise.all([sources.find('x', ref(`${registry.host}/team/here:v1`), NS), sources.find('x', ref(`${registry.host}/team/here:v1`), NS)]);
      expect(a.kind).toBe('incoming');
      expect(b.kind).toBe('incoming');
      if (a.kind !== 'incoming' || b.kind !== 'incoming') return;
      expect(a.ready).toBe(b.ready);
      expect(a.checkpoint.name).toBe(`oci-${pushed.digest.slice('sha256:'.length)}`);
      await a.ready;
      await registry.kill();
      expect(await sources.find('x', ref(`${registry.host}/team/here@${pushed.digest}`), NS)).toMatchObject({ kind: 'local', checkpoint: { name: a.checkpoint.name } });
      // By tag the manifest must be asked for, and the registry is gone: a typed error within the resolve timeout.
      const err = await rejection(sources.find('x', ref(`${registry.host}/team/here:v1`), NS));
      expect(err.code).toBe(OciErrorCode.REGISTRY_UNAVAILABLE);
    } finally {
      await sources.close();
    }
  });
});
