/**
 * thaw signs what it pushes (src/store/oci/sign.ts, node:crypto) against a real docker-registry on loopback, and
 * the real cosign (3.1.1, provisioned by scripts/setup.sh) is the judge:
 * - a checkpoint pushed with a signing key is accepted by `cosign verify --key <pub> --insecure-ignore-tlog=true`
 *   (the flags cosign needs offline; no bundle format flag: its default) and by thaw's own verification, refused
 *   by both with another key;
 * - a signature cosign made under the same tag stays when thaw adds its own (both keys verify), and a second push
 *   with the same key adds nothing;
 * - `thaw push --sign-key` does the same from the CLI;
 * - an agent configured with a signing key others can read refuses to start (exit 2, AGENT_CONFIG_INVALID);
 * - the key file: group/other-readable, a symlink, another user's, cosign's encrypted format, an RSA key: refused
 *   (OCI_SIGNING_KEY_INVALID) before anything is uploaded.
 */
import { execFile } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { ensureBuilt, PACKAGE_ROOT } from '../../src/node-stack/thaw-plugin-process.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { RegistryClient } from '../../src/store/oci/client.js';
import { pushCheckpoint } from '../../src/store/oci/push.js';
import { loadSigningKey, type SigningKey } from '../../src/store/oci/sign.js';
import { parseTrustedKey, signatureTagFor, verifyCosignSignature } from '../../src/store/oci/signature.js';
import { cosignVerify, digestReference, generateCosignKeyPair, type CosignKeyPair } from '../helpers/cosign.js';
import { peerToolOk } from '../helpers/peer-tools.js';
import { openssl } from '../helpers/registry.js';
import { rejection } from '../helpers/rejection.js';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';

const execFileP = promisify(execFile);
const CLI = join(PACKAGE_ROOT, 'dist/src/cli/main.js');

/** A fresh ECDSA P-256 key pair as the operator makes it: PKCS#8 PEM private key (mode 0600), SPKI PEM public key. */
async function writeKeyPair(dir: string, name: string): Promise<{ keyFile: string; publicKeyFile: string }> {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const keyFile = join(dir, `${name}.key`);
  const publicKeyFile = join(dir, `${name}.pub`);
  await writeFile(keyFile, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
  await writeFile(publicKeyFile, publicKey.export({ type: 'spki', format: 'pem' }), { mode: 0o644 });
  return { keyFile, publicKeyFile };
}

describe('thaw signs its pushes in cosign\'s format', () => {
  let registry: RunningRegistry;
  let work: string;
  let store: LocalStore;
  let home: string;
  let mine: { keyFile: string; publicKeyFile: string };
  let theirs: { keyFile: string; publicKeyFile: string };
  let key: SigningKey;

  const verifyWithThaw = async (repository: string, digest: string, publicKeyFile: string) => {
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    try {
      return await verifyCosignSignature(client, { registry: registry.host, repository, digest }, [parseTrustedKey(await readFile(publicKeyFile, 'utf8'), publicKeyFile)]);
    } finally {
      client.close();
    }
  };

  beforeAll(async () => {
    ensureBuilt();
    registry = await startRegistry();
    work = await mkdtemp(join(tmpdir(), 'thaw-signing-'));
    home = join(work, 'home');
    store = await openLocalStore({ root: join(work, 'store') });
    const pending = await store.beginCheckpoint('default/worker');
    await writeCheckpointFiles(pending.paths, 2 * 1024 * 1024 + 5);
    await pending.publish(manifestFields());
    mine = await writeKeyPair(work, 'mine');
    theirs = await writeKeyPair(work, 'theirs');
    key = await loadSigningKey(mine.keyFile);
  }, 120_000);

  afterAll(async () => {
    await registry?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('a signed push is accepted by cosign verify (3.1.1, offline) and by thaw\'s verification with its key, refused by both with another', async () => {
    const r = await pushCheckpoint({ store, name: 'default/worker', reference: `${registry.host}/team/signed:v1`, access: { plainHttp: true }, sign: key });
    expect(r.signature?.tag).toBe(signatureTagFor(r.digest));
    expect(r.signature?.added).toBe(true);
    const ok = await cosignVerify({ registryHost: registry.host, repository: 'team/signed', digest: r.digest, publicKeyFile: mine.publicKeyFile, home });
    expect(ok.code, ok.stderr).toBe(0);
    const claims = JSON.parse(ok.stdout) as Array<{ critical: { identity: { 'docker-reference': string }; image: { 'docker-manifest-digest': string } } }>;
    expect(claims.map((c) => [c.critical.image['docker-manifest-digest'], c.critical.identity['docker-reference']])).toEqual([[r.digest, `${registry.host}/team/signed`]]);
    expect(await verifyWithThaw('team/signed', r.digest, mine.publicKeyFile)).toEqual({ key: mine.publicKeyFile, layer: r.signature!.layer });

    const wrong = await cosignVerify({ registryHost: registry.host, repository: 'team/signed', digest: r.digest, publicKeyFile: theirs.publicKeyFile, home });
    expect(wrong.code).not.toBe(0);
    expect((await rejection(verifyWithThaw('team/signed', r.digest, theirs.publicKeyFile))).code).toBe('OCI_SIGNATURE_INVALID');
  });

  it('keeps a signature cosign made under the same tag, and adds nothing when this key signed already', async () => {
    const unsigned = await pushCheckpoint({ store, name: 'default/worker', reference: `${registry.host}/team/both:v1`, access: { plainHttp: true } });
    const cosignKeys: CosignKeyPair = await generateCosignKeyPair(await mkdtemp(join(work, 'cosign-')));
    await peerToolOk('cosign', [
      'sign', '--key', cosignKeys.keyFile, '--use-signing-config=false', '--tlog-upload=false', '--new-bundle-format=false', '--yes',
      '--allow-http-registry', '--allow-insecure-registry', digestReference(registry.host, 'team/both', unsigned.digest),
    ], { home: cosignKeys.home, env: { COSIGN_PASSWORD: cosignKeys.password } });
    const again = await pushCheckpoint({ store, name: 'default/worker', reference: `${registry.host}/team/both:v1`, access: { plainHttp: true }, sign: key });
    expect(again.digest).toBe(unsigned.digest);
    expect(again.signature?.added).toBe(true);
    for (const pub of [cosignKeys.publicKeyFile, mine.publicKeyFile]) {
      const v = await cosignVerify({ registryHost: registry.host, repository: 'team/both', digest: again.digest, publicKeyFile: pub, home });
      expect(v.code, `${pub}: ${v.stderr}`).toBe(0);
      expect((await verifyWithThaw('team/both', again.digest, pub)).key).toBe(pub);
    }
    const third = await pushCheckpoint({ store, name: 'default/worker', reference: `${registry.host}/team/both:v1`, access: { plainHttp: true }, sign: key });
    expect([third.signature?.added, third.signature?.manifestDigest]).toEqual([false, again.signature?.manifestDigest]);
  }, 120_000);

  it('thaw push --sign-key signs from the CLI, with a key made by the openssl commands docs/security.md gives', async () => {
    const ossl = await mkdtemp(join(work, 'openssl-'));
    await openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', 'sign.key'], ossl);
    await openssl(['pkey', '-in', 'sign.key', '-pubout', '-out', 'sign.pub'], ossl);
    await chmod(join(ossl, 'sign.key'), 0o600);
    const access = join(work, 'registry.json');
    await writeFile(access, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
    const config = join(work, 'agent.yaml');
    await writeFile(config, `registry:\n  config: ${access}\n`);
    const r = await execFileP(process.execPath, [CLI, 'push', 'worker', `${registry.host}/team/cli:v1`, '--sign-key', join(ossl, 'sign.key'), '--config', config, '--paths-store-root', store.root, '--json'], { timeout: 120_000, env: { ...process.env, THAW_API_SOCKET: '/nonexistent' } });
    const pushed = JSON.parse(r.stdout) as { digest: string; signature: { tag: string } };
    expect(pushed.signature.tag).toBe(signatureTagFor(pushed.digest));
    const v = await cosignVerify({ registryHost: registry.host, repository: 'team/cli', digest: pushed.digest, publicKeyFile: join(ossl, 'sign.pub'), home });
    expect(v.code, v.stderr).toBe(0);
    expect((await verifyWithThaw('team/cli', pushed.digest, join(ossl, 'sign.pub'))).key).toBe(join(ossl, 'sign.pub'));

    // A key file others can read: refused before anything is uploaded (no tag appears).
    await chmod(theirs.keyFile, 0o640);
    const refused = await execFileP(process.execPath, [CLI, 'push', 'worker', `${registry.host}/team/cli-refused:v1`, '--sign-key', theirs.keyFile, '--config', config, '--paths-store-root', store.root], { env: { ...process.env, THAW_API_SOCKET: '/nonexistent' } }).then(
      () => ({ code: 0, stderr: '' }),
      (err: { code?: number; stderr?: string }) => ({ code: err.code, stderr: err.stderr ?? '' }),
    );
    await chmod(theirs.keyFile, 0o600);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/OCI_SIGNING_KEY_INVALID|mode 0640/);
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    try {
      expect((await rejection(client.getManifest('team/cli-refused', 'v1'))).code).toBe('OCI_NOT_FOUND');
    } finally {
      client.close();
    }
  }, 120_000);

  it('an agent whose namespace signing key others can read does not start: exit 2, AGENT_CONFIG_INVALID naming the file and its mode', async () => {
    const dir = await mkdtemp(join(work, 'agent-'));
    const { keyFile, publicKeyFile } = await writeKeyPair(dir, 'snap');
    await chmod(keyFile, 0o644);
    const config = join(dir, 'agent.yaml');
    await writeFile(config, [
      `paths:\n  storeRoot: ${join(dir, 'never-created')}`,
      'tenancy:\n  namespaces:\n    team-a:',
      `      registries: [{prefix: "${registry.host}/team-a", keys: ["${publicKeyFile}"]}]`,
      `      snapshotRepository: "${registry.host}/team-a/snaps"`,
      `      signingKey: "${keyFile}"\n`,
    ].join('\n'));
    const r = await execFileP(process.execPath, [CLI, 'agent', '--config', config, '--api-socket', join(dir, 'agent.sock')], { timeout: 60_000 }).then(
      () => ({ code: 0, stderr: '' }),
      (err: { code?: number; stderr?: string }) => ({ code: err.code, stderr: err.stderr ?? '' }),
    );
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toContain(`${keyFile}: has mode 0644: a signing key must be readable by its owner only`);
    expect(r.stderr).toContain('AGENT_CONFIG_INVALID');
    expect(existsSync(join(dir, 'never-created'))).toBe(false);
    expect(existsSync(join(dir, 'agent.sock'))).toBe(false);
  });

  it('refuses key files that are readable by others, symlinks, another user\'s, cosign\'s encrypted format, other key kinds', async () => {
    const dir = await mkdtemp(join(work, 'bad-keys-'));
    const { keyFile } = await writeKeyPair(dir, 'k');
    const refusal = async (path: string) => {
      const err = await rejection(loadSigningKey(path));
      expect(err.code, err.message).toBe('OCI_SIGNING_KEY_INVALID');
      return err.message;
    };
    await chmod(keyFile, 0o644);
    expect(await refusal(keyFile)).toMatch(/mode 0644/);
    await chmod(keyFile, 0o604);
    expect(await refusal(keyFile)).toMatch(/mode 0604/);
    await chmod(keyFile, 0o600);
    await expect(loadSigningKey(keyFile)).resolves.toMatchObject({ source: keyFile });
    const link = join(dir, 'link.key');
    await symlink(keyFile, link);
    expect(await refusal(link)).toMatch(/symlink/);
    await chown(keyFile, 65534, 65534);
    expect(await refusal(keyFile)).toMatch(/owned by uid 65534/);
    await chown(keyFile, 0, 0);
    expect(await refusal('relative.key')).toMatch(/absolute/);

    const cosignKeys = await generateCosignKeyPair(await mkdtemp(join(dir, 'cosign-')));
    await chmod(cosignKeys.keyFile, 0o600);
    expect(await refusal(cosignKeys.keyFile)).toMatch(/cosign encrypted key.*openssl genpkey/);
    const rsa = join(dir, 'rsa.key');
    await writeFile(rsa, generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    expect(await refusal(rsa)).toMatch(/an rsa key/);
    const p384 = join(dir, 'p384.key');
    await writeFile(p384, generateKeyPairSync('ec', { namedCurve: 'P-384' }).privateKey.export({ type: 'sec1', format: 'pem' }), { mode: 0o600 });
    expect(await refusal(p384)).toMatch(/secp384r1/);
    const notAKey = join(dir, 'garbage.key');
    await writeFile(notAKey, 'not a key\n', { mode: 0o600 });
    expect(await refusal(notAKey)).toMatch(/not a PEM private key/);
  }, 120_000);
});
