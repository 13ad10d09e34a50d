/**
 * Signing a thaw checkpoint in a registry with real cosign (3.1.1, key-based, offline), for tests of thaw's own
 * signature verification and of interop with cosign's `verify`.
 *
 * What cosign 3.1.1 writes (seen against docker-registry 2.8, which has no referrers API): a Sigstore bundle
 * (`application/vnd.dev.sigstore.bundle.v0.3+json`) as the one layer of an OCI manifest whose `subject` is the
 * checkpoint's manifest and whose artifactType is the bundle's media type; it is found through the referrers
 * tag schema, an image index tagged `sha256-<hex of the checkpoint digest>` in the same repository. The bundle
 * holds a DSSE envelope (payloadType `application/vnd.in-toto+json`) whose payload is an in-toto statement with
 * the checkpoint digest as subject and predicateType `https://sigstore.dev/cosign/sign/v1`, signed with the
 * ECDSA P-256 key of `cosign generate-key-pair` (signature over the DSSE pre-authentication encoding).
 *
 * Offline: `--use-signing-config=false --tlog-upload=false` (3.1.1 refuses `--tlog-upload=false` together with a
 * signing config, and a signing config without services still makes it fetch a TUF root), and runPeerTool's
 * proxies make any network access fail.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { peerToolOk, runPeerTool, type PeerToolRun } from './peer-tools.js';

export interface CosignKeyPair {
  /** cosign's encrypted private key (PEM, `ENCRYPTED SIGSTORE PRIVATE KEY`). */
  keyFile: string;
  /** The public key (PEM, SubjectPublicKeyInfo of an ECDSA P-256 key): what a verifier is configured with. */
  publicKeyFile: string;
  publicKeyPem: string;
  password: string;
  /** The HOME cosign runs with. */
  home: string;
}

/** `cosign generate-key-pair` in `dir` (cosign.key, cosign.pub), the password given through COSIGN_PASSWORD. */
export async function generateCosignKeyPair(dir: string, password = 'thaw-test-password'): Promise<CosignKeyPair> {
  const home = join(dir, 'home');
  await peerToolOk('cosign', ['generate-key-pair'], { home, cwd: dir, env: { COSIGN_PASSWORD: password } });
  const publicKeyFile = join(dir, 'cosign.pub');
  return { keyFile: join(dir, 'cosign.key'), publicKeyFile, publicKeyPem: await readFile(publicKeyFile, 'utf8'), password, home };
}

/** `<host>/<repository>@<digest>`: cosign signs a digest, never a tag. */
export function digestReference(registryHost: string, repository: string, digest: string): string {
  return `${registryHost}/${repository}@${digest}`;
}

const registryFlags = (plainHttp: boolean): string[] => (plainHttp ? ['--allow-http-registry', '--allow-insecure-registry'] : []);

/** How cosign reaches the registry: plain http (default), or https trusting the PEM CA bundle `caFile` (SSL_CERT_FILE). */
export interface CosignRegistryAccess {
  plainHttp?: boolean;
  caFile?: string;
}

const accessEnv = (o: CosignRegistryAccess): Record<string, string> => (o.caFile ? { SSL_CERT_FILE: o.caFile } : {});
const isPlain = (o: CosignRegistryAccess): boolean => o.plainHttp ?? o.caFile === undefined;

/**
 * Signs the checkpoint manifest `digest` in `registryHost/repository` with `keys`. Returns the referrers tag
 * cosign's signature is found under (`sha256-<hex>`). Throws with cosign's stderr when it fails.
 */
export async function cosignSign(o: { registryHost: string; repository: string; digest: string; keys: CosignKeyPair } & CosignRegistryAccess): Promise<{ referrersTag: string }> {
  await peerToolOk('cosign', [
    'sign', '--key', o.keys.keyFile, '--use-signing-config=false', '--tlog-upload=false', '--yes',
    ...registryFlags(isPlain(o)), digestReference(o.registryHost, o.repository, o.digest),
  ], { home: o.keys.home, env: { COSIGN_PASSWORD: o.keys.password, ...accessEnv(o) } });
  return { referrersTag: o.digest.replace(':', '-') };
}

/**
 * `cosign verify --key` of the checkpoint `digest`, offline (no transparency log). Resolves with cosign's result
 * (exit 0 = accepted); stdout holds the verified payloads as JSON.
 */
export async function cosignVerify(o: { registryHost: string; repository: string; digest: string; publicKeyFile: string; home: string } & CosignRegistryAccess): Promise<PeerToolRun> {
  return runPeerTool('cosign', [
    'verify', '--key', o.publicKeyFile, '--insecure-ignore-tlog=true', '--output', 'json',
    ...registryFlags(isPlain(o)), digestReference(o.registryHost, o.repository, o.digest),
  ], { home: o.home, env: accessEnv(o) });
}
