/**
 * Tenancy at the point where the agent finds a restore target's checkpoint (src/agent/checkpoint-sources.ts),
 * against a real docker-registry: a checkpoint restores only into its own namespace or one the policy shares it
 * with; a registry checkpoint only from a repository allow-listed for the pod's namespace, signed (cosign's
 * format) by a key the policy names for it; every refusal before any byte enters the local store.
 */
import { generateKeyPairSync } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCheckpointSources, type CheckpointSources } from '../../src/agent/checkpoint-sources.js';
import { parseTenancyPolicy, restoreKeyOf, type TenancyPolicy } from '../../src/agent/tenancy.js';
import { parseCheckpointReference, type CheckpointReference } from '../../src/checkpoint-reference.js';
import { silentLogger } from '../../src/log.js';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { pushCheckpoint } from '../../src/store/oci/push.js';
import { parseTrustedKey, type TrustedKey } from '../../src/store/oci/signature.js';
import { ANNOTATION_FILE_SIZE, ANNOTATION_OFFSET, ANNOTATION_PATH, CHECKPOINT_ARTIFACT_TYPE, CHECKPOINT_CONFIG_MEDIA_TYPE, CHECKPOINT_LAYER_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE } from '../../src/store/oci/artifact.js';
import { RegistryClient, sha256Digest } from '../../src/store/oci/client.js';
import { Readable } from 'node:stream';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { pushCosignStyleSignature } from '../helpers/cosign-fixture.js';
import { startTricklingProxy } from '../helpers/registry.js';
import { cosignSign, digestReference, generateCosignKeyPair } from '../helpers/cosign.js';
import { peerToolOk } from '../helpers/peer-tools.js';
import { loadTrustedKeys } from '../../src/agent/tenancy.js';
import { rejection } from '../helpers/rejection.js';

const ref = (text: string): CheckpointReference => {
  const r = parseCheckpointReference(text);
  if ('reason' in r) throw new Error(r.reason);
  return r.reference;
};

const ownedBy = (namespace: string) => {
  const f = manifestFields();
  return manifestFields({ source: { ...f.source, pod: { name: 'src', namespace, uid: '8d2f7a4e-0000-4000-8000-000000000002' } } });
};

async function waitForCondition(probe: () => boolean): Promise<void> {
  while (!probe()) await new Promise((r) => setTimeout(r, 20));
}

/** Every entry under a store root, recursively: what "nothing was written" is checked against. */
async function entries(root: string): Promise<string[]> {
  return (await readdir(root, { recursive: true })).map(String).sort();
}

/** The store key a pod of `namespace` means by an annotation value (what the NRI handler resolves). */
function keyFor(value: string, namespace: string): string {
  const r = restoreKeyOf(value, namespace);
  if ('reason' in r) throw new Error(r.reason);
  return r.key;
}

describe('tenancy: which checkpoints a namespace finds', () => {
  let dir: string;
  let seed: LocalStore;
  let registry: RunningRegistry;
  const keyA = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const keyB = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const KEY_A = '/etc/thaw/keys/team-a.pub';
  const KEY_B = '/etc/thaw/keys/team-b.pub';
  const trustedKeys = new Map<string, TrustedKey>([
    [KEY_A, parseTrustedKey(keyA.publicKey.export({ type: 'spki', format: 'pem' }) as string, KEY_A)],
    [KEY_B, parseTrustedKey(keyB.publicKey.export({ type: 'spki', format: 'pem' }) as string, KEY_B)],
  ]);
  /** Digests of what was pushed: signed/llm:v1, unsigned/llm:v1, a second artifact for "another digest". */
  const pushed: Record<string, string> = {};

  let policy: TenancyPolicy;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-tenancy-'));
    seed = await openLocalStore({ root: join(dir, 'seed') });
    for (const [name, ns] of [['llm', 'team-b'], ['base-llm', 'platform'], ['other', 'team-a']] as const) {
      const p = await seed.beginCheckpoint(`${ns}/${name}`);
      await writeCheckpointFiles(p.paths);
      await p.publish(ownedBy(ns));
    }
    {
      // Bytes no other checkpoint here shares: a pull of it finds nothing in the file cache.
      const p = await seed.beginCheckpoint('team-a/big');
      await writeCheckpointFiles(p.paths, 5 * 1024 * 1024 + 3);
      await p.publish(ownedBy('team-a'));
    }
    registry = await startRegistry();
    const access = { plainHttp: true };
    pushed['team-a/llm:big'] = (await pushCheckpoint({ store: seed, name: 'team-a/big', reference: `${registry.host}/team-a/llm:big`, access })).digest;
    for (const repo of ['team-a/llm', 'team-a/unsigned', 'team-a/copy', 'team-c/llm']) {
      pushed[repo] = (await pushCheckpoint({ store: seed, name: 'team-b/llm', reference: `${registry.host}/${repo}:v1`, access })).digest;
    }
    pushed['team-a/llm:other'] = (await pushCheckpoint({ store: seed, name: 'team-a/other', reference: `${registry.host}/team-a/llm:other`, access })).digest;
    await pushCosignStyleSignature(registry.host, 'team-a/llm', pushed['team-a/llm']!, keyA.privateKey);
    // team-a/copy holds the same artifact with team-a/llm's signature copied over: the payload names team-a/llm.
    await pushCosignStyleSignature(registry.host, 'team-a/copy', pushed['team-a/copy']!, keyA.privateKey, { dockerReference: `${registry.host}/team-a/llm` });
    // The :other artifact carries a signature made over the v1 digest (another digest than its own).
    await pushCosignStyleSignature(registry.host, 'team-a/llm', pushed['team-a/llm:other']!, keyA.privateKey, { signedDigest: pushed['team-a/llm']! });
    await pushHugeArtifact(registry.host, 'lab/huge', (await seed.open('team-b/llm')).manifest);
    policy = parseTenancyPolicy({
      shared: [{ from: 'platform/base-llm', to: ['team-a'] }],
      namespaces: {
        'team-a': { registries: [{ prefix: `${registry.host}/team-a`, keys: [KEY_A] }, { prefix: `${registry.host}/lab`, allowUnsigned: true }] },
        'team-q': { quotaBytes: 10, registries: [{ prefix: `${registry.host}/lab`, allowUnsigned: true }, { prefix: `${registry.host}/team-a`, keys: [KEY_A] }] },
        'team-b': { registries: [{ prefix: `${registry.host}/team-a`, keys: [KEY_B] }] },
      },
    });
  });
  afterAll(async () => {
    await registry?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  /** A fresh node: its local store (empty), the seed store as the shared volume, the registry. */
  async function node(label: string): Promise<{ local: LocalStore; sources: CheckpointSources }> {
    const local = await openLocalStore({ root: join(dir, label) });
    const sources = createCheckpointSources({ local, shared: seed, logger: silentLogger, policy, trustedKeys, registry: { access: { [registry.host]: { plainHttp: true } } } });
    return { local, sources };
  }

  it("restores a checkpoint into its own namespace, refuses it to another, and never copies a refused one", async () => {
    const { local, sources } = await node('own');
    try {
      const before = await entries(local.root);
      // A pod of team-a naming `llm` means team-a/llm: team-b's checkpoint of that name is not even looked at.
      const bare = await rejection(sources.find(keyFor('llm', 'team-a'), undefined, { namespace: 'team-a' }));
      expect(bare.code).toBe('STORE_NOT_FOUND');
      // Naming team-b's explicitly: refused by the policy.
      const err = await rejection(sources.find(keyFor('team-b/llm', 'team-a'), undefined, { namespace: 'team-a' }));
      expect(err.code).toBe('RESTORE_NOT_ALLOWED');
      expect(err.message).toMatch(/checkpoint team-b\/llm belongs to namespace team-b; a pod of team-a may not restore it/);
      expect(await entries(local.root)).toEqual(before);
      const found = await sources.find(keyFor('llm', 'team-b'), undefined, { namespace: 'team-b' });
      expect(found).toMatchObject({ kind: 'incoming', from: 'shared' });
      await (found as { ready: Promise<unknown> }).ready;
      // Now local: still team-b's only.
      expect(await sources.find(keyFor('llm', 'team-b'), undefined, { namespace: 'team-b' })).toMatchObject({ kind: 'local' });
      expect((await rejection(sources.find(keyFor('llm', 'team-a'), undefined, { namespace: 'team-a' }))).code).toBe('STORE_NOT_FOUND');
      expect((await rejection(sources.find(keyFor('team-b/llm', 'team-a'), undefined, { namespace: 'team-a' }))).code).toBe('RESTORE_NOT_ALLOWED');
    } finally {
      await sources.close();
    }
  });

  it('a shared checkpoint restores in the namespace the policy grants, in no other', async () => {
    const { sources } = await node('shared');
    try {
      expect(await sources.find(keyFor('platform/base-llm', 'team-a'), undefined, { namespace: 'team-a' })).toMatchObject({ kind: 'incoming' });
      expect((await rejection(sources.find(keyFor('platform/base-llm', 'team-b'), undefined, { namespace: 'team-b' }))).code).toBe('RESTORE_NOT_ALLOWED');
      // The bare name is the asking pod's own namespace's, never the shared one.
      expect((await rejection(sources.find(keyFor('base-llm', 'team-a'), undefined, { namespace: 'team-a' }))).code).toBe('STORE_NOT_FOUND');
    } finally {
      await sources.close();
    }
  });

  it('pulls a registry checkpoint signed by the key the policy names for the namespace and repository', async () => {
    const { local, sources } = await node('signed');
    try {
      const found = await sources.find('x', ref(`${registry.host}/team-a/llm:v1`), { namespace: 'team-a' });
      expect(found).toMatchObject({ kind: 'incoming', from: 'registry' });
      await (found as { ready: Promise<unknown> }).ready;
      const name = `oci-${pushed['team-a/llm']!.slice('sha256:'.length)}`;
      expect(await entries(local.root)).toContain(`.oci/${name}`);
      // The same bytes, now local, for team-b, whose policy trusts another key: re-checked, refused.
      const err = await rejection(sources.find('x', ref(`${registry.host}/team-a/llm@${pushed['team-a/llm']}`), { namespace: 'team-b' }));
      expect(err.code).toBe('OCI_SIGNATURE_INVALID');
      expect(err.message).toMatch(/signed by none of the trusted keys \(\/etc\/thaw\/keys\/team-b\.pub\)/);
    } finally {
      await sources.close();
    }
  });

  it.each([
    ['unsigned', 'team-a/unsigned:v1', 'team-a', 'OCI_SIGNATURE_MISSING', /is not signed \(no sha256-[0-9a-f]{64}\.sig in the registry\)/],
    ['signed by a key the namespace does not trust', 'team-a/llm:v1', 'team-b', 'OCI_SIGNATURE_INVALID', /signed by none of the trusted keys/],
    ['a signature of another digest', 'team-a/llm:other', 'team-a', 'OCI_SIGNATURE_INVALID', /the payload signs "sha256:[0-9a-f]{64}", not sha256:/],
    ["another repository's signature copied beside it", 'team-a/copy:v1', 'team-a', 'OCI_SIGNATURE_INVALID', /the payload names repository ".*\/team-a\/llm", not .*\/team-a\/copy/],
    ['a repository not allow-listed for the namespace', 'team-c/llm:v1', 'team-a', 'RESTORE_NOT_ALLOWED', /is not allow-listed for namespace team-a/],
    ['a namespace with no registry at all', 'team-a/llm:v1', 'team-z', 'RESTORE_NOT_ALLOWED', /is not allow-listed for namespace team-z/],
  ])('refuses %s before any byte is stored', async (label, repoTag, namespace, code, message) => {
    const { local, sources } = await node(`refused-${label.replace(/[^a-z]+/g, '-')}`);
    try {
      const before = await entries(local.root);
      const err = await rejection(sources.find('x', ref(`${registry.host}/${repoTag}`), { namespace }));
      expect(err.code, err.message).toBe(code);
      expect(err.message).toMatch(message);
      expect(await entries(local.root)).toEqual(before);
    } finally {
      await sources.close();
    }
  });

  it('refuses a manifest declaring 10 TB, and one over the namespace quota, before any write', async () => {
    const { local, sources } = await node('huge');
    try {
      const before = await entries(local.root);
      const huge = await rejection(sources.find('x', ref(`${registry.host}/lab/huge:v1`), { namespace: 'team-a' }));
      expect(huge.code, huge.message).toBe('RESTORE_NO_ROOM');
      expect(huge.message).toMatch(/declares 10000000000000 bytes: .*no room .*the store's filesystem has \d+ bytes free, 10000000000000 are needed/);
      const quota = await rejection(sources.find('x', ref(`${registry.host}/team-a/llm:v1`), { namespace: 'team-q' }));
      expect(quota.code, quota.message).toBe('RESTORE_NO_ROOM');
      expect(quota.message).toMatch(/namespace team-q holds 0 bytes and needs \d+ more; its quota is 10/);
      expect(await entries(local.root)).toEqual(before);
    } finally {
      await sources.close();
    }
  });

  it("cancels a trickling registry's pull when the last pod that wanted it is gone, keeping nothing", async () => {
    const trickle = await startTricklingProxy({ host: '127.0.0.1', port: registry.port }, { freeBytes: 64 * 1024, dripBytes: 64, everyMs: 100 });
    const local = await openLocalStore({ root: join(dir, 'trickle') });
    const open = parseTenancyPolicy({ namespaces: { 'team-a': { registries: [{ prefix: `${trickle.host}/team-a`, allowUnsigned: true }] } } });
    const sources = createCheckpointSources({ local, logger: silentLogger, policy: open, registry: { access: { [trickle.host]: { plainHttp: true } } } });
    try {
      // Two pods want v1; the first goes, the second stays: the pull goes on and completes once released.
      const [podA, podB] = [new AbortController(), new AbortController()];
      const a = await sources.find('x', ref(`${trickle.host}/team-a/llm:v1`), { namespace: 'team-a', interest: podA.signal });
      const b = await sources.find('x', ref(`${trickle.host}/team-a/llm:v1`), { namespace: 'team-a', interest: podB.signal });
      if (a.kind !== 'incoming' || b.kind !== 'incoming') throw new Error('expected a pull');
      expect(a.ready).toBe(b.ready);
      podA.abort();
      trickle.release();
      await expect(b.ready).resolves.toMatchObject({ name: a.checkpoint.name });
      const afterFirst = await entries(local.root);
      expect(afterFirst).toContain(`.oci/${a.checkpoint.name}`);
      // One pod wants :big and goes while its layers trickle: the pull is cancelled, nothing is kept.
      const slow = await startTricklingProxy({ host: '127.0.0.1', port: registry.port }, { freeBytes: 64 * 1024, dripBytes: 64, everyMs: 100 });
      const sources2 = createCheckpointSources({ local, logger: silentLogger, policy: parseTenancyPolicy({ namespaces: { 'team-a': { registries: [{ prefix: `${slow.host}/team-a`, allowUnsigned: true }] } } }), registry: { access: { [slow.host]: { plainHttp: true } } } });
      try {
        const podC = new AbortController();
        const c = await sources2.find('x', ref(`${slow.host}/team-a/llm:big`), { namespace: 'team-a', interest: podC.signal });
        if (c.kind !== 'incoming') throw new Error('expected a pull');
        await waitForCondition(() => slow.connections() > 0);
        podC.abort();
        const err = await rejection(c.ready);
        expect(err.code, err.message).toMatch(/ABORTED$/);
        expect(await entries(local.root)).toEqual(afterFirst);
      } finally {
        await sources2.close();
        await slow.close();
      }
    } finally {
      await sources.close();
      await trickle.close();
    }
  });

  it('accepts a checkpoint signed by real cosign (3.1.1, key-based: tag scheme and default bundle), with the public key cosign made', async () => {
    const keysDir = await mkdtemp(join(dir, 'cosign-'));
    const keys = await generateCosignKeyPair(keysDir);
    const digest = (await pushCheckpoint({ store: seed, name: 'team-b/llm', reference: `${registry.host}/team-s/llm:v1`, access: { plainHttp: true } })).digest;
    await peerToolOk('cosign', [
      'sign', '--key', keys.keyFile, '--use-signing-config=false', '--tlog-upload=false', '--new-bundle-format=false', '--yes',
      '--allow-http-registry', '--allow-insecure-registry', digestReference(registry.host, 'team-s/llm', digest),
    ], { home: keys.home, env: { COSIGN_PASSWORD: keys.password } });
    const signed = parseTenancyPolicy({ namespaces: { 'team-s': { registries: [{ prefix: `${registry.host}/team-s`, keys: [keys.publicKeyFile] }] }, 'team-a': { registries: [{ prefix: `${registry.host}/team-s`, keys: [KEY_A] }] } } });
    const local = await openLocalStore({ root: join(dir, 'cosigned') });
    const sources = createCheckpointSources({ local, logger: silentLogger, policy: signed, trustedKeys: new Map([...(await loadTrustedKeys(parseTenancyPolicy({ namespaces: { 'team-s': { registries: [{ prefix: `${registry.host}/team-s`, keys: [keys.publicKeyFile] }] } } }))), [KEY_A, trustedKeys.get(KEY_A)!]]), registry: { access: { [registry.host]: { plainHttp: true } } } });
    try {
      // Another namespace trusting another key: the same cosign signature is refused, nothing stored.
      expect((await rejection(sources.find('x', ref(`${registry.host}/team-s/llm:v1`), { namespace: 'team-a' }))).code).toBe('OCI_SIGNATURE_INVALID');
      expect(await entries(local.root)).toEqual([]);
      const found = await sources.find('x', ref(`${registry.host}/team-s/llm:v1`), { namespace: 'team-s' });
      if (found.kind !== 'incoming') throw new Error('expected a pull');
      await expect(found.ready).resolves.toMatchObject({ name: `oci-${digest.slice('sha256:'.length)}` });

      // cosign 3's default format (a sigstore bundle found through the referrers tag): accepted the same way.
      const bundled = (await pushCheckpoint({ store: seed, name: 'team-a/big', reference: `${registry.host}/team-s/bundled:v1`, access: { plainHttp: true } })).digest;
      await cosignSign({ registryHost: registry.host, repository: 'team-s/bundled', digest: bundled, keys });
      const wrongKey = await rejection(sources.find('x', ref(`${registry.host}/team-s/bundled:v1`), { namespace: 'team-a' }));
      expect(wrongKey.code, wrongKey.message).toBe('OCI_SIGNATURE_INVALID');
      expect(wrongKey.message).toMatch(/no bundle in .* verifies: signed by none of the trusted keys/);
      const viaBundle = await sources.find('x', ref(`${registry.host}/team-s/bundled:v1`), { namespace: 'team-s' });
      if (viaBundle.kind !== 'incoming') throw new Error('expected a pull');
      await expect(viaBundle.ready).resolves.toMatchObject({ name: `oci-${bundled.slice('sha256:'.length)}` });
    } finally {
      await sources.close();
    }
  });

  it('50 distinct references at once: two transfers run, the rest wait their turn; transfer memory stays under 2 x 96 MiB + 32 MiB; all arrive', async () => {
    const N = 50;
    const many = await openLocalStore({ root: join(dir, 'many-seed') });
    const refs: string[] = [];
    for (let i = 0; i < N; i++) {
      const p = await many.beginCheckpoint(`team-a/c${i}`);
      await writeCheckpointFiles(p.paths, 1024 * 1024 + i); // distinct bytes: distinct digests, more than the proxy lets through
      await p.publish(ownedBy('team-a'));
      await pushCheckpoint({ store: many, name: `team-a/c${i}`, reference: `${registry.host}/many/c${i}:v1`, access: { plainHttp: true } });
    }
    const trickle = await startTricklingProxy({ host: '127.0.0.1', port: registry.port }, { freeBytes: 256 * 1024, dripBytes: 64, everyMs: 100 });
    for (let i = 0; i < N; i++) refs.push(`${trickle.host}/many/c${i}:v1`);
    const local = await openLocalStore({ root: join(dir, 'many') });
    const open = parseTenancyPolicy({ namespaces: { 'team-a': { registries: [{ prefix: `${trickle.host}/many`, allowUnsigned: true }] } } });
    // The 50 manifests and configs share the proxy's connections: their resolve gets more than the NRI-time second.
    const sources = createCheckpointSources({ local, logger: silentLogger, policy: open, registry: { access: { [trickle.host]: { plainHttp: true } }, resolveTimeoutMs: 60_000 } });
    try {
      const before = process.memoryUsage().arrayBuffers;
      const found = await Promise.all(refs.map((r) => sources.find('x', ref(r), { namespace: 'team-a' })));
      await waitForCondition(() => sources.transfersRunning() === 2);
      const during = process.memoryUsage().arrayBuffers - before;
      console.log(`50 references: ${sources.transfersRunning()} transfers running, array buffers +${(during / 2 ** 20).toFixed(1)} MiB`);
      expect(sources.transfersRunning()).toBe(2);
      expect(during).toBeLessThan(2 * 96 * 2 ** 20 + 32 * 2 ** 20);
      trickle.release();
      const names = await Promise.all(found.map((f) => (f.kind === 'incoming' ? f.ready : Promise.resolve(f.checkpoint)).then((c) => c.name)));
      expect(new Set(names).size).toBe(N);
    } finally {
      await sources.close();
      await trickle.close();
    }
  }, 240_000);

  it('reaches no registry host the access file does not name', async () => {
    const local = await openLocalStore({ root: join(dir, 'no-host') });
    const open = parseTenancyPolicy({ namespaces: { 'team-a': { registries: [{ prefix: 'elsewhere.example:5000/team-a', allowUnsigned: true }] } } });
    const sources = createCheckpointSources({ local, logger: silentLogger, policy: open, registry: { access: { [registry.host]: { plainHttp: true } } } });
    try {
      const err = await rejection(sources.find('x', ref('elsewhere.example:5000/team-a/llm:v1'), { namespace: 'team-a' }));
      expect(err.code).toBe('OCI_NOT_ALLOWED');
    } finally {
      await sources.close();
    }
  });
});

/**
 * A checkpoint artifact whose manifest declares one 10 TB file: its one layer descriptor claims 10 TB and points at
 * a small blob (the registry checks that a referenced blob exists, not its size). Nothing may ever fetch it.
 */
async function pushHugeArtifact(registry: string, repository: string, base: import('../../src/store/manifest.js').Manifest): Promise<void> {
  const SIZE = 10_000_000_000_000;
  const client = new RegistryClient({ registry, plainHttp: true });
  try {
    const put = async (data: Buffer): Promise<string> => {
      const digest = sha256Digest(data);
      await client.putBlob(repository, await client.startUpload(repository), digest, data.length, () => Readable.from([data]));
      return digest;
    };
    const stub = await put(Buffer.from('not ten terabytes'));
    const manifest = { ...base, files: [{ path: 'criu/pages-1.img', size: SIZE, sha256: stub.slice('sha256:'.length), mode: 0o600 }], totals: { bytes: SIZE, fileCount: 1 } };
    const config = Buffer.from(JSON.stringify(manifest));
    const configDigest = await put(config);
    const image = {
      schemaVersion: 2, mediaType: OCI_MANIFEST_MEDIA_TYPE, artifactType: CHECKPOINT_ARTIFACT_TYPE,
      config: { mediaType: CHECKPOINT_CONFIG_MEDIA_TYPE, digest: configDigest, size: config.length },
      layers: [{ mediaType: CHECKPOINT_LAYER_MEDIA_TYPE, digest: stub, size: SIZE, annotations: { [ANNOTATION_PATH]: 'criu/pages-1.img', [ANNOTATION_OFFSET]: '0', [ANNOTATION_FILE_SIZE]: String(SIZE) } }],
    };
    await client.putManifest(repository, 'v1', Buffer.from(JSON.stringify(image)), OCI_MANIFEST_MEDIA_TYPE);
  } finally {
    client.close();
  }
}
