/**
 * thaw's checkpoint artifacts with the tools platform teams use, each the real tool (provisioned by
 * scripts/setup.sh under /opt/thaw/stack/peer-tools) against a real docker-registry on loopback:
 * - a checkpoint pushed by `thaw push` is pulled by `oras pull` into the same files, byte for byte, and its
 *   config blob is the checkpoint's manifest.json; chunks of a file larger than the chunk size come as pieces
 *   whose concatenation in name order is the file;
 * - an artifact with thaw's layout pushed by `oras push` is pulled by `thaw pull` into a checkpoint that verifies
 *   (restoring one is in registry-e2e.test.ts, through containerd and CRIU);
 * - `skopeo inspect --raw` reads the manifest thaw pushed (the same bytes, the same digest) and its config;
 * - `cosign sign --key` (offline) on a pushed checkpoint: `cosign verify` accepts it with that key, refuses it with
 *   another key, and the signature is a referrer of the checkpoint (`oras discover`, the referrers tag).
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { ensureBuilt, PACKAGE_ROOT } from '../../src/node-stack/thaw-plugin-process.js';
import { openLocalStore } from '../../src/store/local-store.js';
import { MANIFEST_FILE_NAME } from '../../src/store/manifest.js';
import { CHECKPOINT_ARTIFACT_TYPE, CHECKPOINT_CONFIG_MEDIA_TYPE, CHECKPOINT_LAYER_MEDIA_TYPE } from '../../src/store/oci/artifact.js';
import { pushCheckpoint } from '../../src/store/oci/push.js';
import { cosignSign, cosignVerify, generateCosignKeyPair, type CosignKeyPair } from '../helpers/cosign.js';
import { orasPullCheckpoint, orasPushThawLayout } from '../helpers/oras.js';
import { peerToolOk } from '../helpers/peer-tools.js';
import { makeTlsFiles } from '../helpers/registry.js';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';

const execFileP = promisify(execFile);
const CLI = join(PACKAGE_ROOT, 'dist/src/cli/main.js');
const MiB = 1024 * 1024;

async function thaw(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await execFileP(process.execPath, [CLI, ...args], { timeout: 120_000, env: { ...process.env, THAW_API_SOCKET: '/nonexistent' } });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** Every regular file under `dir`, as paths relative to it, sorted. */
async function filesUnder(dir: string, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(join(dir, prefix), { withFileTypes: true })) {
    const rel = prefix === '' ? e.name : `${prefix}/${e.name}`;
    if (e.isDirectory()) out.push(...(await filesUnder(dir, rel)));
    else if (e.isFile()) out.push(rel);
  }
  return out.sort();
}

describe('thaw checkpoints with oras, skopeo and cosign', () => {
  let registry: RunningRegistry;
  let work: string;
  let storeRoot: string;
  let config: string;
  let home: string;
  let pushedDigest: string;
  const repository = 'team/worker';

  beforeAll(async () => {
    ensureBuilt();
    registry = await startRegistry();
    work = await mkdtemp(join(tmpdir(), 'thaw-interop-'));
    home = join(work, 'home');
    storeRoot = join(work, 'store-a');
    const store = await openLocalStore({ root: storeRoot });
    const pending = await store.beginCheckpoint('default/worker');
    await writeCheckpointFiles(pending.paths, 3 * MiB + 17);
    await pending.publish(manifestFields());
    const access = join(work, 'registry.json');
    await writeFile(access, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
    config = join(work, 'agent.yaml');
    await writeFile(config, `registry:\n  config: ${access}\n`);
    const push = await thaw(['push', 'worker', `${registry.host}/${repository}:v1`, '--config', config, '--paths-store-root', storeRoot, '--json']);
    expect(push.code, push.stderr).toBe(0);
    pushedDigest = (JSON.parse(push.stdout) as { digest: string }).digest;
  }, 120_000);

  afterAll(async () => {
    await registry?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('oras pull of a checkpoint thaw pushed gives the same files byte for byte, and its config is manifest.json', async () => {
    const out = join(work, 'oras-out');
    await peerToolOk('oras', ['pull', '--plain-http', '-o', out, `${registry.host}/${repository}:v1`], { home });
    const opened = await (await openLocalStore({ root: storeRoot })).open('default/worker');
    expect(await filesUnder(out)).toEqual(opened.manifest.files.map((f) => f.path).sort());
    for (const f of opened.manifest.files) {
      expect((await readFile(join(out, f.path))).equals(await readFile(join(opened.paths.dir, f.path))), f.path).toBe(true);
    }
    const cfg = await peerToolOk('oras', ['manifest', 'fetch-config', '--plain-http', `${registry.host}/${repository}@${pushedDigest}`], { home });
    expect(cfg.stdout).toBe(await readFile(join(opened.paths.dir, MANIFEST_FILE_NAME), 'utf8'));
  });

  it('oras pull of a chunked push gives pieces that, concatenated in name order, are each file', async () => {
    const store = await openLocalStore({ root: storeRoot });
    await pushCheckpoint({ store, name: 'default/worker', reference: `${registry.host}/team/chunked:v1`, access: { plainHttp: true }, chunkBytes: MiB });
    const out = join(work, 'oras-chunked');
    await peerToolOk('oras', ['pull', '--plain-http', '-o', out, `${registry.host}/team/chunked:v1`], { home });
    const pulled = await filesUnder(out);
    const opened = await store.open('default/worker');
    const pages = opened.manifest.files.find((f) => f.size > MiB);
    expect(pages, 'the fixture has a file larger than the chunk size').toBeDefined();
    for (const f of opened.manifest.files) {
      const pieces = f.size > MiB ? pulled.filter((p) => p.startsWith(`${f.path}.thaw-chunk-`)) : [f.path];
      expect(pieces.length, f.path).toBe(Math.max(1, Math.ceil(f.size / MiB)));
      const joined = Buffer.concat(await Promise.all(pieces.map((p) => readFile(join(out, p)))));
      expect(joined.equals(await readFile(join(opened.paths.dir, f.path))), f.path).toBe(true);
    }
    // The helper the restore test uses joins them the same way.
    const joinedDir = join(work, 'oras-chunked-joined');
    expect(await orasPullCheckpoint(`${registry.host}/team/chunked:v1`, joinedDir, { home })).toEqual(opened.manifest.files.map((f) => f.path));
    expect(await filesUnder(joinedDir)).toEqual([...opened.manifest.files.map((f) => f.path), MANIFEST_FILE_NAME].sort());
    for (const f of opened.manifest.files) {
      expect((await readFile(join(joinedDir, f.path))).equals(await readFile(join(opened.paths.dir, f.path))), f.path).toBe(true);
    }
  });

  it('thaw pull takes an artifact with thaw\'s layout that oras pushed, into a checkpoint that verifies with the same files', async () => {
    const opened = await (await openLocalStore({ root: storeRoot })).open('default/worker');
    const src = join(work, 'oras-src');
    for (const f of [...opened.manifest.files.map((x) => x.path), MANIFEST_FILE_NAME]) {
      await mkdir(dirname(join(src, f)), { recursive: true });
      await writeFile(join(src, f), await readFile(join(opened.paths.dir, f)));
    }
    const ref = `${registry.host}/team/from-oras:v1`;
    const digest = await orasPushThawLayout(src, ref, { home });

    const rootB = join(work, 'store-b');
    const pull = await thaw(['pull', ref, '--config', config, '--paths-store-root', rootB, '--json']);
    expect(pull.code, pull.stderr).toBe(0);
    const { name } = JSON.parse(pull.stdout) as { name: string };
    expect(name).toBe(`oci-${digest.slice('sha256:'.length)}`);
    const storeB = await openLocalStore({ root: rootB });
    await storeB.verify(name);
    const b = await storeB.open(name);
    expect(b.manifest.files.map((f) => [f.path, f.sha256])).toEqual(opened.manifest.files.map((f) => [f.path, f.sha256]));
    for (const f of opened.manifest.files) {
      expect((await readFile(join(b.paths.dir, f.path))).equals(await readFile(join(opened.paths.dir, f.path))), f.path).toBe(true);
    }
  });

  it('skopeo inspect reads the manifest thaw pushed (same bytes, same digest) and its config', async () => {
    const target = `docker://${registry.host}/${repository}:v1`;
    const raw = await peerToolOk('skopeo', ['inspect', '--raw', '--tls-verify=false', target], { home });
    expect(sha256(Buffer.from(raw.stdout))).toBe(pushedDigest);
    const image = JSON.parse(raw.stdout) as { artifactType: string; config: { mediaType: string }; layers: Array<{ mediaType: string }> };
    expect(image.artifactType).toBe(CHECKPOINT_ARTIFACT_TYPE);
    expect(image.config.mediaType).toBe(CHECKPOINT_CONFIG_MEDIA_TYPE);
    expect(new Set(image.layers.map((l) => l.mediaType))).toEqual(new Set([CHECKPOINT_LAYER_MEDIA_TYPE]));
    const cfg = await peerToolOk('skopeo', ['inspect', '--raw', '--config', '--tls-verify=false', target], { home });
    const opened = await (await openLocalStore({ root: storeRoot })).open('default/worker');
    expect(cfg.stdout).toBe(await readFile(join(opened.paths.dir, MANIFEST_FILE_NAME), 'utf8'));
  });

  describe('cosign', () => {
    let keys: CosignKeyPair;
    let other: CosignKeyPair;
    let referrersTag: string;

    beforeAll(async () => {
      keys = await generateCosignKeyPair(await mkdtemp(join(work, 'keys-')));
      other = await generateCosignKeyPair(await mkdtemp(join(work, 'other-keys-')));
      ({ referrersTag } = await cosignSign({ registryHost: registry.host, repository, digest: pushedDigest, keys }));
    }, 120_000);

    it('cosign verify accepts the checkpoint with the signing key, for its digest', async () => {
      const r = await cosignVerify({ registryHost: registry.host, repository, digest: pushedDigest, publicKeyFile: keys.publicKeyFile, home: keys.home });
      expect(r.code, r.stderr).toBe(0);
      const claims = JSON.parse(r.stdout) as Array<{ critical: { image: { 'docker-manifest-digest': string } } }>;
      expect(claims.map((c) => c.critical.image['docker-manifest-digest'])).toEqual([pushedDigest]);
    });

    it('cosign verify refuses it with another key, and refuses an unsigned checkpoint', async () => {
      const wrongKey = await cosignVerify({ registryHost: registry.host, repository, digest: pushedDigest, publicKeyFile: other.publicKeyFile, home: other.home });
      expect(wrongKey.code).not.toBe(0);
      const unsigned = await pushCheckpoint({ store: await openLocalStore({ root: storeRoot }), name: 'default/worker', reference: `${registry.host}/team/unsigned:v1`, access: { plainHttp: true } });
      const none = await cosignVerify({ registryHost: registry.host, repository: 'team/unsigned', digest: unsigned.digest, publicKeyFile: keys.publicKeyFile, home: keys.home });
      expect(none.code).not.toBe(0);
    });

    it('over https with a private CA too: sign and verify a checkpoint in a TLS registry', async () => {
      const tlsDir = await mkdtemp(join(work, 'tls-'));
      const tls = await makeTlsFiles(tlsDir);
      const secure = await startRegistry({ tls: { certFile: tls.certFile, keyFile: tls.keyFile, ca: tls.ca } });
      try {
        const caStore = join(tlsDir, 'ca-store.json');
        await writeFile(caStore, JSON.stringify({ access: { [secure.host]: { caFile: tls.caFile } } }), { mode: 0o600 });
        const cfg = join(tlsDir, 'agent.yaml');
        await writeFile(cfg, `registry:\n  config: ${caStore}\n`);
        const push = await thaw(['push', 'worker', `${secure.host}/team/tls:v1`, '--config', cfg, '--paths-store-root', storeRoot, '--json']);
        expect(push.code, push.stderr).toBe(0);
        const digest = (JSON.parse(push.stdout) as { digest: string }).digest;
        await cosignSign({ registryHost: secure.host, repository: 'team/tls', digest, keys, caFile: tls.caFile });
        const r = await cosignVerify({ registryHost: secure.host, repository: 'team/tls', digest, publicKeyFile: keys.publicKeyFile, home: keys.home, caFile: tls.caFile });
        expect(r.code, r.stderr).toBe(0);
        // Without the CA it fails: cosign does not trust the registry's https, and its fallback to http for a
        // loopback registry is refused by the server. The CA is what made it work.
        const untrusted = await cosignVerify({ registryHost: secure.host, repository: 'team/tls', digest, publicKeyFile: keys.publicKeyFile, home: keys.home, plainHttp: false });
        expect(untrusted.code).not.toBe(0);
        expect(untrusted.stderr).toMatch(/certificate|HTTP request to an HTTPS server/);
      } finally {
        await secure.stop();
      }
    });

    it('the signature is a referrer of the checkpoint: oras discover lists it, the referrers tag names a manifest whose subject is the checkpoint', async () => {
      const discover = await peerToolOk('oras', ['discover', '--plain-http', '--format', 'json', `${registry.host}/${repository}@${pushedDigest}`], { home });
      const found = JSON.parse(discover.stdout) as { referrers?: Array<{ digest: string }>; manifests?: Array<{ digest: string }> };
      const referrers = found.referrers ?? found.manifests ?? [];
      expect(referrers).toHaveLength(1);
      const index = JSON.parse((await peerToolOk('oras', ['manifest', 'fetch', '--plain-http', `${registry.host}/${repository}:${referrersTag}`], { home })).stdout) as { manifests: Array<{ digest: string; artifactType?: string }> };
      expect(index.manifests.map((m) => m.digest)).toEqual([referrers[0]!.digest]);
      const sig = JSON.parse((await peerToolOk('oras', ['manifest', 'fetch', '--plain-http', `${registry.host}/${repository}@${referrers[0]!.digest}`], { home })).stdout) as {
        subject: { digest: string }; artifactType: string; layers: Array<{ mediaType: string }>;
      };
      expect(sig.subject.digest).toBe(pushedDigest);
      expect(sig.artifactType).toBe('application/vnd.dev.sigstore.bundle.v0.3+json');
      expect(sig.layers.map((l) => l.mediaType)).toEqual(['application/vnd.dev.sigstore.bundle.v0.3+json']);
    });
  });
});
