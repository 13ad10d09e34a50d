/**
 * Pushes a signature the way `cosign sign --key` (legacy tag scheme) stores it, made here with node:crypto:
 * an OCI image manifest tagged `sha256-<hex>.sig` whose layer is the simple-signing payload, with the base64
 * DER ECDSA signature in the `dev.cosignproject.cosign/signature` annotation. Tests use it for the cases cosign
 * itself will not make (a signature over another digest, copied into another repository, by another key).
 */
import { createHash, sign, type KeyObject } from 'node:crypto';
import { Readable } from 'node:stream';
import { RegistryClient } from '../../src/store/oci/client.js';
import { COSIGN_SIGNATURE_ANNOTATION, COSIGN_SIGNATURE_TYPE, COSIGN_SIMPLE_SIGNING_MEDIA_TYPE, signatureTagFor } from '../../src/store/oci/signature.js';

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

async function putBlob(client: RegistryClient, repository: string, data: Buffer): Promise<string> {
  const digest = sha(data);
  const session = await client.startUpload(repository);
  await client.putBlob(repository, session, digest, data.length, () => Readable.from([data]));
  return digest;
}

export interface SignatureFixture {
  /** The digest the payload claims to sign (default: `tagDigest`). */
  signedDigest?: string;
  /** The repository the payload names (default: `${registry}/${repository}`). */
  dockerReference?: string;
}

/** Pushes a cosign-format signature of `tagDigest` into `repository` (plain http registry), signed with `key`. */
export async function pushCosignStyleSignature(registry: string, repository: string, tagDigest: string, key: KeyObject, f: SignatureFixture = {}): Promise<void> {
  const client = new RegistryClient({ registry, plainHttp: true });
  try {
    const payload = Buffer.from(JSON.stringify({
      critical: {
        identity: { 'docker-reference': f.dockerReference ?? `${registry}/${repository}` },
        image: { 'docker-manifest-digest': f.signedDigest ?? tagDigest },
        type: COSIGN_SIGNATURE_TYPE,
      },
      optional: null,
    }));
    const config = Buffer.from(JSON.stringify({ architecture: '', os: '', config: {}, rootfs: { type: 'layers', diff_ids: [sha(payload)] } }));
    const payloadDigest = await putBlob(client, repository, payload);
    const configDigest = await putBlob(client, repository, config);
    const manifest = {
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', size: config.length, digest: configDigest },
      layers: [{
        mediaType: COSIGN_SIMPLE_SIGNING_MEDIA_TYPE,
        size: payload.length,
        digest: payloadDigest,
        annotations: { [COSIGN_SIGNATURE_ANNOTATION]: sign('sha256', payload, key).toString('base64') },
      }],
    };
    await client.putManifest(repository, signatureTagFor(tagDigest), Buffer.from(JSON.stringify(manifest)), manifest.mediaType);
  } finally {
    client.close();
  }
}
