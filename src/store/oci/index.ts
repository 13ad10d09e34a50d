/** The OCI registry store: push and pull of checkpoints as OCI artifacts (see push.ts, pull.ts, artifact.ts). */
export { OciError, OciErrorCode } from './errors.js';
export { checkReference, formatReference, looksLikeReference, parseReference, type OciReference } from './reference.js';
export { RegistryClient, type RegistryClientOptions, type RegistryCredentials } from './client.js';
export { CHECKPOINT_ARTIFACT_TYPE, CHECKPOINT_CONFIG_MEDIA_TYPE, CHECKPOINT_LAYER_MEDIA_TYPE, DEFAULT_CHUNK_BYTES, WEIGHTS_LAYER_MEDIA_TYPE, ANNOTATION_WEIGHTS_SHA256, ANNOTATION_WEIGHTS_PATH, weightsSourcesOf, type WeightsLayer } from './artifact.js';
export { WeightsCache, weightsCacheDir, WEIGHTS_CACHE_DIR_NAME } from './weights-cache.js';
export { locateWeightsFiles, type WeightsFile } from './weights-files.js';
export { fetchResolved, localNameFor, pullCheckpoint, resolveRemote, type PullOptions, type PullResult, type RegistryAccess, type ResolvedRemote } from './pull.js';
export { pushCheckpoint, type PushOptions, type PushResult } from './push.js';
export { FileCache } from './file-cache.js';
export { loadSigningKey, parseSigningKey, pushCosignSignature, simpleSigningPayload, SIGNING_KEY_MAX_BYTES, type SignatureTarget, type SignResult, type SigningKey } from './sign.js';
export {
  verifyCosignSignature,
  parseTrustedKey,
  checkCosignBundle,
  checkSimpleSigningPayload,
  keyThatSigned,
  signatureTagFor,
  dssePae,
  COSIGN_SIGNATURE_ANNOTATION,
  COSIGN_SIGNATURE_TYPE,
  COSIGN_SIMPLE_SIGNING_MEDIA_TYPE,
  type TrustedKey,
  type VerifiedSignature,
} from './signature.js';
