/**
 * Registry references of checkpoints, as a restore annotation or `thaw pull` names them:
 * `registry[:port]/repo/path[:tag][@sha256:<64 hex>]`. Pure; shared by the NRI policy (annotation values) and
 * the registry store (src/store/oci/reference.ts), which sit in layers that may not import each other.
 *
 * The registry part is mandatory (a checkpoint has no "default registry" to fall back on, and a value without
 * a '/' is a local checkpoint name): the first path component must hold a '.' or ':' or be `localhost`.
 * Grammar of the rest from the distribution spec: repository components `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`,
 * tag `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`. A reference never names a directory: a pulled checkpoint is stored
 * under a name derived from its manifest digest.
 */

export interface CheckpointReference {
  /** host[:port], lower-cased. */
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

/**
 * True when an annotation value names a registry reference rather than a local checkpoint: its first path
 * component is a registry host (holds a '.' or a ':', or is `localhost`). `team-a/llm` is not one: it is a
 * checkpoint `llm` of namespace `team-a` (a Kubernetes namespace holds neither '.' nor ':'; one named
 * `localhost` cannot be named this way).
 */
export function looksLikeReference(text: string): boolean {
  const slash = text.indexOf('/');
  if (slash < 0) return false;
  const first = text.slice(0, slash);
  return first.includes('.') || first.includes(':') || first.toLowerCase() === 'localhost';
}

/** Parses and validates a reference; `{ reason }` says what is wrong. Pure, never throws. */
export function parseCheckpointReference(text: string): { reference: CheckpointReference } | { reason: string } {
  const bad = (why: string): { reason: string } => ({ reason: `${JSON.stringify(text.slice(0, 200))} is not a registry reference: ${why}` });
  if (text.length === 0) return bad('it is empty');
  if (text.length > REFERENCE_MAX_LENGTH) return bad(`it is longer than ${REFERENCE_MAX_LENGTH} characters`);
  if (/[\s\0]/.test(text)) return bad('it contains whitespace or NUL');
  let rest = text;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) return bad(`digest ${JSON.stringify(digest)} must be "sha256:" and 64 lower-case hex digits`);
  }
  const slash = rest.indexOf('/');
  if (slash < 0) return bad('it names no registry (expected registry/repository[:tag])');
  const registry = rest.slice(0, slash).toLowerCase();
  let path = rest.slice(slash + 1);
  if (!(registry.includes('.') || registry.includes(':') || registry === 'localhost')) {
    return bad(`${JSON.stringify(registry)} is not a registry host (it needs a '.', a ':port', or to be localhost)`);
  }
  if (!HOST.test(registry)) return bad(`registry ${JSON.stringify(registry)} is not a host[:port]`);
  const port = /:(\d+)$/.exec(registry)?.[1];
  if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) return bad(`port ${port} is out of range`);
  let tag: string | undefined;
  const colon = path.lastIndexOf(':');
  if (colon >= 0) {
    tag = path.slice(colon + 1);
    path = path.slice(0, colon);
    if (!TAG.test(tag)) return bad(`tag ${JSON.stringify(tag)} must be letters, digits, '_', '.', '-' (at most 128, not starting with '.' or '-')`);
  }
  if (path.length === 0) return bad('the repository is empty');
  if (path.length > 255) return bad('the repository is longer than 255 characters');
  for (const component of path.split('/')) {
    if (!REPO_COMPONENT.test(component)) {
      return bad(`repository component ${JSON.stringify(component)} must be lower-case letters and digits separated by '.', '_', '__' or '-'`);
    }
  }
  if (tag === undefined && digest === undefined) tag = 'latest';
  return { reference: { registry, repository: path, ...(tag !== undefined ? { tag } : {}), ...(digest !== undefined ? { digest } : {}) } };
}

/** The canonical text of a reference (what parseCheckpointReference reads back to the same value). Pure. */
export function formatReference(ref: CheckpointReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`;
}
