/**
 * The checkpoint name rule, shared by the NRI policy (names arriving in annotations), the CLI and the store
 * (where a name becomes a directory). It lives at the root of src/ because both `nri-plugin` and `store` use it
 * and neither may import the other (design.md, Layout).
 */

export const CHECKPOINT_NAME_MAX_LENGTH = 128;
/** Lower-case letters, digits, '.', '_' and '-', starting and ending with a letter or digit. */
const CHECKPOINT_NAME_PATTERN = /^[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?$/;

/**
 * Checks a checkpoint name as it arrives from an annotation (or the CLI): it becomes a directory name in the
 * store, so anything that could escape the store (`/`, `..`, NUL, absolute paths) or confuse tools is refused.
 * Returns the reason, or undefined when the name is valid.
 */
export function checkCheckpointName(name: string): string | undefined {
  if (name.length === 0) return 'checkpoint name is empty';
  if (name.includes('\0')) return 'checkpoint name contains a NUL byte';
  if (name.includes('/')) return `checkpoint name ${JSON.stringify(name)} contains '/' (names cannot be paths)`;
  if (name.includes('..')) return `checkpoint name ${JSON.stringify(name)} contains '..'`;
  if (name.length > CHECKPOINT_NAME_MAX_LENGTH) {
    return `checkpoint name is ${name.length} characters long (at most ${CHECKPOINT_NAME_MAX_LENGTH})`;
  }
  if (!CHECKPOINT_NAME_PATTERN.test(name)) {
    return `checkpoint name ${JSON.stringify(name)} must be lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit`;
  }
  return undefined;
}

/**
 * Names beginning with this are the store's names of pulled checkpoints (`oci-<64 hex>`, derived from the
 * manifest digest by src/store/oci/pull.ts). A pod or a CLI user never names one directly: a local `oci-<digest>`
 * directory would otherwise stand in for a digest-pinned reference, and a tenant could plant one.
 */
export const RESERVED_NAME_PREFIX = 'oci-';

/** Kubernetes namespace names are DNS labels (RFC 1123): at most 63 lower-case letters, digits and '-'. */
const NAMESPACE_PATTERN = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** The namespace a bare name means when the caller gives none (the CLI's `--namespace` default). */
export const DEFAULT_NAMESPACE = 'default';

/** Checks a Kubernetes namespace name; returns the reason it is refused, or undefined. */
export function checkNamespaceName(namespace: string): string | undefined {
  if (!NAMESPACE_PATTERN.test(namespace)) {
    return `namespace ${JSON.stringify(namespace.slice(0, 80))} is not a Kubernetes namespace name (a DNS label: lower-case letters, digits and '-', at most 63)`;
  }
  return undefined;
}

/**
 * Checks a name a user or a pod gives (an annotation, the CLI, the API): the name rule, and names reserved for
 * pulled checkpoints refused. Returns the reason, or undefined.
 */
export function checkUserCheckpointName(name: string): string | undefined {
  const bad = checkCheckpointName(name);
  if (bad !== undefined) return bad;
  if (name.startsWith(RESERVED_NAME_PREFIX)) {
    return `checkpoint name ${JSON.stringify(name)} begins with "${RESERVED_NAME_PREFIX}", which is reserved for checkpoints pulled from a registry (name the registry reference instead)`;
  }
  return undefined;
}

/** A checkpoint as its owner names it: the Kubernetes namespace of the pod it was taken from, and its name. */
export interface QualifiedName {
  namespace: string;
  name: string;
}

/**
 * Parses `namespace/name` or a bare `name` (which means `defaultNamespace`), as the CLI and the control API take
 * them. Pure; `{ reason }` when either part is bad (a reserved `oci-` name included).
 */
export function parseQualifiedName(text: string, defaultNamespace: string = DEFAULT_NAMESPACE): QualifiedName | { reason: string } {
  const slash = text.indexOf('/');
  const namespace = slash < 0 ? defaultNamespace : text.slice(0, slash);
  const name = slash < 0 ? text : text.slice(slash + 1);
  const badNs = checkNamespaceName(namespace);
  if (badNs !== undefined) return { reason: badNs };
  const bad = checkUserCheckpointName(name);
  if (bad !== undefined) return { reason: bad };
  return { namespace, name };
}

/** `namespace/name`, the form logs, metrics and the CLI show. */
export function formatQualifiedName(q: QualifiedName): string {
  return `${q.namespace}/${q.name}`;
}

/** The store's name of a pulled checkpoint: `oci-` and the 64 hex digits of its registry manifest's sha256. */
const PULLED_KEY_PATTERN = /^oci-[0-9a-f]{64}$/;

/** True for `oci-<64 hex>`, the key of a pulled checkpoint. */
export function isPulledKey(key: string): boolean {
  return PULLED_KEY_PATTERN.test(key);
}

/**
 * A checkpoint's key in the store (what the store API, leases, logs and metrics name it by): `namespace/name` for
 * a checkpoint owned by that Kubernetes namespace (the namespace of the pod it was taken from), `oci-<64 hex>` for
 * one pulled from a registry (owned by no namespace: the tenancy policy decides on every use). Every store call
 * takes a key; a bare name is never a key, so no caller can reach another namespace's checkpoint by forgetting to
 * qualify it.
 */
export type StoreKey = string;

export type ParsedStoreKey = { kind: 'owned'; namespace: string; name: string } | { kind: 'pulled'; name: string };

/** Parses a store key; `{ reason }` when it is neither form. Pure. */
export function parseStoreKey(key: string): ParsedStoreKey | { reason: string } {
  if (isPulledKey(key)) return { kind: 'pulled', name: key };
  const slash = key.indexOf('/');
  if (slash < 0) {
    const bad = checkCheckpointName(key);
    return { reason: bad ?? `checkpoint ${JSON.stringify(key)} names no namespace (the store names checkpoints namespace/name)` };
  }
  const namespace = key.slice(0, slash);
  const name = key.slice(slash + 1);
  const badNs = checkNamespaceName(namespace);
  if (badNs !== undefined) return { reason: badNs };
  const bad = checkCheckpointName(name);
  if (bad !== undefined) return { reason: bad };
  if (name.startsWith(RESERVED_NAME_PREFIX)) return { reason: `checkpoint name ${JSON.stringify(name)} begins with "${RESERVED_NAME_PREFIX}", which is reserved for checkpoints pulled from a registry` };
  return { kind: 'owned', namespace, name };
}

/** The reason a string is not a store key, or undefined. */
export function checkStoreKey(key: string): string | undefined {
  const parsed = parseStoreKey(key);
  return 'reason' in parsed ? parsed.reason : undefined;
}

/** The key of a checkpoint a namespace owns. */
export function storeKeyOf(q: QualifiedName): StoreKey {
  return `${q.namespace}/${q.name}`;
}

/**
 * What a caller's checkpoint name means as a store key: `namespace/name` as given, a bare name in
 * `defaultNamespace`, and (with `allowPulled`: list, inspect, delete) a pulled checkpoint's `oci-<hex>`. Pure.
 */
export function resolveStoreKey(text: string, defaultNamespace: string, options: { allowPulled?: boolean } = {}): { key: StoreKey } | { reason: string } {
  if (options.allowPulled === true && isPulledKey(text)) return { key: text };
  const q = parseQualifiedName(text, defaultNamespace);
  if ('reason' in q) return q;
  return { key: storeKeyOf(q) };
}

/** The namespace that owns a key (undefined for a pulled checkpoint). Expects a valid key. */
export function namespaceOfKey(key: StoreKey): string | undefined {
  const parsed = parseStoreKey(key);
  return 'kind' in parsed && parsed.kind === 'owned' ? parsed.namespace : undefined;
}
