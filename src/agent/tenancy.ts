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
 *         snapshotRepository: registry.example.com/team-a/snapshots   # thaw.dev/snapshot checkpoints of this
 *                                          # namespace: the first one taken on any node is pushed there (tag
 *                                          # <name>-<12 hex>, snapshot.ts), other nodes pull it instead of taking
 *                                          # their own. Must lie under one of the namespace's registries (its pulls
 *                                          # are checked like any registry checkpoint's: signature or allowUnsigned)
 *         snapshotWeightsLayers: true      # those pushes also carry the weights sources as layers (docs/weights.md)
 *         signingKey: /etc/thaw/keys/team-a-snapshots.key   # the agent signs what it pushes there (cosign's
 *                                          # tag scheme, src/store/oci/sign.ts): a PEM ECDSA P-256 private key,
 *                                          # unencrypted, owned by root, mode 0600 (else the agent refuses to
 *                                          # start); its public half must be one of the covering grant's keys
 *
 * The default (no `tenancy` section) is the one safe on a shared cluster: every namespace may checkpoint its own
 * pods, and a checkpoint restores only into pods of the namespace it was taken from; nothing is shared; no
 * registry reference restores (a pod naming one cold-starts) until a namespace is given a registry prefix with
 * its keys. Pure but for loadTrustedKeys and loadSigningKeys, which the agent calls once at start.
 */
import { readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { loadSigningKey, parseTrustedKey, type SigningKey, type StoreLimits, type TrustedKey } from '../store/index.js';
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
  /** `host[:port]/repository`: where this namespace's thaw.dev/snapshot checkpoints are pushed and pulled. */
  snapshotRepository?: string;
  /**
   * The snapshot pushes carry the weights sources as layers (docs/weights.md "Between nodes"), for nodes
   * without the model: found in the store's weights cache or under the agent's `weights.modelDirs`.
   */
  snapshotWeightsLayers?: boolean;
  /** Absolute path of the PEM private key the agent signs its pushes to snapshotRepository with. */
  signingKey?: string;
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

const NAMESPACE_KEYS = ['quotaBytes', 'registries', 'snapshotRepository', 'snapshotWeightsLayers', 'signingKey'];
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
      if (!isObject(v)) fail(at, 'must be a mapping {quotaBytes?, registries?, snapshotRepository?, snapshotWeightsLayers?, signingKey?}');
      const nv = v as Record<string, unknown>;
      for (const key of Object.keys(nv)) if (!NAMESPACE_KEYS.includes(key)) fail(`${at}.${key}`, `unknown key (expected ${NAMESPACE_KEYS.join(', ')})`);
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
      if (nv['snapshotRepository'] !== undefined) {
        const repo = nv['snapshotRepository'];
        if (typeof repo !== 'string' || !PREFIX_PATTERN.test(repo) || !repo.includes('/')) {
          fail(`${at}.snapshotRepository`, 'must be host[:port]/repository in lower case (e.g. "registry.example.com/team-a/snapshots")');
        }
        const slash = (repo as string).indexOf('/');
        const place = { registry: (repo as string).slice(0, slash), repository: (repo as string).slice(slash + 1) };
        if (registryGrantFor({ ...policy, namespaces: new Map([[ns, entry]]) }, ns, place) === undefined) {
          fail(`${at}.snapshotRepository`, `${repo as string} is under none of ${ns}'s registries: its pulls would be refused (add a registries entry whose prefix covers it)`);
        }
        entry.snapshotRepository = repo as string;
      }
      if (nv['snapshotWeightsLayers'] !== undefined) {
        if (typeof nv['snapshotWeightsLayers'] !== 'boolean') fail(`${at}.snapshotWeightsLayers`, 'must be a boolean');
        if (nv['snapshotWeightsLayers'] === true && entry.snapshotRepository === undefined) fail(`${at}.snapshotWeightsLayers`, 'needs snapshotRepository (the pushes it is about)');
        entry.snapshotWeightsLayers = nv['snapshotWeightsLayers'] as boolean;
      }
      if (nv['signingKey'] !== undefined) {
        const file = nv['signingKey'];
        if (typeof file !== 'string' || !isAbsolute(file)) fail(`${at}.signingKey`, 'must be the absolute path of a PEM private key');
        if (entry.snapshotRepository === undefined) fail(`${at}.signingKey`, 'signs what the agent pushes to snapshotRepository, which is not set');
        entry.signingKey = file as string;
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
 * Reads every namespace's signing key (loadSigningKey: owner, mode, key kind), once at agent start, and checks
 * that the grant covering its snapshotRepository trusts it: a node whose pushes every node with the same policy
 * would refuse is a configuration error, not a stream of cold starts. `trusted`: loadTrustedKeys' result.
 * Returns the keys by namespace; throws an Error (OCI_SIGNING_KEY_INVALID, or one naming the field).
 */
export async function loadSigningKeys(policy: TenancyPolicy, trusted: ReadonlyMap<string, TrustedKey>): Promise<Map<string, SigningKey>> {
  const out = new Map<string, SigningKey>();
  for (const [ns, n] of policy.namespaces) {
    if (n.signingKey === undefined || n.snapshotRepository === undefined) continue;
    const key = await loadSigningKey(n.signingKey);
    const slash = n.snapshotRepository.indexOf('/');
    const grant = registryGrantFor(policy, ns, { registry: n.snapshotRepository.slice(0, slash), repository: n.snapshotRepository.slice(slash + 1) });
    if (grant !== undefined && !grant.allowUnsigned && !grant.keyFiles.some((f) => trusted.get(f)?.key.equals(key.publicKey) === true)) {
      throw new Error(`tenancy.namespaces.${ns}.signingKey: ${n.signingKey}'s public key is none of the keys of the registries entry ${grant.prefix} (${grant.keyFiles.join(', ')}): the checkpoints it signs would be refused by every node with this policy`);
    }
    out.set(ns, key);
  }
  return out;
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
