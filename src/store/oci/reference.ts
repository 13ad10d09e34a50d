/**
 * OCI references as thaw accepts them: `registry[:port]/repo/path[:tag][@sha256:<64 hex>]`. Pure.
 *
 * The registry part is mandatory (a checkpoint has no "default registry" to fall back on, and a name
 * without one is a local checkpoint name): the first path component must hold a '.' or ':' or be
 * `localhost`. Grammar of the rest from the distribution spec: repository components
 * `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, tag `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
 */
import { OciError, OciErrorCode } from './errors.js';

export interface OciReference {
  /** host[:port], as written (lower-cased). */
  registry: string;
  repository: string;
  tag?: string;
  /** `sha256:<64 hex>` */
  digest?: string;
}

const REPO_COMPONENT = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$/;
const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const DIGEST = /^sha256:[0-9a-f]{64}$/;
const HOST = /^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[0-9]{1,5})?$|^\[[0-9a-f:.]+\](?::[0-9]{1,5})?$/;
export const REFERENCE_MAX_LENGTH = 255 + 128 + 72;

/** Why `text` is not a reference thaw accepts, or undefined. Pure. */
export function checkReference(text: string): string | undefined {
  try {
    parseReference(text);
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

/** True when `text` looks like a registry reference rather than a local checkpoint name (it holds a '/'). */
export function looksLikeReference(text: string): boolean {
  return text.includes('/');
}

/** Parses and validates a reference. Throws OCI_INVALID_REFERENCE naming what is wrong. Pure. */
export function parseReference(text: string): OciReference {
  const bad = (why: string): OciError =>
    new OciError(OciErrorCode.INVALID_REFERENCE, `${JSON.stringify(text.slice(0, 200))} is not a registry reference: ${why}`, {
      step: 'parse reference',
      evidence: { reference: text.slice(0, 500) },
    });
  if (text.length === 0) throw bad('it is empty');
  if (text.length > REFERENCE_MAX_LENGTH) throw bad(`it is longer than ${REFERENCE_MAX_LENGTH} characters`);
  if (/[\s\0]/.test(text)) throw bad('it contains whitespace or NUL');
  let rest = text;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw bad(`digest ${JSON.stringify(digest)} must be "sha256:" and 64 lower-case hex digits`);
  }
  const slash = rest.indexOf('/');
  if (slash < 0) throw bad('it names no registry (expected registry/repository[:tag])');
  const registry = rest.slice(0, slash).toLowerCase();
  let path = rest.slice(slash + 1);
  if (!(registry.includes('.') || registry.includes(':') || registry === 'localhost')) {
    throw bad(`${JSON.stringify(registry)} is not a registry host (it needs a '.', a ':port', or to be localhost)`);
  }
  if (!HOST.test(registry)) throw bad(`registry ${JSON.stringify(registry)} is not a host[:port]`);
  const port = /:(\d+)$/.exec(registry)?.[1];
  if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) throw bad(`port ${port} is out of range`);
  let tag: string | undefined;
  const colon = path.lastIndexOf(':');
  if (colon >= 0) {
    tag = path.slice(colon + 1);
    path = path.slice(0, colon);
    if (!TAG.test(tag)) throw bad(`tag ${JSON.stringify(tag)} must be letters, digits, '_', '.', '-' (at most 128, not starting with '.' or '-')`);
  }
  if (path.length === 0) throw bad('the repository is empty');
  if (path.length > 255) throw bad('the repository is longer than 255 characters');
  for (const component of path.split('/')) {
    if (!REPO_COMPONENT.test(component)) {
      throw bad(`repository component ${JSON.stringify(component)} must be lower-case letters and digits separated by '.', '_', '__' or '-'`);
    }
  }
  if (tag === undefined && digest === undefined) tag = 'latest';
  return { registry, repository: path, ...(tag !== undefined ? { tag } : {}), ...(digest !== undefined ? { digest } : {}) };
}

/** The canonical text of a reference (what parseReference reads back to the same value). Pure. */
export function formatReference(ref: OciReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`;
}

/** What the manifest endpoint is asked for: the digest when pinned, else the tag. */
export function manifestSelector(ref: OciReference): string {
  return ref.digest ?? ref.tag ?? 'latest';
}
