/**
 * The operator's tenancy policy: who may take checkpoints, who may restore which, and from which registries.
 * It lives in the agent's configuration file (section `tenancy`, docs/security.md "Tenancy and supply chain"),
 * never in a pod's annotations: everything a pod says is what a tenant says.
 *
 *   tenancy:
 *     checkpointNamespaces: ["*"]          # namespaces whose pods may be checkpoint sources ("*": all)
 *     shared:                              # checkpoints another namespace may restore
 *       - from: platform/base-llm          #   namespace/name of the checkpoint
 *         to: [team-a, team-b]             #   namespaces allowed to restore it
 *     namespaces:
 *       team-a:
 *         quotaBytes: 200000000000         # what this namespace's checkpoints may hold in the node store
 *         registries:                      # where its pods may restore from, and who must have signed it
 *           - prefix: registry.example.com/team-a     # host[:port]/repository prefix (whole components)
 *             keys: [/etc/thaw/keys/team-a.pub]        # cosign public keys (PEM); any one of them suffices
 *           - prefix: localhost:5000/scratch
 *             allowUnsigned: true                      # explicit: no signature required (tests, labs)
 *
 * The default (no `tenancy` section) is the one safe on a shared cluster: every namespace may checkpoint its own
 * pods, and a checkpoint restores only into pods of the namespace it was taken from; nothing is shared; no
 * registry reference restores (a pod naming one cold-starts) until a namespace is given a registry prefix with
 * its keys. Pure but for loadTrustedKeys, which the agent calls once at start.
 */
import { readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { parseTrustedKey, type StoreLimits, type TrustedKey } from '../store/index.js';
import { checkNamespaceName, formatQualifiedName, parseQualifiedName, storeKeyOf, type QualifiedName, type StoreKey } from '../checkpoint-name.js';
import type { CheckpointReference } from '../checkpoint-reference.js';

export interface RegistryGrant {
  /** `host[:port]/repository-prefix`, lower-case; matches whole path components. */
  prefix: string;
  /** Absolute paths of the public keys (PEM) one of which must have signed the checkpoint. */
  keyFiles: string[];
  /** No signature required: only when the operator wrote `allowUnsigned: true`. */
  allowUnsigned: boolean;
}

export interface NamespacePolicy {
  registries: RegistryGrant[];
  /** Bytes this namespace's checkpoints may hold in the node store; absent: only the store's total quota. */
  quotaBytes?: number;
}

export interface SharedGrant {
  from: QualifiedName;
  to: ReadonlySet<string>;
}

export interface TenancyPolicy {
  /** "*": every namespace. */
  checkpointNamespaces: '*' | ReadonlySet<string>;
  shared: SharedGrant[];
  namespaces: ReadonlyMap<string, NamespacePolicy>;
}

/** The default: own namespace only, nothing shared, no registry. One definition (docs/security.md quotes it). */
export function defaultTenancyPolicy(): TenancyPolicy {
  return { checkpointNamespaces: '*', shared: [], namespaces: new Map() };
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const PREFIX_PATTERN = /^[a-z0-9.-]+(?::[0-9]{1,5})?(?:\/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$/;

/**
 * Reads the `tenancy` section (already parsed from YAML). Throws an Error naming the bad field
 * (`tenancy.namespaces.team-a.registries[0].prefix: ...`); the caller wraps it as AGENT_CONFIG_INVALID.
 */
export function parseTenancyPolicy(raw: unknown): TenancyPolicy {
  const fail = (at: string, why: string): never => {
    throw new Error(`${at}: ${why}`);
  };
  const policy = defaultTenancyPolicy();
  if (raw === undefined || raw === null) return policy;
  if (!isObject(raw)) fail('tenancy', 'must be a mapping');
  const o = raw as Record<string, unknown>;
  for (const key of Object.keys(o)) {
    if (!['checkpointNamespaces', 'shared', 'namespaces'].includes(key)) fail(`tenancy.${key}`, 'unknown key (expected checkpointNamespaces, shared, namespaces)');
  }
  const nsList = (v: unknown, at: string, allowStar: boolean): string[] => {
    if (!Array.isArray(v)) return fail(at, 'must be a list of namespace names');
    return v.map((n, i) => {
      if (typeof n !== 'string') return fail(`${at}[${i}]`, 'must be a string');
      if (allowStar && n === '*') return n;
      const bad = checkNamespaceName(n);
      return bad === undefined ? n : fail(`${at}[${i}]`, bad);
    });
  };
  let checkpointNamespaces: TenancyPolicy['checkpointNamespaces'] = policy.checkpointNamespaces;
  if (o['checkpointNamespaces'] !== undefined) {
    const list = nsList(o['checkpointNamespaces'], 'tenancy.checkpointNamespaces', true);
    checkpointNamespaces = list.includes('*') ? '*' : new Set(list);
  }
  const shared: SharedGrant[] = [];
  if (o['shared'] !== undefined) {
    if (!Array.isArray(o['shared'])) fail('tenancy.shared', 'must be a list of {from, to}');
    (o['shared'] as unknown[]).forEach((g, i) => {
      const at = `tenancy.shared[${i}]`;
      if (!isObject(g)) return fail(at, 'must be a mapping {from: namespace/name, to: [namespaces]}');
      for (const key of Object.keys(g)) if (key !== 'from' && key !== 'to') fail(`${at}.${key}`, 'unknown key (expected from, to)');
      const from = g['from'];
      if (typeof from !== 'string' || !from.includes('/')) return fail(`${at}.from`, 'must be namespace/name');
      const q = parseQualifiedName(from);
      if ('reason' in q) return fail(`${at}.from`, q.reason);
      shared.push({ from: q, to: new Set(nsList(g['to'], `${at}.to`, false)) });
    });
  }
  const namespaces = new Map<string, NamespacePolicy>();
  if (o['namespaces'] !== undefined) {
    if (!isObject(o['namespaces'])) fail('tenancy.namespaces', 'must be a mapping keyed by namespace');
    for (const [ns, v] of Object.entries(o['namespaces'] as Record<string, unknown>)) {
      const at = `tenancy.namespaces.${ns}`;
      const badNs = checkNamespaceName(ns);
      if (badNs !== undefined) fail(at, badNs);
      if (!isObject(v)) fail(at, 'must be a mapping {quotaBytes?, registries?}');
      const nv = v as Record<string, unknown>;
      for (const key of Object.keys(nv)) if (key !== 'quotaBytes' && key !== 'registries') fail(`${at}.${key}`, 'unknown key (expected quotaBytes, registries)');
      const entry: NamespacePolicy = { registries: [] };
      if (nv['quotaBytes'] !== undefined) {
        const q = nv['quotaBytes'];
        if (typeof q !== 'number' || !Number.isSafeInteger(q) || q < 0) fail(`${at}.quotaBytes`, 'must be a non-negative integer (bytes)');
        entry.quotaBytes = q as number;
      }
      if (nv['registries'] !== undefined) {
        if (!Array.isArray(nv['registries'])) fail(`${at}.registries`, 'must be a list of {prefix, keys | allowUnsigned}');
        (nv['registries'] as unknown[]).forEach((r, i) => {
          const rat = `${at}.registries[${i}]`;
          if (!isObject(r)) return fail(rat, 'must be a mapping {prefix, keys | allowUnsigned}');
          for (const key of Object.keys(r)) if (!['prefix', 'keys', 'allowUnsigned'].includes(key)) fail(`${rat}.${key}`, 'unknown key (expected prefix, keys, allowUnsigned)');
          const prefix = r['prefix'];
          if (typeof prefix !== 'string' || !PREFIX_PATTERN.test(prefix) || !prefix.includes('/')) {
            return fail(`${rat}.prefix`, 'must be host[:port]/repository-prefix in lower case (e.g. "registry.example.com/team-a")');
          }
          const keys = r['keys'] ?? [];
          if (!Array.isArray(keys) || keys.some((k) => typeof k !== 'string' || !isAbsolute(k))) fail(`${rat}.keys`, 'must be a list of absolute paths of PEM public keys');
          const allowUnsigned = r['allowUnsigned'] ?? false;
          if (typeof allowUnsigned !== 'boolean') fail(`${rat}.allowUnsigned`, 'must be a boolean');
          if ((keys as string[]).length === 0 && allowUnsigned !== true) fail(rat, 'names no keys: give the keys that must have signed its checkpoints, or allowUnsigned: true');
          if ((keys as string[]).length > 0 && allowUnsigned === true) fail(rat, 'gives keys and allowUnsigned: true; choose one');
          entry.registries.push({ prefix, keyFiles: keys as string[], allowUnsigned: allowUnsigned as boolean });
        });
      }
      namespaces.set(ns, entry);
    }
  }
  return { checkpointNamespaces, shared, namespaces };
}

/** Why a pod of `namespace` may not be a checkpoint source, or undefined when it may. */
export function checkpointRefusal(policy: TenancyPolicy, namespace: string): string | undefined {
  if (policy.checkpointNamespaces === '*' || policy.checkpointNamespaces.has(namespace)) return undefined;
  return `namespace ${namespace} may not take checkpoints (tenancy.checkpointNamespaces)`;
}

/**
 * Whether a pod of `podNamespace` may restore the local checkpoint `owner` (the namespace it was taken from and
 * its name): its own namespace's, or one the policy shares with it. `owner.namespace` undefined: the checkpoint
 * recorded no namespace (taken outside a pod); it restores nowhere unless shared by name... which needs a
 * namespace, so never.
 */
export function localRestoreRefusal(policy: TenancyPolicy, podNamespace: string, owner: { namespace: string | undefined; name: string }): string | undefined {
  if (owner.namespace === undefined) return `checkpoint ${owner.name} records no namespace; it restores into no pod`;
  if (owner.namespace === podNamespace) return undefined;
  const q = { namespace: owner.namespace, name: owner.name };
  const granted = policy.shared.some((g) => g.from.namespace === q.namespace && g.from.name === q.name && g.to.has(podNamespace));
  if (granted) return undefined;
  return `checkpoint ${formatQualifiedName(q)} belongs to namespace ${owner.namespace}; a pod of ${podNamespace} may not restore it (tenancy.shared grants no such share)`;
}

/**
 * The store key a pod of `podNamespace` means by a local checkpoint name (an annotation): a bare name is its own
 * namespace's (never another's, whatever that one holds under the same name), `namespace/name` is that
 * namespace's (restored only if the policy shares it, localRestoreRefusal). `{ reason }` for a bad name or a pod
 * without a valid namespace.
 */
export function restoreKeyOf(value: string, podNamespace: string): { key: StoreKey; owner: QualifiedName } | { reason: string } {
  const badNs = checkNamespaceName(podNamespace);
  if (badNs !== undefined) return { reason: `the pod's ${badNs}` };
  const q = parseQualifiedName(value, podNamespace);
  if ('reason' in q) return q;
  return { key: storeKeyOf(q), owner: q };
}

/** True when `prefix` (host/repo-prefix) covers the reference's registry and repository, on component boundaries. */
function prefixCovers(prefix: string, registry: string, repository: string): boolean {
  const full = `${registry}/${repository}`;
  return full === prefix || full.startsWith(`${prefix}/`);
}

/** The grant that lets `namespace` restore from `reference` (the longest matching prefix), or undefined. */
export function registryGrantFor(policy: TenancyPolicy, namespace: string, reference: Pick<CheckpointReference, 'registry' | 'repository'>): RegistryGrant | undefined {
  const grants = policy.namespaces.get(namespace)?.registries ?? [];
  let best: RegistryGrant | undefined;
  for (const g of grants) {
    if (prefixCovers(g.prefix, reference.registry, reference.repository) && (best === undefined || g.prefix.length > best.prefix.length)) best = g;
  }
  return best;
}

/** Every key file the policy names (the agent reads each once at start). */
export function policyKeyFiles(policy: TenancyPolicy): string[] {
  return [...new Set([...policy.namespaces.values()].flatMap((n) => n.registries.flatMap((r) => r.keyFiles)))];
}

/**
 * Reads every key file the policy names (PEM, ECDSA P-256): once, at agent start, so that a bad key is a
 * configuration error then and never a surprise at a restore. Throws an Error naming the file.
 */
export async function loadTrustedKeys(policy: TenancyPolicy): Promise<Map<string, TrustedKey>> {
  const keys = new Map<string, TrustedKey>();
  for (const file of policyKeyFiles(policy)) keys.set(file, parseTrustedKey(await readFile(file, 'utf8'), file));
  return keys;
}

/**
 * The local store's bounds from the agent's `store.*` keys (0: none) and the policy's per-namespace quotas, which
 * take precedence over `store.namespaceQuotaBytes` (the quota of every namespace the policy names none for).
 */
export function storeLimitsOf(store: { quotaBytes: number; namespaceQuotaBytes: number; minFreeBytes: number }, policy: TenancyPolicy): StoreLimits {
  return {
    ...(store.quotaBytes > 0 ? { totalQuotaBytes: store.quotaBytes } : {}),
    namespaceQuotaBytes: (ns) => policy.namespaces.get(ns)?.quotaBytes ?? (store.namespaceQuotaBytes > 0 ? store.namespaceQuotaBytes : undefined),
    ...(store.minFreeBytes > 0 ? { minFreeBytes: store.minFreeBytes } : {}),
  };
}
