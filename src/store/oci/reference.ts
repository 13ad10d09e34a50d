/**
 * References in the registry store: the grammar lives in src/checkpoint-reference.ts (the NRI policy checks
 * annotation values with it too); here a bad one becomes OCI_INVALID_REFERENCE.
 */
import { formatReference, looksLikeReference, parseCheckpointReference, type CheckpointReference } from '../../checkpoint-reference.js';
import { OciError, OciErrorCode } from './errors.js';

export { formatReference, looksLikeReference };
export type OciReference = CheckpointReference;

/** Why `text` is not a reference thaw accepts, or undefined. Pure. */
export function checkReference(text: string): string | undefined {
  const r = parseCheckpointReference(text);
  return 'reason' in r ? r.reason : undefined;
}

/** Parses and validates a reference. Throws OCI_INVALID_REFERENCE naming what is wrong. Pure. */
export function parseReference(text: string): OciReference {
  const r = parseCheckpointReference(text);
  if ('reason' in r) throw new OciError(OciErrorCode.INVALID_REFERENCE, r.reason, { step: 'parse reference', evidence: { reference: text.slice(0, 500) } });
  return r.reference;
}

/** What the manifest endpoint is asked for: the digest when pinned, else the tag. */
export function manifestSelector(ref: OciReference): string {
  return ref.digest ?? ref.tag ?? 'latest';
}
