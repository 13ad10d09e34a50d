/**
 * The OCI registry store against a real docker-registry (Debian's, provisioned by setup) on loopback: push and
 * pull round trips, the file cache, resume of broken transfers in both directions, Basic and Bearer auth, TLS
 * with a private CA, and bad input (wrong digest, truncated blob, a registry killed mid-pull, a foreign
 * artifact), each failing with its code and leaving no checkpoint and no temporary directory behind.
 */
import { mkdtemp, open as openFile, readdir, readFile, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { sha256Digest, RegistryClient } from '../../src/store/oci/client.js';
import { CHECKPOINT_CONFIG_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE } from '../../src/store/oci/artifact.js';
import { OciErrorCode } from '../../src/store/oci/errors.js';
import { pullCheckpoint } from '../../src/store/oci/pull.js';
import { pushCheckpoint } from '../../src/store/oci/push.js';
import { isThawError } from '../../src/errors.js';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { makeTlsFiles, startBreakingProxy, startTokenServer, writeHtpasswd } from '../helpers/registry.js';
import { rejection } from '../helpers/rejection.js';

const MiB = 1024 * 1024;
/** Small chunks, so that a few MiB exercise chunked layers, chunked uploads and range requests. */
const CHUNK = 1 * MiB;

async function makeStore(prefix: string): Promise<{ store: LocalStore; root: string }> {
  const root = await mkdtemp(join(tmpdir(), prefix));
  return { store: await openLocalStore({ root }), root };
}

/** A published checkpoint with a `pages-1.img` of `pagesBytes` (several chunks) and small files. */
async function makeCheckpoint(store: LocalStore, name: string, pagesBytes = 5 * MiB + 123, seed = 1): Promise<void> {
  const pending = await store.beginCheckpoint(key(name));
  await writeCheckpointFiles(pending.paths, pagesBytes);
  // Make the pages differ per seed, so that two checkpoints share only the small files.
  const fh = await openFile(join(pending.paths.criuDir, 'pages-1.img'), 'r+');
  await fh.write(Buffer.from(`seed-${seed}`), 0, undefined, 0);
  await fh.close();
  await pending.publish(manifestFields());
}

/** The store key of a test checkpoint: the fixture manifests are of namespace `default`. */
const key = (name: string): string => `default/${name}`;

/** Nothing but the published checkpoints (and the store's own dot-dirs) in a store root. */
async function leftovers(root: string): Promise<string[]> {
  return (await readdir(root)).filter((e) => e.startsWith('.tmp-'));
}

async function sameFiles(a: string, b: string, files: string[]): Promise<void> {
  for (const f of files) expect((await readFile(join(b, f))).equals(await readFile(join(a, f))), f).toBe(true);
}

describe('registry store: push and pull through a real registry', () => {
  let registry: RunningRegistry;
  let a: { store: LocalStore; root: string };
  let b: { store: LocalStore; root: string };
  const access = { plainHttp: true };

  beforeAll(async () => {
    registry = await startRegistry();
    a = await makeStore('thaw-reg-a-');
    b = await makeStore('thaw-reg-b-');
    await makeCheckpoint(a.store, 'qwen', 5 * MiB + 123, 1);
    await makeCheckpoint(a.store, 'qwen-2', 3 * MiB, 2);
  });
  afterAll(async () => {
    await registry?.stop();
    await rm(a.root, { recursive: true, force: true });
    await rm(b.root, { recursive: true, force: true });
  });

  it('pushes a checkpoint as an OCI artifact and pulls it on another node, byte for byte, under a digest-derived name', async () => {
    const pushed = await pushCheckpoint({ store: a.store, name: key('qwen'), reference: `${registry.host}/team/qwen:v1`, access, chunkBytes: CHUNK, monolithicMaxBytes: CHUNK / 2, uploadChunkBytes: 256 * 1024 });
    expect(pushed.digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(pushed.reference).toBe(`${registry.host}/team/qwen:v1@${pushed.digest}`);

    const pulled = await pullCheckpoint({ store: b.store, reference: `${registry.host}/team/qwen:v1`, access });
    expect(pulled.name).toBe(`oci-${pushed.digest.slice('sha256:'.length)}`);
    expect(pulled.alreadyPresent).toBe(false);
    const source = await a.store.open(key('qwen'));
    expect(pulled.checkpoint.manifest.id).toBe(source.manifest.id);
    expect(pulled.checkpoint.manifest.files).toEqual(source.manifest.files);
    expect(pulled.bytesFetched).toBe(source.manifest.totals.bytes);
    await sameFiles(source.paths.dir, pulled.checkpoint.paths.dir, source.manifest.files.map((f) => f.path));
    // It is a checkpoint of the local store like any other: permissions, verify (hashing every file).
    const opened = await b.store.open(pulled.name);
    expect((await stat(opened.paths.dir)).mode & 0o7777).toBe(0o700);
    expect((await stat(join(opened.paths.dir, 'criu/pages-1.img'))).mode & 0o7777).toBe(0o600);
    await expect(b.store.verify(pulled.name, { rehash: true })).resolves.toMatchObject({ hashed: true });

    // The image manifest is an OCI artifact of our type with one layer per chunk, annotated.
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    const got = await client.getManifest('team/qwen', 'v1');
    client.close();
    const image = JSON.parse(got.body.toString('utf8'));
    expect(image.mediaType).toBe(OCI_MANIFEST_MEDIA_TYPE);
    expect(image.artifactType).toBe('application/vnd.thaw.checkpoint.v1');
    expect(image.config.mediaType).toBe(CHECKPOINT_CONFIG_MEDIA_TYPE);
    const pages = image.layers.filter((l: { annotations: Record<string, string> }) => l.annotations['dev.thaw.file.path'] === 'criu/pages-1.img');
    expect(pages.map((l: { annotations: Record<string, string> }) => Number(l.annotations['dev.thaw.file.offset']))).toEqual([0, 1, 2, 3, 4, 5].map((i) => i * CHUNK));

    // Pulled once, not again; pushed once, nothing to upload again.
    const again = await pullCheckpoint({ store: b.store, reference: `${registry.host}/team/qwen@${pushed.digest}`, access });
    expect(again).toMatchObject({ alreadyPresent: true, bytesFetched: 0, name: pulled.name });
    const repush = await pushCheckpoint({ store: a.store, name: key('qwen'), reference: `${registry.host}/team/qwen:v1`, access, chunkBytes: CHUNK });
    expect(repush.bytesUploaded).toBe(0);
    expect(repush.digest).toBe(pushed.digest);
    expect(await leftovers(b.root)).toEqual([]);
  });

  it('stores identical files once: a second checkpoint links the files the cache holds instead of fetching them', async () => {
    await pushCheckpoint({ store: a.store, name: key('qwen-2'), reference: `${registry.host}/team/qwen:v2`, access, chunkBytes: CHUNK });
    const first = await pullCheckpoint({ store: b.store, reference: `${registry.host}/team/qwen:v1`, access });
    const second = await pullCheckpoint({ store: b.store, reference: `${registry.host}/team/qwen:v2`, access });
    const shared = second.checkpoint.manifest.files.filter((f) => f.path !== 'criu/pages-1.img');
    expect(second.bytesFromCache).toBe(shared.reduce((n, f) => n + f.size, 0));
    expect(second.bytesFetched).toBe(3 * MiB);
    for (const f of shared) {
      expect((await stat(join(second.checkpoint.paths.dir, f.path))).ino).toBe((await stat(join(first.checkpoint.paths.dir, f.path))).ino);
    }
    await expect(b.store.verify(second.name, { rehash: true })).resolves.toMatchObject({ hashed: true });
  });

  it('fetches a layer larger than rangeBytes as parallel range requests and still checks its digest', async () => {
    const c = await makeStore('thaw-reg-c-');
    try {
      const r = await pullCheckpoint({ store: c.store, reference: `${registry.host}/team/qwen:v1`, access, rangeBytes: 300 * 1024, cache: false });
      await expect(c.store.verify(r.name, { rehash: true })).resolves.toMatchObject({ hashed: true });
    } finally {
      await rm(c.root, { recursive: true, force: true });
    }
  });

  it('survives broken transfers: a push whose PATCH breaks resumes (or starts the blob over where the registry dropped the session), a pull goes on from the last byte written', async () => {
    const proxy = await startBreakingProxy({ host: '127.0.0.1', port: registry.port }, { afterBytes: 1536 * 1024, breaks: 2 });
    const c = await makeStore('thaw-reg-c-');
    try {
      await makeCheckpoint(a.store, 'resume', 6 * MiB, 3);
      const pushed = await pushCheckpoint({ store: a.store, name: key('resume'), reference: `${proxy.host}/team/resume:v1`, access, chunkBytes: 8 * MiB, monolithicMaxBytes: MiB, uploadChunkBytes: 512 * 1024, concurrency: 1 });
      expect(proxy.broken()).toBe(2);
      // distribution 2.8 drops a session whose PATCH broke (its stored size no longer matches the session
      // state), so here the blob starts over; a registry that keeps the bytes is resumed from its offset.
      expect(pushed.resumedUploads + pushed.restartedUploads).toBeGreaterThanOrEqual(1);
      const proxy2 = await startBreakingProxy({ host: '127.0.0.1', port: registry.port }, { afterBytes: 2 * MiB, breaks: 1 });
      try {
        const pulled = await pullCheckpoint({ store: c.store, reference: `${proxy2.host}/team/resume@${pushed.digest}`, access, concurrency: 1 });
        expect(proxy2.broken()).toBe(1);
        await expect(c.store.verify(pulled.name, { rehash: true })).resolves.toMatchObject({ hashed: true });
      } finally {
        await proxy2.close();
      }
    } finally {
      await proxy.close();
      await rm(c.root, { recursive: true, force: true });
    }
  });

  describe('bad input fails with its code and leaves no partial checkpoint', () => {
    async function pushFresh(name: string, seed: number): Promise<{ digest: string; pagesDigest: string }> {
      await makeCheckpoint(a.store, name, 2 * MiB, seed);
      const pushed = await pushCheckpoint({ store: a.store, name: key(name), reference: `${registry.host}/bad/${name}:v1`, access, chunkBytes: 8 * MiB });
      const pages = (await a.store.open(key(name))).manifest.files.find((f) => f.path === 'criu/pages-1.img')!;
      return { digest: pushed.digest, pagesDigest: `sha256:${pages.sha256}` };
    }

    async function expectNothingLeft(store: LocalStore, root: string): Promise<void> {
      expect((await store.list()).map((c) => c.name)).toEqual([]);
      expect(await leftovers(root)).toEqual([]);
    }

    it('a blob whose bytes do not match its digest: OCI_DIGEST_MISMATCH', async () => {
      const { pagesDigest } = await pushFresh('wrong-digest', 10);
      const data = registry.blobDataPath(pagesDigest);
      const fh = await openFile(data, 'r+');
      await fh.write(Buffer.from('tampered'), 0, undefined, 4096);
      await fh.close();
      const c = await makeStore('thaw-reg-c-');
      try {
        const err = await rejection(pullCheckpoint({ store: c.store, reference: `${registry.host}/bad/wrong-digest:v1`, access }));
        expect(isThawError(err, OciErrorCode.DIGEST_MISMATCH), String(err)).toBe(true);
        expect(err.evidence).toMatchObject({ expected: pagesDigest, file: 'criu/pages-1.img' });
        await expectNothingLeft(c.store, c.root);
      } finally {
        await rm(c.root, { recursive: true, force: true });
      }
    });

    it('a truncated blob: OCI_TRUNCATED', async () => {
      const { pagesDigest } = await pushFresh('truncated', 11);
      await truncate(registry.blobDataPath(pagesDigest), MiB);
      const c = await makeStore('thaw-reg-c-');
      try {
        const err = await rejection(pullCheckpoint({ store: c.store, reference: `${registry.host}/bad/truncated:v1`, access }));
        expect(isThawError(err, OciErrorCode.TRUNCATED), String(err)).toBe(true);
        expect(err.evidence).toMatchObject({ contentLength: MiB, expected: 2 * MiB });
        await expectNothingLeft(c.store, c.root);
      } finally {
        await rm(c.root, { recursive: true, force: true });
      }
    });

    it('a file whose chunks verify but whose whole-file sha256 is not the manifest\'s: OCI_DIGEST_MISMATCH before it can enter the cache', async () => {
      await makeCheckpoint(a.store, 'whole-file', 3 * MiB + 5, 12);
      const pushed = await pushCheckpoint({ store: a.store, name: key('whole-file'), reference: `${registry.host}/bad/whole-file:v1`, access, chunkBytes: MiB });
      const client = new RegistryClient({ registry: registry.host, plainHttp: true });
      const wrong = 'ab'.repeat(32);
      try {
        // The same layers under a checkpoint manifest that claims another sha256 for the pages file.
        const image = JSON.parse((await client.getManifest('bad/whole-file', pushed.digest)).body.toString('utf8')) as { config: { digest: string; size: number } };
        const manifest = JSON.parse((await client.getSmallBlob('bad/whole-file', image.config.digest, 1 << 20)).toString('utf8')) as { files: Array<{ path: string; sha256: string }> };
        manifest.files.find((f) => f.path === 'criu/pages-1.img')!.sha256 = wrong;
        const config = Buffer.from(JSON.stringify(manifest));
        const session = await client.startUpload('bad/whole-file');
        await client.putBlob('bad/whole-file', session, sha256Digest(config), config.length, () => Readable.from([config]));
        image.config = { ...image.config, digest: sha256Digest(config), size: config.length };
        await client.putManifest('bad/whole-file', 'v2', Buffer.from(JSON.stringify(image)), OCI_MANIFEST_MEDIA_TYPE);
      } finally {
        client.close();
      }
      const c = await makeStore('thaw-reg-c-');
      try {
        const err = await rejection(pullCheckpoint({ store: c.store, reference: `${registry.host}/bad/whole-file:v2`, access }));
        expect(isThawError(err, OciErrorCode.DIGEST_MISMATCH), String(err)).toBe(true);
        expect(err.evidence).toMatchObject({ file: 'criu/pages-1.img', expected: wrong });
        await expectNothingLeft(c.store, c.root);
        expect(await readdir(join(c.root, '.cache', 'sha256'))).not.toContain(wrong);
      } finally {
        await rm(c.root, { recursive: true, force: true });
      }
    });

    it('a manifest of another artifactType: OCI_FOREIGN_ARTIFACT', async () => {
      const client = new RegistryClient({ registry: registry.host, plainHttp: true });
      try {
        const config = Buffer.from('{}');
        const session = await client.startUpload('bad/foreign');
        await client.putBlob('bad/foreign', session, sha256Digest(config), config.length, () => Readable.from([config]));
        const manifest = { schemaVersion: 2, mediaType: OCI_MANIFEST_MEDIA_TYPE, artifactType: 'application/vnd.example.sbom.v1', config: { mediaType: 'application/vnd.oci.empty.v1+json', digest: sha256Digest(config), size: config.length }, layers: [] };
        await client.putManifest('bad/foreign', 'v1', Buffer.from(JSON.stringify(manifest)), OCI_MANIFEST_MEDIA_TYPE);
      } finally {
        client.close();
      }
      const c = await makeStore('thaw-reg-c-');
      try {
        const err = await rejection(pullCheckpoint({ store: c.store, reference: `${registry.host}/bad/foreign:v1`, access }));
        expect(isThawError(err, OciErrorCode.FOREIGN_ARTIFACT), String(err)).toBe(true);
        expect(err.evidence).toMatchObject({ artifactType: 'application/vnd.example.sbom.v1' });
        await expectNothingLeft(c.store, c.root);
      } finally {
        await rm(c.root, { recursive: true, force: true });
      }
    });

    it('a reference that could escape the store is refused before any request: OCI_INVALID_REFERENCE', async () => {
      const c = await makeStore('thaw-reg-c-');
      try {
        for (const ref of [`${registry.host}/../etc:v1`, `${registry.host}/team/Qwen:v1`, 'qwen:v1', `${registry.host}/a@sha256:12`]) {
          const err = await rejection(pullCheckpoint({ store: c.store, reference: ref, access }));
          expect(isThawError(err, OciErrorCode.INVALID_REFERENCE), `${ref}: ${String(err)}`).toBe(true);
        }
      } finally {
        await rm(c.root, { recursive: true, force: true });
      }
    });
  });
});

describe('registry store: a registry that dies mid-pull', () => {
  it('fails with OCI_REGISTRY_UNAVAILABLE after its retries and keeps nothing', async () => {
    const registry = await startRegistry();
    const a = await makeStore('thaw-reg-a-');
    const c = await makeStore('thaw-reg-c-');
    try {
      await makeCheckpoint(a.store, 'dies', 16 * MiB, 20);
      await pushCheckpoint({ store: a.store, name: key('dies'), reference: `${registry.host}/team/dies:v1`, access: { plainHttp: true }, chunkBytes: 4 * MiB });
      let killed: Promise<void> | undefined;
      const err = await rejection(
        pullCheckpoint({
          store: c.store,
          reference: `${registry.host}/team/dies:v1`,
          access: { plainHttp: true },
          concurrency: 1,
          retries: 2,
          onProgress: (n) => {
            if (n > MiB && killed === undefined) killed = registry.kill();
          },
        }),
      );
      await killed;
      expect(isThawError(err, OciErrorCode.REGISTRY_UNAVAILABLE), String(err)).toBe(true);
      expect((await c.store.list()).map((x) => x.name)).toEqual([]);
      expect(await leftovers(c.root)).toEqual([]);
    } finally {
      await registry.stop();
      await rm(a.root, { recursive: true, force: true });
      await rm(c.root, { recursive: true, force: true });
    }
  });
});

describe('registry store: authentication and TLS', () => {
  let dir: string;
  let a: { store: LocalStore; root: string };
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-reg-auth-'));
    a = await makeStore('thaw-reg-a-');
    await makeCheckpoint(a.store, 'auth', 2 * MiB, 30);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
    await rm(a.root, { recursive: true, force: true });
  });

  it('htpasswd (Basic): the right credentials push and pull; wrong or none fail with OCI_AUTH_FAILED and the registry\'s answer', async () => {
    const file = join(dir, 'htpasswd');
    await writeHtpasswd(file, { thaw: 's3cret' });
    const registry = await startRegistry({ auth: { kind: 'htpasswd', file } });
    const c = await makeStore('thaw-reg-c-');
    try {
      const access = { plainHttp: true, credentials: { username: 'thaw', password: 's3cret' } };
      const pushed = await pushCheckpoint({ store: a.store, name: key('auth'), reference: `${registry.host}/team/auth:v1`, access });
      const pulled = await pullCheckpoint({ store: c.store, reference: `${registry.host}/team/auth:v1`, access });
      expect(pulled.digest).toBe(pushed.digest);
      for (const credentials of [{ username: 'thaw', password: 'wrong' }, undefined]) {
        const d = await makeStore('thaw-reg-d-');
        try {
          const err = await rejection(pullCheckpoint({ store: d.store, reference: `${registry.host}/team/auth:v1`, access: { plainHttp: true, ...(credentials ? { credentials } : {}) } }));
          expect(isThawError(err, OciErrorCode.AUTH_FAILED), String(err)).toBe(true);
          if (credentials) expect(err.evidence).toMatchObject({ status: 401, body: { errors: [expect.objectContaining({ code: 'UNAUTHORIZED' })] } });
          expect(await leftovers(d.root)).toEqual([]);
        } finally {
          await rm(d.root, { recursive: true, force: true });
        }
      }
    } finally {
      await registry.stop();
      await rm(c.root, { recursive: true, force: true });
    }
  });

  it('token auth (Bearer): the client follows the challenge to the token server, with the credentials and the repository scope', async () => {
    const tokens = await startTokenServer(dir, 'thaw', 'tok3n');
    const registry = await startRegistry({ auth: { kind: 'token', realm: tokens.realm, service: tokens.service, issuer: tokens.issuer, rootCertBundle: tokens.certFile } });
    const c = await makeStore('thaw-reg-c-');
    try {
      const tokenHost = new URL(tokens.realm).host;
      const access = { plainHttp: true, credentials: { username: 'thaw', password: 'tok3n' }, authHosts: [tokenHost] };
      const pushed = await pushCheckpoint({ store: a.store, name: key('auth'), reference: `${registry.host}/team/tok:v1`, access });
      const pulled = await pullCheckpoint({ store: c.store, reference: `${registry.host}/team/tok:v1`, access });
      expect(pulled.digest).toBe(pushed.digest);
      expect(tokens.requests.filter((r) => r.granted).map((r) => r.scope)).toEqual(expect.arrayContaining(['repository:team/tok:pull,push', 'repository:team/tok:pull']));
      const err = await rejection(pullCheckpoint({ store: c.store, reference: `${registry.host}/team/tok:v1`, access: { ...access, credentials: { username: 'thaw', password: 'nope' } } }));
      expect(isThawError(err, OciErrorCode.AUTH_FAILED), String(err)).toBe(true);
      expect(err.evidence).toMatchObject({ tokenStatus: 401 });

      // Credentials scoped to team/tok: a pull of another repository asks the token server without them.
      const before = tokens.requests.length;
      const scoped = { ...access, credentialRepositories: ['team/tok'] };
      expect(isThawError(await rejection(pullCheckpoint({ store: c.store, reference: `${registry.host}/other/tok:v1`, access: scoped })), OciErrorCode.AUTH_FAILED)).toBe(true);
      expect(tokens.requests.slice(before)).toEqual([{ scope: 'repository:other/tok:pull', granted: false, sentCredentials: false }]);
      expect((await pullCheckpoint({ store: c.store, reference: `${registry.host}/team/tok:v1`, access: scoped })).digest).toBe(pushed.digest);

      // A token realm on a host the access does not name: refused before any request goes there.
      const sent = tokens.requests.length;
      const fresh = await makeStore('thaw-reg-c2-');
      try {
        const elsewhere = await rejection(pullCheckpoint({ store: fresh.store, reference: `${registry.host}/team/tok:v1`, access: { plainHttp: true, credentials: access.credentials } }));
        expect(elsewhere.code).toBe(OciErrorCode.NOT_ALLOWED);
        expect(elsewhere.message).toMatch(/the token realm http:\/\/127\.0\.0\.1:\d+ is not http:\/\/127\.0\.0\.1:\d+/);
        expect(tokens.requests.length).toBe(sent);
      } finally {
        await rm(fresh.root, { recursive: true, force: true });
      }
    } finally {
      await registry.stop();
      await tokens.close();
      await rm(c.root, { recursive: true, force: true });
    }
  });

  it('TLS with a private CA: trusted through `ca`; without it OCI_TLS_UNTRUSTED', async () => {
    const tls = await makeTlsFiles(dir);
    const registry = await startRegistry({ tls: { certFile: tls.certFile, keyFile: tls.keyFile, ca: tls.ca } });
    const c = await makeStore('thaw-reg-c-');
    try {
      const pushed = await pushCheckpoint({ store: a.store, name: key('auth'), reference: `${registry.host}/team/tls:v1`, access: { ca: tls.ca } });
      const pulled = await pullCheckpoint({ store: c.store, reference: `${registry.host}/team/tls:v1`, access: { ca: tls.ca } });
      expect(pulled.digest).toBe(pushed.digest);
      const d = await makeStore('thaw-reg-d-');
      try {
        const err = await rejection(pullCheckpoint({ store: d.store, reference: `${registry.host}/team/tls:v1` }));
        expect(isThawError(err, OciErrorCode.TLS_UNTRUSTED), String(err)).toBe(true);
      } finally {
        await rm(d.root, { recursive: true, force: true });
      }
    } finally {
      await registry.stop();
      await rm(c.root, { recursive: true, force: true });
    }
  });
});
