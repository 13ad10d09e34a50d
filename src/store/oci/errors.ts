import { ThawError } from '../../errors.js';

/**
 * Codes of the OCI registry store. Callers (the agent's on-demand pull, `thaw push`/`pull`) match on these.
 * On the restore path every one of them means "cold start and say why"; evidence carries the HTTP status,
 * the URL and the registry's own error body where there was one.
 */
export const OciErrorCode = {
  /** A reference (`registry/repo:tag@sha256:...`) that breaks the grammar. */
  INVALID_REFERENCE: 'OCI_INVALID_REFERENCE',
  /** 401/403 after the credentials (or the token flow) were tried, or a token server that refused. */
  AUTH_FAILED: 'OCI_AUTH_FAILED',
  /** The manifest or blob is not in the registry (404). */
  NOT_FOUND: 'OCI_NOT_FOUND',
  /** Bytes whose sha256 is not the digest that names them (evidence: expected, actual, url). */
  DIGEST_MISMATCH: 'OCI_DIGEST_MISMATCH',
  /** A blob shorter (or longer) than its descriptor says, after every resume attempt. */
  TRUNCATED: 'OCI_TRUNCATED',
  /** The registry cannot be reached, or broke off and could not be reached again within the retries. */
  REGISTRY_UNAVAILABLE: 'OCI_REGISTRY_UNAVAILABLE',
  /** A manifest that is not a thaw checkpoint: another artifactType, media type or config type. */
  FOREIGN_ARTIFACT: 'OCI_FOREIGN_ARTIFACT',
  /** A thaw artifact whose manifest or layer annotations are malformed (the message names the field). */
  MANIFEST_INVALID: 'OCI_MANIFEST_INVALID',
  /** The registry answered with a status the protocol does not allow at this step. */
  PROTOCOL: 'OCI_PROTOCOL',
  /** The registry's TLS certificate does not verify against the trusted CAs (pass `ca` for a private CA). */
  TLS_UNTRUSTED: 'OCI_TLS_UNTRUSTED',
  /** No answer within the caller's timeout. */
  TIMEOUT: 'OCI_TIMEOUT',
  /** The caller's AbortSignal fired. */
  ABORTED: 'OCI_ABORTED',
  /** A local file could not be read or written (cause: the Node error). */
  IO: 'OCI_IO',
  /** The policy requires a signature and the registry holds none for this digest (no `sha256-<hex>.sig` tag). */
  SIGNATURE_MISSING: 'OCI_SIGNATURE_MISSING',
  /**
   * A signature artifact that proves nothing for this checkpoint: made by none of the keys the policy names, over
   * another digest or repository, or malformed (evidence: what was checked, the layer).
   */
  SIGNATURE_INVALID: 'OCI_SIGNATURE_INVALID',
  /**
   * A signing key (agent config `signingKey`, `thaw push --sign-key`) that thaw will not use: not a regular file
   * of its own user, readable by group or others, not an unencrypted PEM ECDSA P-256 private key.
   */
  SIGNING_KEY_INVALID: 'OCI_SIGNING_KEY_INVALID',
  /** The policy does not allow this repository for the asking namespace, or a host the access file does not name. */
  NOT_ALLOWED: 'OCI_NOT_ALLOWED',
  /**
   * A push with weights layers (`thaw push --with-weights`) found a weights source of the checkpoint nowhere on
   * this node: not in the store's weights cache, not under the model directories given (evidence: path, sha256).
   */
  WEIGHTS_SOURCE_NOT_FOUND: 'OCI_WEIGHTS_SOURCE_NOT_FOUND',
} as const;
export type OciErrorCode = (typeof OciErrorCode)[keyof typeof OciErrorCode];

export class OciError extends ThawError {
  declare readonly code: OciErrorCode;

  constructor(code: OciErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'OciError';
  }
}

/** Errors worth retrying from where the transfer stopped: the connection broke, or the registry hiccuped. */
export function isTransient(err: unknown): boolean {
  return err instanceof OciError && (err.code === OciErrorCode.REGISTRY_UNAVAILABLE || err.code === OciErrorCode.TIMEOUT);
}
