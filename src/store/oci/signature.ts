/**
 * Verification of cosign key-based signatures of a checkpoint artifact, in thaw's own code (node:crypto): no tool
 * runs at restore time. Called before any byte of a registry checkpoint enters the store.
 *
 * cosign's format (its specs/SIGNATURE_SPEC.md, "legacy" tag scheme; cosign 3 writes it with
 * `--new-bundle-format=false --use-signing-config=false`, thaw with sign.ts):
 *   - the signatures of manifest `sha256:<hex>` of repository R are the layers of the OCI image manifest tagged
 *     `sha256-<hex>.sig` in R;
 *   - each layer is a "simple signing" payload (media type `application/vnd.dev.cosign.simplesigning.v1+json`):
 *       {"critical": {"identity": {"docker-reference": "<registry>/<repository>"},
 *                     "image": {"docker-manifest-digest": "sha256:<hex>"},
 *                     "type": "cosign container image signature"},
 *        "optional": ...}
 *   - the layer annotation `dev.cosignproject.cosign/signature` holds the base64 of the signature over the
 *     payload's bytes: for an ECDSA key (cosign's `generate-key-pair`: P-256) ASN.1 DER over SHA-256.
 *
 * A checkpoint is accepted when one layer's payload (its bytes checked against the layer digest) names this
 * manifest digest and this registry/repository, and its signature verifies with one of the policy's keys.
 *
 * cosign 3's default ("bundle") format is read too (seen from cosign 3.1.1 against docker-registry 2.8, which has
 * no referrers API): the OCI 1.1 referrers tag `sha256-<hex>` holds an image index; each of its manifests whose
 * `subject` is the checkpoint's manifest and whose artifactType is `application/vnd.dev.sigstore.bundle.v0.3+json`
 * has the bundle as its one layer; the bundle's DSSE envelope (payloadType `application/vnd.in-toto+json`) holds
 * an in-toto statement (predicateType `https://sigstore.dev/cosign/sign/v1`) whose subject is the digest, signed
 * over DSSE's pre-authentication encoding. That statement names no repository: a bundle binds the digest only.
 * Naming the repository matters here, though cosign's own verify only checks the digest: the policy trusts a key
 * per repository prefix, and a signature copied next to the same digest in another repository must not carry
 * that trust along.
 */
import { createPublicKey, verify, type KeyObject } from 'node:crypto';
import { errorMessage } from '../../errors.js';
import type { RegistryClient } from './client.js';
import { OciError, OciErrorCode } from './errors.js';

export const COSIGN_SIGNATURE_ANNOTATION = 'dev.cosignproject.cosign/signature';
export const COSIGN_SIMPLE_SIGNING_MEDIA_TYPE = 'application/vnd.dev.cosign.simplesigning.v1+json';
export const COSIGN_SIGNATURE_TYPE = 'cosign container image signature';
/** A payload is a few hundred bytes; a signature manifest with more layers than this is not read. */
export const SIGNATURE_PAYLOAD_MAX_BYTES = 64 * 1024;
export const SIGNATURE_LAYERS_MAX = 32;
export const SIGSTORE_BUNDLE_MEDIA_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';
export const IN_TOTO_PAYLOAD_TYPE = 'application/vnd.in-toto+json';
export const IN_TOTO_STATEMENT_TYPE = 'https://in-toto.io/Statement/v1';
export const COSIGN_SIGN_PREDICATE_TYPE = 'https://sigstore.dev/cosign/sign/v1';
const OCI_INDEX_MEDIA_TYPE = 'application/vnd.oci.image.index.v1+json';

/** DSSE's pre-authentication encoding: `DSSEv1 <len(type)> <type> <len(body)> <body>`, lengths in bytes. Pure. */
export function dssePae(payloadType: string, body: Buffer): Buffer {
  const type = Buffer.from(payloadType, 'utf8');
  return Buffer.concat([Buffer.from(`DSSEv1 ${type.length} `), type, Buffer.from(` ${body.length} `), body]);
}

/**
 * Checks one Sigstore bundle (bytes) against `digest` and `keys`: returns the key that signed its DSSE envelope,
 * or the reason it proves nothing. Pure.
 */
export function checkCosignBundle(bundle: Buffer, digest: string, keys: readonly TrustedKey[]): { key: TrustedKey } | { reason: string } {
  let b: { dsseEnvelope?: { payload?: unknown; payloadType?: unknown; signatures?: unknown } };
  try {
    b = JSON.parse(bundle.toString('utf8')) as typeof b;
  } catch {
    return { reason: 'the bundle is not JSON' };
  }
  const env = b.dsseEnvelope;
  if (typeof env !== 'object' || env === null || typeof env.payload !== 'string' || env.payloadType !== IN_TOTO_PAYLOAD_TYPE || !Array.isArray(env.signatures)) {
    return { reason: `the bundle holds no DSSE envelope of ${IN_TOTO_PAYLOAD_TYPE}` };
  }
  const body = Buffer.from(env.payload, 'base64');
  const pae = dssePae(IN_TOTO_PAYLOAD_TYPE, body);
  let key: TrustedKey | undefined;
  for (const sig of env.signatures.slice(0, SIGNATURE_LAYERS_MAX) as Array<{ sig?: unknown }>) {
    if (typeof sig?.sig === 'string') key ??= keyThatSigned(pae, sig.sig, keys);
  }
  if (key === undefined) return { reason: `signed by none of the trusted keys (${keys.map((k) => k.source).join(', ')})` };
  let statement: { _type?: unknown; predicateType?: unknown; subject?: unknown };
  try {
    statement = JSON.parse(body.toString('utf8')) as typeof statement;
  } catch {
    return { reason: 'the signed statement is not JSON' };
  }
  if (statement._type !== IN_TOTO_STATEMENT_TYPE || statement.predicateType !== COSIGN_SIGN_PREDICATE_TYPE) {
    return { reason: `the signed statement is not a cosign signature (${JSON.stringify(statement.predicateType)})` };
  }
  const hex = digest.slice('sha256:'.length);
  const subjects = Array.isArray(statement.subject) ? (statement.subject as Array<{ digest?: { sha256?: unknown } }>) : [];
  if (!subjects.some((x) => x?.digest?.sha256 === hex)) return { reason: `the signed statement names another digest than ${digest}` };
  return { key };
}

export interface TrustedKey {
  /** Where the operator keeps it (named in logs and errors). */
  source: string;
  key: KeyObject;
}

/** The tag cosign stores the signatures of `digest` under: `sha256-<hex>.sig`. Pure. */
export function signatureTagFor(digest: string): string {
  const hex = /^sha256:([0-9a-f]{64})$/.exec(digest)?.[1];
  if (hex === undefined) throw new OciError(OciErrorCode.SIGNATURE_INVALID, `${JSON.stringify(digest)} is not a sha256 digest`, { step: 'name signature tag' });
  return `sha256-${hex}.sig`;
}

/**
 * Reads a PEM public key (cosign.pub). ECDSA P-256 only: the key type cosign's `generate-key-pair` makes; other
 * kinds are refused here, at configuration time, rather than silently never matching.
 */
export function parseTrustedKey(pem: string, source: string): TrustedKey {
  let key: KeyObject;
  try {
    key = createPublicKey({ key: pem, format: 'pem' });
  } catch (err) {
    throw new Error(`${source}: not a PEM public key (${errorMessage(err)})`);
  }
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new Error(`${source}: an ${key.asymmetricKeyType ?? 'unknown'} key${key.asymmetricKeyDetails?.namedCurve ? ` on ${key.asymmetricKeyDetails.namedCurve}` : ''}; thaw verifies ECDSA P-256 keys (cosign generate-key-pair)`);
  }
  return { source, key };
}

/** Checks a payload's claims against what is being pulled; returns the reason it does not fit, or undefined. Pure. */
export function checkSimpleSigningPayload(payload: Buffer, expected: { digest: string; dockerReference: string }): string | undefined {
  let v: unknown;
  try {
    v = JSON.parse(payload.toString('utf8'));
  } catch {
    return 'the payload is not JSON';
  }
  const critical = (v as { critical?: unknown } | null)?.critical as { identity?: { 'docker-reference'?: unknown }; image?: { 'docker-manifest-digest'?: unknown }; type?: unknown } | undefined;
  if (typeof critical !== 'object' || critical === null) return 'the payload has no "critical" section';
  if (critical.type !== COSIGN_SIGNATURE_TYPE) return `the payload's type is ${JSON.stringify(critical.type)}, not ${JSON.stringify(COSIGN_SIGNATURE_TYPE)}`;
  const digest = critical.image?.['docker-manifest-digest'];
  if (digest !== expected.digest) return `the payload signs ${JSON.stringify(digest)}, not ${expected.digest}`;
  const ref = critical.identity?.['docker-reference'];
  if (ref !== expected.dockerReference) return `the payload names repository ${JSON.stringify(ref)}, not ${expected.dockerReference}`;
  return undefined;
}

/** The key of `keys` whose signature (base64 DER ECDSA over SHA-256) of `payload` verifies, or undefined. */
export function keyThatSigned(payload: Buffer, signatureBase64: string, keys: readonly TrustedKey[]): TrustedKey | undefined {
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(signatureBase64)) return undefined;
  const signature = Buffer.from(signatureBase64, 'base64');
  for (const k of keys) {
    try {
      if (verify('sha256', payload, k.key, signature)) return k;
    } catch {
      // A malformed DER signature throws for this key; it verifies with none.
    }
  }
  return undefined;
}

export interface VerifiedSignature {
  /** The key that signed it (TrustedKey.source). */
  key: string;
  /** Digest of the payload layer that carried the signature. */
  layer: string;
}

interface SignatureLayer {
  mediaType?: unknown;
  digest?: unknown;
  size?: unknown;
  annotations?: Record<string, unknown>;
}

/**
 * Fetches the `sha256-<hex>.sig` manifest of `digest` in `repository` and its payload layers, and returns the
 * first signature that verifies. Throws OCI_SIGNATURE_MISSING (no such tag, or no signature layer) or
 * OCI_SIGNATURE_INVALID (every signature refused; evidence: each layer's reason); registry errors as they come.
 * Reads at most SIGNATURE_LAYERS_MAX payloads of SIGNATURE_PAYLOAD_MAX_BYTES each.
 */
async function verifyTagScheme(
  client: RegistryClient,
  target: { registry: string; repository: string; digest: string },
  keys: readonly TrustedKey[],
  signal?: AbortSignal,
): Promise<VerifiedSignature> {
  const step = 'verify checkpoint signature';
  const tag = signatureTagFor(target.digest);
  const where = `${target.registry}/${target.repository}:${tag}`;
  if (keys.length === 0) throw new OciError(OciErrorCode.SIGNATURE_INVALID, `no trusted key to verify ${where} against`, { step });
  let body: Buffer;
  try {
    ({ body } = await client.getManifest(target.repository, tag, signal));
  } catch (err) {
    if (err instanceof OciError && err.code === OciErrorCode.NOT_FOUND) {
      throw new OciError(OciErrorCode.SIGNATURE_MISSING, `${target.registry}/${target.repository}@${target.digest} is not signed (no ${tag} in the registry)`, { step, cause: err, evidence: { tag } });
    }
    throw err;
  }
  let layers: SignatureLayer[];
  try {
    const m = JSON.parse(body.toString('utf8')) as { layers?: unknown };
    if (!Array.isArray(m.layers)) throw new Error('no layers');
    layers = m.layers as SignatureLayer[];
  } catch (err) {
    throw new OciError(OciErrorCode.SIGNATURE_INVALID, `${where} is not an image manifest with layers (${errorMessage(err)})`, { step });
  }
  const signed = layers.filter((l) => l.mediaType === COSIGN_SIMPLE_SIGNING_MEDIA_TYPE && typeof l.annotations?.[COSIGN_SIGNATURE_ANNOTATION] === 'string');
  if (signed.length === 0) throw new OciError(OciErrorCode.SIGNATURE_MISSING, `${where} holds no cosign signature layer`, { step, evidence: { tag } });
  const refusals: Array<{ layer: string; reason: string }> = [];
  const dockerReference = `${target.registry}/${target.repository}`;
  for (const layer of signed.slice(0, SIGNATURE_LAYERS_MAX)) {
    const digest = typeof layer.digest === 'string' ? layer.digest : '';
    if (!/^sha256:[0-9a-f]{64}$/.test(digest) || typeof layer.size !== 'number' || layer.size > SIGNATURE_PAYLOAD_MAX_BYTES) {
      refusals.push({ layer: digest, reason: `not a payload descriptor of at most ${SIGNATURE_PAYLOAD_MAX_BYTES} bytes` });
      continue;
    }
    // getSmallBlob checks the bytes against the layer digest: the payload is what the manifest names.
    const payload = await client.getSmallBlob(target.repository, digest, SIGNATURE_PAYLOAD_MAX_BYTES, signal);
    const key = keyThatSigned(payload, layer.annotations?.[COSIGN_SIGNATURE_ANNOTATION] as string, keys);
    if (key === undefined) {
      refusals.push({ layer: digest, reason: `signed by none of the trusted keys (${keys.map((k) => k.source).join(', ')})` });
      continue;
    }
    const misfit = checkSimpleSigningPayload(payload, { digest: target.digest, dockerReference });
    if (misfit !== undefined) {
      refusals.push({ layer: digest, reason: misfit });
      continue;
    }
    return { key: key.source, layer: digest };
  }
  throw new OciError(OciErrorCode.SIGNATURE_INVALID, `no signature in ${where} verifies: ${refusals.map((r) => r.reason).join('; ')}`, { step, evidence: { tag, refusals } });
}

/** cosign 3's bundles of `digest`, through the referrers tag scheme; throws like verifyCosignSignature. */
async function verifyBundles(client: RegistryClient, target: { registry: string; repository: string; digest: string }, keys: readonly TrustedKey[], signal?: AbortSignal): Promise<VerifiedSignature> {
  const step = 'verify checkpoint signature (sigstore bundle)';
  const tag = target.digest.replace(':', '-');
  const where = `${target.registry}/${target.repository}:${tag}`;
  let index: { manifests?: Array<{ digest?: unknown }> };
  try {
    index = JSON.parse((await client.getManifest(target.repository, tag, signal, OCI_INDEX_MEDIA_TYPE)).body.toString('utf8')) as typeof index;
  } catch (err) {
    if (err instanceof OciError && err.code === OciErrorCode.NOT_FOUND) {
      throw new OciError(OciErrorCode.SIGNATURE_MISSING, `${target.registry}/${target.repository}@${target.digest} has no referrers (${tag})`, { step, cause: err, evidence: { tag } });
    }
    if (err instanceof SyntaxError) throw new OciError(OciErrorCode.SIGNATURE_INVALID, `${where} is not JSON`, { step });
    throw err;
  }
  const refusals: Array<{ manifest: string; reason: string }> = [];
  let bundles = 0;
  for (const d of (Array.isArray(index.manifests) ? index.manifests : []).slice(0, SIGNATURE_LAYERS_MAX)) {
    if (typeof d?.digest !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(d.digest)) continue;
    const m = JSON.parse((await client.getManifest(target.repository, d.digest, signal)).body.toString('utf8')) as {
      artifactType?: unknown; subject?: { digest?: unknown }; layers?: Array<{ mediaType?: unknown; digest?: unknown; size?: unknown }>;
    };
    if (m.artifactType !== SIGSTORE_BUNDLE_MEDIA_TYPE) continue; // another kind of referrer (an SBOM, an attestation)
    bundles++;
    const layer = m.layers?.[0];
    if (m.subject?.digest !== target.digest) {
      refusals.push({ manifest: d.digest, reason: `its subject is ${JSON.stringify(m.subject?.digest)}, not ${target.digest}` });
      continue;
    }
    if (layer?.mediaType !== SIGSTORE_BUNDLE_MEDIA_TYPE || typeof layer.digest !== 'string' || typeof layer.size !== 'number' || layer.size > SIGNATURE_PAYLOAD_MAX_BYTES) {
      refusals.push({ manifest: d.digest, reason: `its layer is not a bundle of at most ${SIGNATURE_PAYLOAD_MAX_BYTES} bytes` });
      continue;
    }
    const checked = checkCosignBundle(await client.getSmallBlob(target.repository, layer.digest, SIGNATURE_PAYLOAD_MAX_BYTES, signal), target.digest, keys);
    if ('reason' in checked) {
      refusals.push({ manifest: d.digest, reason: checked.reason });
      continue;
    }
    return { key: checked.key.source, layer: layer.digest };
  }
  if (bundles === 0) throw new OciError(OciErrorCode.SIGNATURE_MISSING, `${where} lists no sigstore bundle`, { step, evidence: { tag } });
  throw new OciError(OciErrorCode.SIGNATURE_INVALID, `no bundle in ${where} verifies: ${refusals.map((r) => r.reason).join('; ')}`, { step, evidence: { tag, refusals } });
}

/**
 * The first cosign signature of `digest` in `repository` that one of `keys` made: the tag scheme
 * (`sha256-<hex>.sig`) first, then cosign 3's bundles (referrers tag `sha256-<hex>`). Throws
 * OCI_SIGNATURE_MISSING when neither holds a signature, OCI_SIGNATURE_INVALID (evidence: every refusal) when none
 * verifies; registry errors as they come. Reads at most SIGNATURE_LAYERS_MAX payloads of
 * SIGNATURE_PAYLOAD_MAX_BYTES each per scheme.
 */
export async function verifyCosignSignature(
  client: RegistryClient,
  target: { registry: string; repository: string; digest: string },
  keys: readonly TrustedKey[],
  signal?: AbortSignal,
): Promise<VerifiedSignature> {
  let legacy: OciError;
  try {
    return await verifyTagScheme(client, target, keys, signal);
  } catch (err) {
    if (!(err instanceof OciError) || (err.code !== OciErrorCode.SIGNATURE_MISSING && err.code !== OciErrorCode.SIGNATURE_INVALID)) throw err;
    legacy = err;
  }
  try {
    return await verifyBundles(client, target, keys, signal);
  } catch (err) {
    if (!(err instanceof OciError) || (err.code !== OciErrorCode.SIGNATURE_MISSING && err.code !== OciErrorCode.SIGNATURE_INVALID)) throw err;
    // The tag scheme's refusal is the more telling one unless it simply had nothing.
    if (legacy.code === OciErrorCode.SIGNATURE_INVALID || err.code === OciErrorCode.SIGNATURE_MISSING) throw legacy;
    throw err;
  }
}
