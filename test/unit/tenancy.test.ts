/**
 * Tenancy boundaries that are pure decisions: checkpoint names (reserved `oci-`, namespace/name), the operator's
 * policy (parse, own-namespace default, shares, registry prefixes), the compatibility check's container part,
 * and cosign simple-signing verification against fixtures made here in cosign's format (ECDSA P-256, DER, base64).
 */
import { createHash, generateKeyPairSync, sign } from 'node:crypto';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadRegistryConfig } from '../../src/agent/registry-config.js';
import { cachedValue } from '../../src/agent/agent.js';
import { checkUserCheckpointName, namespaceOfKey, parseQualifiedName, parseStoreKey, resolveStoreKey } from '../../src/checkpoint-name.js';
import { looksLikeReference } from '../../src/checkpoint-reference.js';
import { decide } from '../../src/nri-plugin/policy.js';
import { checkpointRefusal, defaultTenancyPolicy, loadSigningKeys, loadTrustedKeys, localRestoreRefusal, parseTenancyPolicy, registryGrantFor, restoreKeyOf, storeLimitsOf } from '../../src/agent/tenancy.js';
import { resolveAgentConfig } from '../../src/agent/config.js';
import { checkCompatibility, isRestorable, MANIFEST_KIND, parseManifest, type Manifest } from '../../src/store/manifest.js';
import { assertSameProcessIdentity } from '../../src/restore-engine/restore.js';
import { checkCosignBundle, checkSimpleSigningPayload, COSIGN_SIGNATURE_TYPE, dssePae, keyThatSigned, parseTrustedKey, signatureTagFor } from '../../src/store/oci/signature.js';
import { parseSigningKey, simpleSigningPayload } from '../../src/store/oci/sign.js';
import { manifestFields } from '../helpers/store-fixtures.js';

const DIGEST = `sha256:${'ab'.repeat(32)}`;

describe('checkpoint names', () => {
  it('refuses oci- names from annotations (reserved for pulled checkpoints), both roles', () => {
    for (const key of ['thaw.dev/restore', 'thaw.dev/checkpoint']) {
      const d = decide({ podAnnotations: { [key]: `oci-${'a'.repeat(64)}` }, containerName: 'w' }, { annotationPrefix: 'thaw.dev/' });
      expect(d).toMatchObject({ kind: 'rejected', annotation: key });
      expect((d as { reason: string }).reason).toMatch(/reserved for checkpoints pulled from a registry/);
    }
    expect(checkUserCheckpointName('ocia')).toBeUndefined();
  });

  it('reads namespace/name, a bare name in the default namespace, and refuses bad parts', () => {
    expect(parseQualifiedName('team-a/llm')).toEqual({ namespace: 'team-a', name: 'llm' });
    expect(parseQualifiedName('llm')).toEqual({ namespace: 'default', name: 'llm' });
    expect(parseQualifiedName('llm', 'team-b')).toEqual({ namespace: 'team-b', name: 'llm' });
    expect(parseQualifiedName('Team/llm')).toMatchObject({ reason: expect.stringMatching(/not a Kubernetes namespace name/) });
    expect(parseQualifiedName('a/b/c')).toMatchObject({ reason: expect.stringMatching(/contains '\/'/) });
    expect(parseQualifiedName(`team-a/oci-${'0'.repeat(64)}`)).toMatchObject({ reason: expect.stringMatching(/reserved/) });
  });
});

describe('store keys', () => {
  const hex = 'c'.repeat(64);
  it('are namespace/name or oci-<64 hex>; a bare name is none', () => {
    expect(parseStoreKey('team-a/llm')).toEqual({ kind: 'owned', namespace: 'team-a', name: 'llm' });
    expect(parseStoreKey(`oci-${hex}`)).toEqual({ kind: 'pulled', name: `oci-${hex}` });
    for (const bad of ['llm', 'team-a/oci-x', 'Team/llm', 'team-a/a/b', '/llm', 'team-a/', `oci-${hex.slice(1)}`]) expect(parseStoreKey(bad), bad).toHaveProperty('reason');
    expect(namespaceOfKey('team-a/llm')).toBe('team-a');
    expect(namespaceOfKey(`oci-${hex}`)).toBeUndefined();
  });

  it("resolve a caller's name: bare in the default namespace, qualified as given, pulled only where allowed", () => {
    expect(resolveStoreKey('llm', 'default')).toEqual({ key: 'default/llm' });
    expect(resolveStoreKey('team-a/llm', 'default')).toEqual({ key: 'team-a/llm' });
    expect(resolveStoreKey(`oci-${hex}`, 'default')).toHaveProperty('reason');
    expect(resolveStoreKey(`oci-${hex}`, 'default', { allowPulled: true })).toEqual({ key: `oci-${hex}` });
  });

  it("resolve an annotation in the pod's namespace: never another namespace's of the same name", () => {
    expect(restoreKeyOf('llm', 'team-b')).toEqual({ key: 'team-b/llm', owner: { namespace: 'team-b', name: 'llm' } });
    expect(restoreKeyOf('platform/base', 'team-b')).toEqual({ key: 'platform/base', owner: { namespace: 'platform', name: 'base' } });
    expect(restoreKeyOf('llm', '')).toHaveProperty('reason');
  });

  it('tell a registry reference (host first) from another namespace\'s checkpoint', () => {
    expect(looksLikeReference('registry.example.com/team/llm:v1')).toBe(true);
    expect(looksLikeReference('registry:5000/llm')).toBe(true);
    expect(looksLikeReference('localhost/llm')).toBe(true);
    expect(looksLikeReference('team-a/llm')).toBe(false);
    expect(looksLikeReference('llm')).toBe(false);
  });
});

describe('store bounds from the agent configuration', () => {
  it("take store.* (0: none) and the policy's namespace quotas, which win over store.namespaceQuotaBytes", () => {
    const c = resolveAgentConfig({
      packageRoot: '/opt/thaw/lib',
      file: { path: '/etc/thaw/agent.yaml', text: 'store:\n  quotaBytes: 1000\n  namespaceQuotaBytes: 100\ntenancy:\n  namespaces:\n    team-a:\n      quotaBytes: 500\n' },
      flags: { 'store-min-free-bytes': '7' },
    });
    const limits = storeLimitsOf(c.store, c.tenancy);
    expect([limits.totalQuotaBytes, limits.minFreeBytes, limits.namespaceQuotaBytes?.('team-a'), limits.namespaceQuotaBytes?.('team-b')]).toEqual([1000, 7, 500, 100]);
    const none = storeLimitsOf({ quotaBytes: 0, namespaceQuotaBytes: 0, minFreeBytes: 0 }, defaultTenancyPolicy());
    expect([none.totalQuotaBytes, none.minFreeBytes, none.namespaceQuotaBytes?.('team-a')]).toEqual([undefined, undefined, undefined]);
    expect(() => resolveAgentConfig({ packageRoot: '/x', flags: { 'store-quota-bytes': '-1' } })).toThrow(/store.quotaBytes/);
    expect(() => resolveAgentConfig({ packageRoot: '/x', flags: { 'limits-criu-runs': '0' } })).toThrow(/limits.criuRuns/);
  });
});

describe('tenancy policy', () => {
  const policy = parseTenancyPolicy({
    checkpointNamespaces: ['platform', 'team-a'],
    shared: [{ from: 'platform/base-llm', to: ['team-a'] }],
    namespaces: {
      'team-a': {
        quotaBytes: 1000,
        registries: [
          { prefix: 'registry.example.com/team-a', keys: ['/etc/thaw/keys/a.pub'] },
          { prefix: 'registry.example.com/team-a/lab', allowUnsigned: true },
        ],
      },
    },
  });

  it('by default: every namespace checkpoints, restores only its own, from no registry', () => {
    const d = defaultTenancyPolicy();
    expect(checkpointRefusal(d, 'anyone')).toBeUndefined();
    expect(localRestoreRefusal(d, 'team-a', { namespace: 'team-a', name: 'llm' })).toBeUndefined();
    expect(localRestoreRefusal(d, 'team-a', { namespace: 'team-b', name: 'llm' })).toMatch(/belongs to namespace team-b; a pod of team-a may not restore it/);
    expect(localRestoreRefusal(d, 'team-a', { namespace: undefined, name: 'llm' })).toMatch(/records no namespace/);
    expect(registryGrantFor(d, 'team-a', { registry: 'registry.example.com', repository: 'team-a/llm' })).toBeUndefined();
    expect(parseTenancyPolicy(undefined)).toEqual(d);
  });

  it('lets only the listed namespaces checkpoint', () => {
    expect(checkpointRefusal(policy, 'team-a')).toBeUndefined();
    expect(checkpointRefusal(policy, 'team-b')).toMatch(/namespace team-b may not take checkpoints/);
  });

  it('shares a checkpoint with the granted namespaces only', () => {
    expect(localRestoreRefusal(policy, 'team-a', { namespace: 'platform', name: 'base-llm' })).toBeUndefined();
    expect(localRestoreRefusal(policy, 'team-b', { namespace: 'platform', name: 'base-llm' })).toMatch(/may not restore/);
    expect(localRestoreRefusal(policy, 'team-a', { namespace: 'platform', name: 'other' })).toMatch(/may not restore/);
  });

  it('matches registry prefixes on whole components, the longest first, per namespace', () => {
    const grant = (ns: string, registry: string, repository: string) => registryGrantFor(policy, ns, { registry, repository });
    expect(grant('team-a', 'registry.example.com', 'team-a/llm')).toMatchObject({ keyFiles: ['/etc/thaw/keys/a.pub'], allowUnsigned: false });
    expect(grant('team-a', 'registry.example.com', 'team-a/lab/x')).toMatchObject({ allowUnsigned: true });
    expect(grant('team-a', 'registry.example.com', 'team-ab/llm')).toBeUndefined();
    expect(grant('team-a', 'other.example.com', 'team-a/llm')).toBeUndefined();
    expect(grant('team-b', 'registry.example.com', 'team-a/llm')).toBeUndefined();
  });

  it.each([
    [{ bogus: 1 }, /tenancy\.bogus: unknown key/],
    [{ checkpointNamespaces: ['Team'] }, /tenancy\.checkpointNamespaces\[0\]: namespace "Team" is not/],
    [{ shared: [{ from: 'base-llm', to: ['a'] }] }, /tenancy\.shared\[0\]\.from: must be namespace\/name/],
    [{ shared: [{ from: 'p/oci-x', to: ['a'] }] }, /reserved/],
    [{ namespaces: { a: { registries: [{ prefix: 'registry.example.com/a' }] } } }, /names no keys: give the keys .* or allowUnsigned: true/],
    [{ namespaces: { a: { registries: [{ prefix: 'registry.example.com/a', keys: ['k.pub'] }] } } }, /absolute paths/],
    [{ namespaces: { a: { registries: [{ prefix: 'registry.example.com', keys: ['/k.pub'] }] } } }, /host\[:port\]\/repository-prefix/],
    [{ namespaces: { a: { quotaBytes: -1 } } }, /quotaBytes: must be a non-negative integer/],
    [{ namespaces: { a: { snapshotRepository: 'registry.example.com/a/snaps' } } }, /snapshotRepository: registry.example.com\/a\/snaps is under none of a's registries/],
    [{ namespaces: { a: { registries: [{ prefix: 'registry.example.com/b', allowUnsigned: true }], snapshotRepository: 'registry.example.com/ab' } } }, /is under none of a's registries/],
    [{ namespaces: { a: { snapshotRepository: 'Registry/X' } } }, /snapshotRepository: must be host\[:port\]\/repository/],
    [{ namespaces: { a: { snapshotWeightsLayers: true } } }, /snapshotWeightsLayers: needs snapshotRepository/],
    [{ namespaces: { a: { registries: [{ prefix: 'registry.example.com/a', allowUnsigned: true }], snapshotRepository: 'registry.example.com/a/s', snapshotWeightsLayers: 'yes' } } }, /snapshotWeightsLayers: must be a boolean/],
    [{ namespaces: { a: { registries: [{ prefix: 'r.example.com/a', allowUnsigned: true }], snapshotRepository: 'r.example.com/a/s', signingKey: 'k.key' } } }, /signingKey: must be the absolute path/],
    [{ namespaces: { a: { signingKey: '/k.key' } } }, /signingKey: signs what the agent pushes to snapshotRepository, which is not set/],
  ])('refuses %j', (raw, message) => {
    expect(() => parseTenancyPolicy(raw)).toThrow(message);
  });

  it('reads a namespace\'s snapshotRepository when one of its registries covers it', () => {
    const p = parseTenancyPolicy({ namespaces: { a: { registries: [{ prefix: 'registry.example.com/a', keys: ['/k.pub'] }], snapshotRepository: 'registry.example.com/a/snaps' } } });
    expect(p.namespaces.get('a')?.snapshotRepository).toBe('registry.example.com/a/snaps');
    expect(p.namespaces.get('a')?.snapshotWeightsLayers).toBeUndefined();
    const w = parseTenancyPolicy({ namespaces: { a: { registries: [{ prefix: 'registry.example.com/a', keys: ['/k.pub'] }], snapshotRepository: 'registry.example.com/a/snaps', snapshotWeightsLayers: true } } });
    expect(w.namespaces.get('a')?.snapshotWeightsLayers).toBe(true);
  });

  it('what sign.ts signs is what signature.ts accepts: the payload names the digest and repository, the key\'s public half verifies it', () => {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const key = parseSigningKey(privateKey.export({ type: 'sec1', format: 'pem' }).toString(), '/k.key');
    const payload = simpleSigningPayload({ registry: 'r.example.com', repository: 'team/snaps', digest: DIGEST });
    expect(checkSimpleSigningPayload(payload, { digest: DIGEST, dockerReference: 'r.example.com/team/snaps' })).toBeUndefined();
    expect(checkSimpleSigningPayload(payload, { digest: DIGEST, dockerReference: 'r.example.com/other/snaps' })).toMatch(/names repository/);
    const trusted = parseTrustedKey(key.publicKeyPem, '/k.pub');
    expect(keyThatSigned(payload, sign('sha256', payload, key.privateKey).toString('base64'), [trusted])?.source).toBe('/k.pub');
  });

  it('loads a namespace\'s signing key only when the grant covering its snapshotRepository trusts its public half', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-signing-keys-'));
    try {
      const pair = async (name: string) => {
        const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
        await writeFile(join(dir, `${name}.key`), privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
        await writeFile(join(dir, `${name}.pub`), publicKey.export({ type: 'spki', format: 'pem' }));
        return { key: join(dir, `${name}.key`), pub: join(dir, `${name}.pub`) };
      };
      const a = await pair('a');
      const b = await pair('b');
      const policy = (keys: string[] | 'unsigned', signingKey: string) => parseTenancyPolicy({
        namespaces: { ns: { registries: [keys === 'unsigned' ? { prefix: 'r.example.com/ns', allowUnsigned: true } : { prefix: 'r.example.com/ns', keys }], snapshotRepository: 'r.example.com/ns/snaps', signingKey } },
      });
      const load = async (p: ReturnType<typeof parseTenancyPolicy>) => loadSigningKeys(p, await loadTrustedKeys(p));
      expect([...(await load(policy([b.pub, a.pub], a.key))).entries()].map(([ns, k]) => [ns, k.source])).toEqual([['ns', a.key]]);
      await expect(load(policy([b.pub], a.key))).rejects.toThrow(/tenancy\.namespaces\.ns\.signingKey: .*a\.key's public key is none of the keys of the registries entry r\.example\.com\/ns/);
      expect((await load(policy('unsigned', a.key))).get('ns')?.source).toBe(a.key);
      await chmod(a.key, 0o640);
      await expect(load(policy([a.pub], a.key))).rejects.toMatchObject({ code: 'OCI_SIGNING_KEY_INVALID', message: expect.stringMatching(/mode 0640/) });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('compatibility: working directory and user', () => {
  it('a target spec with another cwd or user is another workload; a manifest without them passes', () => {
    const spec = { process: { cwd: '/app', user: { uid: 1000, gid: 1000 } } };
    expect(() => assertSameProcessIdentity({ cwd: '/app', user: { uid: 1000, gid: 1000 } }, spec)).not.toThrow();
    expect(() => assertSameProcessIdentity({}, spec)).not.toThrow();
    let err = (() => { try { assertSameProcessIdentity({ cwd: '/srv', user: { uid: 1000, gid: 1000 } }, spec); } catch (e) { return e as { code: string; message: string }; } return undefined; })();
    expect(err?.code).toBe('RESTORE_INCOMPATIBLE');
    expect(err?.message).toMatch(/container.cwd \/app, the checkpoint's \/srv/);
    err = (() => { try { assertSameProcessIdentity({ user: { uid: 0, gid: 0 } }, { process: {} }); } catch (e) { return e as { code: string; message: string }; } return undefined; })();
    expect(err, 'a spec without process.user runs as root: 0:0 matches').toBeUndefined();
    err = (() => { try { assertSameProcessIdentity({ user: { uid: 0, gid: 0 } }, spec); } catch (e) { return e as { code: string; message: string }; } return undefined; })();
    expect(err?.message).toMatch(/container.user 1000:1000, the checkpoint's 0:0/);
  });

  it('the manifest keeps them, and refuses a relative cwd', () => {
    const base = manifestFields();
    const m = { schemaVersion: 1, kind: MANIFEST_KIND, name: 'x', id: '8d2f7a4e-0000-4000-8000-000000000001', createdAt: '2026-01-01T00:00:00.000Z', ...base, source: { ...base.source, cwd: '/app', user: { uid: 5, gid: 6 } }, files: [], totals: { bytes: 0, fileCount: 0 } };
    const parsed = parseManifest(JSON.stringify(m));
    expect([parsed.source.cwd, parsed.source.user]).toEqual(['/app', { uid: 5, gid: 6 }]);
    expect(() => parseManifest(JSON.stringify({ ...m, source: { ...m.source, cwd: 'app' } }))).toThrow(/cwd must be an absolute path/);
  });
});

describe('compatibility: the target container', () => {
  const f = manifestFields();
  const manifest: Manifest = {
    schemaVersion: 1, kind: MANIFEST_KIND, name: 'llm', id: '0b7d6f9e-3c1a-4c8e-9f00-123456789abc', createdAt: '2026-01-02T03:04:05.000Z',
    source: f.source, constraints: f.constraints, criu: f.criu, files: [], totals: { bytes: 0, fileCount: 0 }, timings: { phaseMs: {} },
  };
  const node = { arch: f.constraints.arch, kernelRelease: f.constraints.kernelRelease, image: f.constraints.image };

  it('restores when args and name are the recorded ones', () => {
    expect(checkCompatibility(manifest, { ...node, container: { name: 'worker', args: f.source.args } })).toEqual([]);
  });

  it.each([
    ['other args', { name: 'worker', args: ['--model', 'Other/Model'] }, 'container.args'],
    ['an extra argument', { name: 'worker', args: [...f.source.args, '--trust-remote-code'] }, 'container.args'],
    ['another container', { name: 'sidecar', args: f.source.args }, 'container.name'],
  ])('refuses %s', (_what, container, what) => {
    const found = checkCompatibility(manifest, { ...node, container });
    expect(found.map((m) => m.what)).toEqual([what]);
    expect(isRestorable(found)).toBe(false);
  });

  it('refuses a checkpoint that recorded no args, and another image digest', () => {
    const none = { ...manifest, source: { ...manifest.source, args: [] } };
    expect(checkCompatibility(none, { ...node, container: { name: 'worker', args: ['x'] } }).map((m) => m.what)).toEqual(['container.args']);
    const other = checkCompatibility(manifest, { ...node, image: { ref: node.image.ref, digest: `sha256:${'e'.repeat(64)}` } });
    expect(other.map((m) => [m.what, m.severity])).toEqual([['image', 'fatal']]);
  });
});

describe('cosign simple signing', () => {
  const pair = () => generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const signer = pair();
  const trusted = parseTrustedKey(signer.publicKey.export({ type: 'spki', format: 'pem' }) as string, 'team-a.pub');
  const other = parseTrustedKey(pair().publicKey.export({ type: 'spki', format: 'pem' }) as string, 'other.pub');
  const payloadFor = (digest: string, ref = 'registry.example.com/team-a/llm', type = COSIGN_SIGNATURE_TYPE): Buffer =>
    Buffer.from(JSON.stringify({ critical: { identity: { 'docker-reference': ref }, image: { 'docker-manifest-digest': digest }, type }, optional: null }));
  const sigOf = (payload: Buffer, key = signer.privateKey): string => sign('sha256', payload, key).toString('base64');

  it('names the signature tag as cosign does', () => {
    expect(signatureTagFor(DIGEST)).toBe(`sha256-${'ab'.repeat(32)}.sig`);
  });

  it('accepts the trusted key and refuses another key, a changed payload, garbage', () => {
    const payload = payloadFor(DIGEST);
    expect(keyThatSigned(payload, sigOf(payload), [other, trusted])?.source).toBe('team-a.pub');
    expect(keyThatSigned(payload, sigOf(payload), [other])).toBeUndefined();
    expect(keyThatSigned(payloadFor(`sha256:${'cd'.repeat(32)}`), sigOf(payload), [trusted])).toBeUndefined();
    expect(keyThatSigned(payload, 'not base64!', [trusted])).toBeUndefined();
    expect(keyThatSigned(payload, Buffer.from('short').toString('base64'), [trusted])).toBeUndefined();
  });

  it("checks the payload's digest, repository and type", () => {
    const expected = { digest: DIGEST, dockerReference: 'registry.example.com/team-a/llm' };
    expect(checkSimpleSigningPayload(payloadFor(DIGEST), expected)).toBeUndefined();
    expect(checkSimpleSigningPayload(payloadFor(`sha256:${'cd'.repeat(32)}`), expected)).toMatch(/signs "sha256:cdcd.*", not sha256:abab/);
    expect(checkSimpleSigningPayload(payloadFor(DIGEST, 'registry.example.com/team-b/llm'), expected)).toMatch(/names repository/);
    expect(checkSimpleSigningPayload(payloadFor(DIGEST, expected.dockerReference, 'attestation'), expected)).toMatch(/type/);
    expect(checkSimpleSigningPayload(Buffer.from('{'), expected)).toMatch(/not JSON/);
  });

  it("checks a sigstore bundle's DSSE signature over the pre-authentication encoding, and its statement", () => {
    const bundleOf = (statement: unknown, key = signer.privateKey, pae = true): Buffer => {
      const body = Buffer.from(JSON.stringify(statement));
      const signed = pae ? dssePae('application/vnd.in-toto+json', body) : body;
      return Buffer.from(JSON.stringify({ dsseEnvelope: { payload: body.toString('base64'), payloadType: 'application/vnd.in-toto+json', signatures: [{ sig: sign('sha256', signed, key).toString('base64') }] } }));
    };
    const statement = (hex: string, predicateType = 'https://sigstore.dev/cosign/sign/v1') => ({ _type: 'https://in-toto.io/Statement/v1', subject: [{ digest: { sha256: hex } }], predicateType, predicate: {} });
    expect(checkCosignBundle(bundleOf(statement('ab'.repeat(32))), DIGEST, [trusted])).toMatchObject({ key: { source: 'team-a.pub' } });
    expect(checkCosignBundle(bundleOf(statement('ab'.repeat(32))), DIGEST, [other])).toMatchObject({ reason: expect.stringMatching(/none of the trusted keys/) });
    expect(checkCosignBundle(bundleOf(statement('ab'.repeat(32)), signer.privateKey, false), DIGEST, [trusted])).toMatchObject({ reason: expect.stringMatching(/none of the trusted keys/) });
    expect(checkCosignBundle(bundleOf(statement('cd'.repeat(32))), DIGEST, [trusted])).toMatchObject({ reason: expect.stringMatching(/another digest/) });
    expect(checkCosignBundle(bundleOf(statement('ab'.repeat(32), 'https://slsa.dev/provenance/v1')), DIGEST, [trusted])).toMatchObject({ reason: expect.stringMatching(/not a cosign signature/) });
    expect(dssePae('t', Buffer.from('hé')).toString()).toBe('DSSEv1 1 t 3 hé');
  });

  it('refuses keys that are not ECDSA P-256 at configuration time', () => {
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ type: 'spki', format: 'pem' }) as string;
    expect(() => parseTrustedKey(rsa, 'rsa.pub')).toThrow(/rsa.pub: an rsa key; thaw verifies ECDSA P-256/);
    expect(() => parseTrustedKey('junk', 'junk.pub')).toThrow(/junk.pub: not a PEM public key/);
    // The digest helper the fixtures lean on is sha256 of the payload bytes, as a registry layer digest is.
    expect(createHash('sha256').update(payloadFor(DIGEST)).digest('hex')).toHaveLength(64);
  });
});

describe('registry access file: credentials scoped, hosts named', () => {
  const write = async (dir: string, access: unknown): Promise<string> => {
    const { writeFile } = await import('node:fs/promises');
    await writeFile(join(dir, 'creds.json'), JSON.stringify({ username: 'u', password: 'p' }), { mode: 0o600 });
    await writeFile(join(dir, 'registries.json'), JSON.stringify({ access }));
    return join(dir, 'registries.json');
  };

  it('scopes credentials to the listed repositories and keeps authHosts', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-regcfg-'));
    try {
      const creds = join(dir, 'creds.json');
      const ok = await loadRegistryConfig(await write(dir, { 'r.example': { credentialsFile: creds, repositories: ['team-a'], authHosts: ['auth.example'] } }));
      expect(ok.access?.['r.example']).toMatchObject({ credentials: { username: 'u' }, credentialRepositories: ['team-a'], authHosts: ['auth.example'] });
      const { writeFile } = await import('node:fs/promises');
      await writeFile(join(dir, 'deadline.json'), JSON.stringify({ access: {}, transferDeadlineMs: 60000 }));
      expect((await loadRegistryConfig(join(dir, 'deadline.json'))).transferDeadlineMs).toBe(60000);
      await expect(loadRegistryConfig(await write(dir, { 'r.example': { credentialsFile: creds } }))).rejects.toThrow(/repositories must list the repository prefixes/);
      await expect(loadRegistryConfig(await write(dir, { 'r.example': { repositories: ['a'] } }))).rejects.toThrow(/no credentialsFile/);
      await expect(loadRegistryConfig(await write(dir, { 'r.example': { authHosts: ['https://x'] } }))).rejects.toThrow(/authHosts must be a list of host/);
      await expect(loadRegistryConfig(await write(dir, { 'r.example': { plainhttp: true } }))).rejects.toThrow(/plainhttp is not a known key/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('/metrics store totals', () => {
  it('a scrape reads a shared copy: one listing per max age or checkpoint, however many scrapes', async () => {
    let t = 0;
    let listings = 0;
    const c = cachedValue(60_000, async () => ++listings, () => t);
    await Promise.all([c.get(), c.get(), c.get()]);
    expect(listings).toBe(1);
    t += 60_000;
    await c.get();
    expect(listings).toBe(1);
    t += 1;
    await c.get();
    expect(listings).toBe(2);
    c.invalidate();
    expect(await c.get()).toBe(3);
  });
});
