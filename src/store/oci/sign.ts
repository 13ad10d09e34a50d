/**
 * Signing a checkpoint artifact the way `cosign sign --key` does, in thaw's own code (node:crypto; no tool runs):
 * what the agent pushes to a namespace's snapshotRepository, and `thaw push --sign-key`.
 *
 * The format is cosign's tag scheme (its specs/SIGNATURE_SPEC.md), the one signature.ts reads first and the one
 * every cosign verifies: cosign 2 only reads it, cosign 3 (3.1.1 checked by test/integration/signing.test.ts)
 * reads it when the artifact has no bundle referrers. cosign 3's default bundle format binds only the digest;
 * this one also names the repository (`docker-reference`), which thaw's per-repository trust checks.
 *   - the simple-signing payload `{"critical": {"identity": {"docker-reference": "<registry>/<repository>"},
 *     "image": {"docker-manifest-digest": "sha256:<hex>"}, "type": "cosign container image signature"},
 *     "optional": null}` is a blob of the repository;
 *   - the OCI image manifest tagged `sha256-<hex>.sig` has it as a layer (media type
 *     `application/vnd.dev.cosign.simplesigning.v1+json`) whose annotation `dev.cosignproject.cosign/signature`
 *     holds the base64 ASN.1 DER ECDSA P-256 signature over SHA-256 of the payload's bytes;
 *   - signatures already under that tag stay (cosign appends too); a layer with this payload already signed by
 *     this key is not added again.
 *
 * The key: ECDSA P-256 (cosign generate-key-pair's kind), a PEM private key, unencrypted (PKCS#8 `PRIVATE KEY`,
 * or SEC1 `EC PRIVATE KEY`), e.g. `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out k.pem`.
 * cosign's own encrypted format (`ENCRYPTED SIGSTORE PRIVATE KEY`: scrypt + NaCl secretbox) is refused with that
 * advice: node:crypto has no XSalsa20-Poly1305, and the agent would need the password in its environment anyway.
 * `cosign import-key-pair --key k.pem` makes a cosign key of the same key for signing by hand.
 */
import { createPrivateKey, createPublicKey, sign, type KeyObject } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { Readable } from 'node:stream';
import { errorMessage } from '../../errors.js';
import { OCI_MANIFEST_MEDIA_TYPE } from './artifact.js';
import { sha256Digest, type RegistryClient } from './client.js';
import { OciError, OciErrorCode } from './errors.js';
import { COSIGN_SIGNATURE_ANNOTATION, COSIGN_SIGNATURE_TYPE, COSIGN_SIMPLE_SIGNING_MEDIA_TYPE, keyThatSigned, SIGNATURE_LAYERS_MAX, SIGNATURE_PAYLOAD_MAX_BYTES, signatureTagFor } from './signature.js';

/** A PEM private key is a few hundred bytes; a file larger than this is not a key. */
export const SIGNING_KEY_MAX_BYTES = 16 * 1024;
const OCI_CONFIG_MEDIA_TYPE = 'application/vnd.oci.image.config.v1+json';

export interface SigningKey {
  /** Where the operator keeps it (named in logs and errors; never the key). */
  source: string;
  privateKey: KeyObject;
  publicKey: KeyObject;
  /** SubjectPublicKeyInfo PEM of the public half: what verifiers are configured with (cosign.pub). */
  publicKeyPem: string;
}

const keyError = (source: string, why: string, cause?: unknown): OciError =>
  new OciError(OciErrorCode.SIGNING_KEY_INVALID, `${source}: ${why}`, { step: 'load signing key', ...(cause !== undefined ? { cause } : {}), evidence: { file: source } });

/** Reads a PEM private key (ECDSA P-256, unencrypted). Throws OCI_SIGNING_KEY_INVALID naming `source`. Pure. */
export function parseSigningKey(pem: string, source: string): SigningKey {
  if (/-----BEGIN (ENCRYPTED (SIGSTORE|COSIGN) PRIVATE KEY)-----/.test(pem)) {
    throw keyError(source, 'a cosign encrypted key (cosign generate-key-pair); thaw reads unencrypted PEM keys: make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out <file>` (`cosign import-key-pair --key <file>` gives cosign the same key)');
  }
  if (pem.includes('-----BEGIN ENCRYPTED PRIVATE KEY-----')) throw keyError(source, 'an encrypted PKCS#8 key; thaw reads unencrypted PEM keys (the file itself is the secret: root-owned, mode 0600)');
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: pem, format: 'pem' });
  } catch (err) {
    throw keyError(source, `not a PEM private key (${errorMessage(err)})`, err);
  }
  if (privateKey.asymmetricKeyType !== 'ec' || privateKey.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    const curve = privateKey.asymmetricKeyDetails?.namedCurve;
    throw keyError(source, `an ${privateKey.asymmetricKeyType ?? 'unknown'} key${curve ? ` on ${curve}` : ''}; thaw signs with ECDSA P-256 keys (what cosign verifies by default)`);
  }
  const publicKey = createPublicKey(privateKey);
  return { source, privateKey, publicKey, publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() };
}

/**
 * Reads the signing key file `path` (absolute) from the host: not through a symlink, a regular file owned by this
 * process's user (root, for the agent), readable by nobody else (no group or other bits). Throws
 * OCI_SIGNING_KEY_INVALID naming the file and what is wrong.
 */
export async function loadSigningKey(path: string): Promise<SigningKey> {
  if (!isAbsolute(path)) throw keyError(path, 'must be an absolute path');
  let fh;
  try {
    fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw keyError(path, code === 'ELOOP' ? 'is a symlink (name the key file itself)' : `cannot be opened (${errorMessage(err)})`, err);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw keyError(path, 'is not a regular file');
    const uid = process.geteuid?.() ?? 0;
    if (st.uid !== uid) throw keyError(path, `is owned by uid ${st.uid}, not by ${uid} (the user thaw runs as): whoever owns it can change the key`);
    if ((st.mode & 0o077) !== 0) throw keyError(path, `has mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}: a signing key must be readable by its owner only (chmod 0600)`);
    if (st.size > SIGNING_KEY_MAX_BYTES) throw keyError(path, `is ${st.size} bytes, larger than any PEM key (${SIGNING_KEY_MAX_BYTES})`);
    const buffer = Buffer.alloc(SIGNING_KEY_MAX_BYTES + 1);
    const { bytesRead } = await fh.read(buffer, 0, buffer.length, 0);
    return parseSigningKey(buffer.subarray(0, bytesRead).toString('utf8'), path);
  } finally {
    await fh.close();
  }
}

/** What a signature names: the artifact's registry (as in its reference), repository and manifest digest. */
export interface SignatureTarget {
  registry: string;
  repository: string;
  digest: string;
}

/** cosign's simple-signing payload for `target` (the bytes that are signed). Pure, deterministic. */
export function simpleSigningPayload(target: SignatureTarget): Buffer {
  return Buffer.from(JSON.stringify({
    critical: {
      identity: { 'docker-reference': `${target.registry}/${target.repository}` },
      image: { 'docker-manifest-digest': target.digest },
      type: COSIGN_SIGNATURE_TYPE,
    },
    optional: null,
  }));
}

interface Descriptor {
  mediaType: string;
  size: number;
  digest: string;
  annotations?: Record<string, string>;
}

export interface SignResult {
  /** The tag the signature manifest is under (`sha256-<hex>.sig`). */
  tag: string;
  /** Digest of the payload layer. */
  layer: string;
  /** Digest of the signature manifest as it now stands. */
  manifestDigest: string;
  /** False when this key had already signed this payload there (nothing was written). */
  added: boolean;
}

async function putSmallBlob(client: RegistryClient, repository: string, data: Buffer, signal?: AbortSignal): Promise<string> {
  const digest = sha256Digest(data);
  if ((await client.headBlob(repository, digest, signal)) === data.length) return digest;
  const session = await client.startUpload(repository, signal);
  await client.putBlob(repository, session, digest, data.length, () => Readable.from([data]), signal);
  return digest;
}

/** The layers of the signature manifest already under `tag`, or [] when there is none (or it is not one). */
async function existingLayers(client: RegistryClient, repository: string, tag: string, signal?: AbortSignal): Promise<Descriptor[]> {
  let body: Buffer;
  try {
    ({ body } = await client.getManifest(repository, tag, signal));
  } catch (err) {
    if (err instanceof OciError && err.code === OciErrorCode.NOT_FOUND) return [];
    throw err;
  }
  let layers: unknown;
  try {
    layers = (JSON.parse(body.toString('utf8')) as { layers?: unknown }).layers;
  } catch {
    return []; // not JSON: replaced by a manifest that is one
  }
  if (!Array.isArray(layers)) return [];
  return layers.filter((l): l is Descriptor => {
    const d = l as Partial<Descriptor> | null;
    return typeof d?.mediaType === 'string' && typeof d.digest === 'string' && /^sha256:[0-9a-f]{64}$/.test(d.digest) && typeof d.size === 'number';
  });
}

/**
 * Signs `target` with `key` and stores the signature in `target.repository` (cosign's tag scheme, the file comment).
 * The signature needs only the digest: a push writes it before it tags the checkpoint, so no reader of the tag
 * ever sees the checkpoint unsigned. Registry errors come as they are.
 */
export async function pushCosignSignature(client: RegistryClient, target: SignatureTarget, key: SigningKey, signal?: AbortSignal): Promise<SignResult> {
  const tag = signatureTagFor(target.digest);
  const payload = simpleSigningPayload(target);
  if (payload.length > SIGNATURE_PAYLOAD_MAX_BYTES) throw new OciError(OciErrorCode.SIGNATURE_INVALID, `the payload for ${target.repository} is ${payload.length} bytes`, { step: 'sign checkpoint' });
  const payloadDigest = sha256Digest(payload);
  const before = await existingLayers(client, target.repository, tag, signal);
  const already = before.find((l) => {
    const sig = l.annotations?.[COSIGN_SIGNATURE_ANNOTATION];
    return l.mediaType === COSIGN_SIMPLE_SIGNING_MEDIA_TYPE && l.digest === payloadDigest && typeof sig === 'string' && keyThatSigned(payload, sig, [{ source: key.source, key: key.publicKey }]) !== undefined;
  });
  if (already !== undefined) {
    const { digest } = await client.getManifest(target.repository, tag, signal);
    return { tag, layer: payloadDigest, manifestDigest: digest, added: false };
  }
  await putSmallBlob(client, target.repository, payload, signal);
  const ours: Descriptor = {
    mediaType: COSIGN_SIMPLE_SIGNING_MEDIA_TYPE,
    size: payload.length,
    digest: payloadDigest,
    annotations: { [COSIGN_SIGNATURE_ANNOTATION]: sign('sha256', payload, key.privateKey).toString('base64') },
  };
  // Ours first: a verifier that reads only the first SIGNATURE_LAYERS_MAX layers (thaw's) always sees it.
  const layers = [ours, ...before].slice(0, SIGNATURE_LAYERS_MAX);
  // The config cosign writes for a signature image: an empty image whose diff_ids are the layers' digests.
  const config = Buffer.from(JSON.stringify({ architecture: '', os: '', config: {}, rootfs: { type: 'layers', diff_ids: layers.map((l) => l.digest) } }));
  const configDigest = await putSmallBlob(client, target.repository, config, signal);
  const manifest = {
    schemaVersion: 2,
    mediaType: OCI_MANIFEST_MEDIA_TYPE,
    config: { mediaType: OCI_CONFIG_MEDIA_TYPE, size: config.length, digest: configDigest },
    layers,
  };
  const manifestDigest = await client.putManifest(target.repository, tag, Buffer.from(JSON.stringify(manifest)), OCI_MANIFEST_MEDIA_TYPE, signal);
  return { tag, layer: payloadDigest, manifestDigest, added: true };
}

