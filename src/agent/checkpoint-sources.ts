/**
 * Where a restore target's checkpoint comes from, in this order:
 *
 *   a local name     (`thaw.dev/restore: qwen`)   the local store under the store key `<pod's namespace>/qwen`
 *                                                 (`team-a/qwen` for a shared one); else the shared store (an RWX
 *                                                 volume mounted on every node), copied into the local store
 *   a reference      (`thaw.dev/restore: registry:5000/team/qwen:v1`)  the local store under the name derived
 *                                                 from the manifest digest (`oci-<hex>`: pulled before); else
 *                                                 pulled from the registry
 *
 * The restore always reads from the local store, with its permissions, leases and verification. At NRI
 * CreateContainer (2 s budget) find() does only what the compatibility check needs: for a reference, the
 * manifest and the config blob within `resolveTimeoutMs`. The transfer itself runs in the background
 * (`ready`), started right there, so that it overlaps containerd's work; concurrent restores of one checkpoint
 * share one transfer.
 */
import { setMaxListeners } from 'node:events';
import { isThawError } from '../errors.js';
import type { CheckpointReference } from '../checkpoint-reference.js';
import type { Logger } from '../log.js';
import { copyCheckpoint } from '../store/index.js';
import { StoreError, StoreErrorCode } from '../store/index.js';
import type { LocalStore, OpenedCheckpoint, StoreLimits } from '../store/index.js';
import { RegistryClient } from '../store/index.js';
import { fetchResolved, localNameFor, resolveRemote, type FetchOptions, type RegistryAccess } from '../store/index.js';
import { formatReference } from '../store/index.js';
import { OciError, OciErrorCode, verifyCosignSignature, type TrustedKey, type VerifiedSignature } from '../store/index.js';
import { RestoreError, RestoreErrorCode } from '../restore-engine/index.js';
import { defaultTenancyPolicy, localRestoreRefusal, registryGrantFor, type TenancyPolicy } from './tenancy.js';

export const DEFAULT_RESOLVE_TIMEOUT_MS = 1_000;
/**
 * The longest a pull (or shared-store copy) may run in all, however steadily bytes arrive: a registry trickling
 * a byte now and then never trips the per-request inactivity timeout, and must not hold a transfer slot forever.
 */
export const DEFAULT_TRANSFER_DEADLINE_MS = 15 * 60_000;
/**
 * Transfers (pulls, shared-store copies) that run at once; more wait their turn. A pull holds up to
 * concurrency x 3 slabs of 4 MiB (96 MiB at the default concurrency of 8) while it runs, so this bounds the
 * agent's transfer memory however many distinct references pods name at once.
 */
export const DEFAULT_MAX_CONCURRENT_TRANSFERS = 2;

export interface RegistrySourceOptions {
  /** How to reach each registry host (`host:port` → credentials, CA, plainHttp). Others: https, anonymous. */
  access?: Record<string, RegistryAccess>;
  /** Manifest + config fetch at NRI time; past it the pod cold-starts (default DEFAULT_RESOLVE_TIMEOUT_MS). */
  resolveTimeoutMs?: number;
  /** Transfer tuning of the background pull. */
  pull?: Pick<FetchOptions, 'concurrency' | 'rangeBytes' | 'retries' | 'cache'>;
  /** Overall deadline of one transfer (default DEFAULT_TRANSFER_DEADLINE_MS). */
  transferDeadlineMs?: number;
  /** Transfers running at once (default DEFAULT_MAX_CONCURRENT_TRANSFERS). */
  maxConcurrentTransfers?: number;
}

export interface CheckpointSourcesOptions {
  local: LocalStore;
  /** A second store root read like the local one (an RWX volume); absent: none. */
  shared?: LocalStore;
  /** Pull on demand from registries; absent: a reference cold-starts. */
  registry?: RegistrySourceOptions;
  /** Who may restore what (agent config `tenancy`); absent: defaultTenancyPolicy(). */
  policy?: TenancyPolicy;
  /** The policy's public keys by file path, read by the agent at start (policyKeyFiles). */
  trustedKeys?: ReadonlyMap<string, TrustedKey>;
  /** The local store's bounds (the agent's storeLimitsOf); absent: the policy's namespace quotas only. */
  limits?: StoreLimits;
  logger: Logger;
}

export type FoundCheckpoint =
  | { kind: 'local'; checkpoint: OpenedCheckpoint }
  | {
      kind: 'incoming';
      /** Its manifest, and the local paths it will have once `ready` resolves. */
      checkpoint: OpenedCheckpoint;
      from: 'shared' | 'registry';
      /** Where from, for logs (the reference, or the shared store's root). */
      source: string;
      ready: Promise<OpenedCheckpoint>;
    };

export interface FindOptions {
  /** The asking pod's Kubernetes namespace: the policy decides on it. */
  namespace: string;
  /** Aborts the lookup (not a transfer it starts). */
  signal?: AbortSignal;
  /**
   * The asking pod's interest in the transfer this find starts or joins: when every finder's `interest` has
   * aborted (their pods are gone), the transfer is cancelled and leaves nothing. A finder without one keeps the
   * transfer wanted until it ends (the CLI, tests).
   */
  interest?: AbortSignal;
}

export interface CheckpointSources {
  /**
   * Finds a checkpoint for a pod of `namespace`: a local one by its store key (`namespace/name`, resolved from the
   * annotation by restoreKeyOf), or a registry one by `reference` (`value` is then the annotation's text).
   * Throws the store's or the registry's typed error (STORE_NOT_FOUND, OCI_*) when it is nowhere or cannot be
   * resolved in time; RESTORE_NOT_ALLOWED when the policy refuses it to that namespace (a checkpoint of another
   * namespace not shared with it, a repository not allow-listed for it); OCI_SIGNATURE_MISSING / _INVALID when
   * the signature the policy requires does not verify. Every refusal comes before any byte enters the store.
   */
  find(value: string, reference: CheckpointReference | undefined, options: FindOptions): Promise<FoundCheckpoint>;
  /** Transfers running now (not those waiting for a turn). */
  transfersRunning(): number;
  /** Aborts transfers in flight and closes registry connections. */
  close(): Promise<void>;
}

export function createCheckpointSources(o: CheckpointSourcesOptions): CheckpointSources {
  const clients = new Map<string, RegistryClient>();
  const inFlight = new Map<string, { promise: Promise<OpenedCheckpoint>; controller: AbortController; wanted: number }>();
  const stop = new AbortController();
  // Every transfer of every pull listens on it (one listener per request in flight): not a leak.
  setMaxListeners(0, stop.signal);
  const logger = o.logger.child({ component: 'checkpoint-sources' });
  const policy = o.policy ?? defaultTenancyPolicy();
  const limits: StoreLimits = o.limits ?? { namespaceQuotaBytes: (ns) => policy.namespaces.get(ns)?.quotaBytes };

  /** A client for a host the access file names; no anonymous access to any other host. */
  const clientFor = (registry: string): RegistryClient => {
    let client = clients.get(registry);
    if (client === undefined) {
      const access = o.registry?.access?.[registry];
      if (access === undefined) {
        throw new OciError(OciErrorCode.NOT_ALLOWED, `registry ${registry} is not named in the registry access file; thaw does not reach hosts it does not name`, { step: 'find checkpoint', evidence: { registry } });
      }
      client = new RegistryClient({ ...access, registry, logger });
      clients.set(registry, client);
    }
    return client;
  };

  /** Throws RESTORE_NOT_ALLOWED unless a pod of `namespace` may restore this local (or shared-store) checkpoint. */
  const checkOwner = (checkpoint: OpenedCheckpoint, namespace: string): void => {
    const refusal = localRestoreRefusal(policy, namespace, { namespace: checkpoint.namespace, name: checkpoint.manifest.name });
    if (refusal !== undefined) {
      throw new RestoreError(RestoreErrorCode.NOT_ALLOWED, refusal, { step: 'find checkpoint', evidence: { name: checkpoint.name, owner: checkpoint.namespace, namespace } });
    }
  };

  /**
   * The policy's grant for `namespace` and this reference (RESTORE_NOT_ALLOWED without one), and the signature
   * of `digest` verified against its keys (unless the grant says allowUnsigned). Runs on every use: a checkpoint
   * pulled for one namespace is not thereby trusted for another whose keys differ.
   */
  const checkReference = async (client: RegistryClient, reference: CheckpointReference, digest: string | undefined, namespace: string, signal: AbortSignal): Promise<VerifiedSignature | 'unsigned-allowed' | undefined> => {
    const grant = registryGrantFor(policy, namespace, reference);
    if (grant === undefined) {
      throw new RestoreError(RestoreErrorCode.NOT_ALLOWED, `repository ${reference.registry}/${reference.repository} is not allow-listed for namespace ${namespace} (tenancy.namespaces.${namespace}.registries)`, {
        step: 'find checkpoint',
        evidence: { reference: formatReference(reference), namespace },
      });
    }
    if (digest === undefined) return undefined;
    if (grant.allowUnsigned) return 'unsigned-allowed';
    const keys = grant.keyFiles.map((f) => o.trustedKeys?.get(f)).filter((k): k is TrustedKey => k !== undefined);
    return verifyCosignSignature(client, { registry: reference.registry, repository: reference.repository, digest }, keys, signal);
  };

  const maxRunning = o.registry?.maxConcurrentTransfers ?? DEFAULT_MAX_CONCURRENT_TRANSFERS;
  let running = 0;
  const waiting: Array<() => void> = [];
  /** Runs `work` when fewer than maxRunning transfers run; a transfer cancelled while waiting never starts. */
  const limited = async <T>(signal: AbortSignal, work: () => Promise<T>): Promise<T> => {
    const aborted = (): OciError => new OciError(OciErrorCode.ABORTED, 'the transfer was cancelled while waiting for its turn', { step: 'wait for a transfer slot', cause: signal.reason });
    while (running >= maxRunning) {
      if (signal.aborted) throw aborted();
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          signal.removeEventListener('abort', wake);
          const i = waiting.indexOf(wake);
          if (i >= 0) waiting.splice(i, 1);
          resolve();
        };
        waiting.push(wake);
        signal.addEventListener('abort', wake, { once: true });
      });
    }
    if (signal.aborted) throw aborted();
    running++;
    try {
      return await work();
    } finally {
      running--;
      waiting[0]?.();
    }
  };

  /**
   * One transfer per local name; a second restore of the same checkpoint waits on the first. The transfer's
   * signal fires when the agent stops, at the overall deadline, or when the last interested pod is gone.
   */
  const once = (name: string, interest: AbortSignal | undefined, start: (signal: AbortSignal) => Promise<OpenedCheckpoint>): Promise<OpenedCheckpoint> => {
    let t = inFlight.get(name);
    if (t === undefined) {
      const controller = new AbortController();
      const deadline = AbortSignal.timeout(o.registry?.transferDeadlineMs ?? DEFAULT_TRANSFER_DEADLINE_MS);
      const signal = AbortSignal.any([controller.signal, stop.signal, deadline]);
      setMaxListeners(0, signal);
      const entry = { promise: limited(signal, () => start(signal)), controller, wanted: 0 };
      t = entry;
      inFlight.set(name, entry);
      void entry.promise.finally(() => inFlight.delete(name)).catch(() => undefined);
    }
    const transfer = t;
    transfer.wanted++;
    if (interest !== undefined) {
      const release = (): void => {
        if (--transfer.wanted === 0 && inFlight.get(name) === transfer) {
          logger.info('no pod wants the checkpoint being transferred any more; cancelling it', { name });
          transfer.controller.abort(new Error('every pod that wanted this checkpoint is gone'));
        }
      };
      if (interest.aborted) release();
      else interest.addEventListener('abort', release, { once: true });
    }
    return transfer.promise;
  };

  const openLocal = (name: string): Promise<OpenedCheckpoint | undefined> =>
    o.local.open(name).catch((err: unknown) => {
      if (isThawError(err, StoreErrorCode.NOT_FOUND)) return undefined;
      throw err;
    });

  /**
   * Throws RESTORE_NO_ROOM unless `bytes` (a manifest's declared total) fits the store's bounds once the least
   * recently used checkpoints no restore uses are collected (src/store/gc.ts): the filesystem's free space (less
   * what it keeps free), the total quota, and the namespace's quota. Runs before anything is written: a manifest
   * declaring 10 TB costs two small requests, a statfs and a listing, and collects nothing.
   */
  const checkRoom = async (bytes: number, namespace: string, what: string): Promise<void> => {
    try {
      await o.local.makeRoom(limits, { namespace, bytes });
    } catch (err) {
      if (!isThawError(err, StoreErrorCode.NO_ROOM)) throw err;
      throw new RestoreError(RestoreErrorCode.NO_ROOM, `${what} declares ${bytes} bytes: ${err.message}`, { step: 'check room for checkpoint', cause: err, evidence: { ...err.evidence, namespace } });
    }
  };

  const registryGrantOrThrow = (reference: CheckpointReference, namespace: string): void => {
    if (registryGrantFor(policy, namespace, reference) === undefined) {
      throw new RestoreError(RestoreErrorCode.NOT_ALLOWED, `repository ${reference.registry}/${reference.repository} is not allow-listed for namespace ${namespace} (tenancy.namespaces.${namespace}.registries)`, {
        step: 'find checkpoint',
        evidence: { reference: formatReference(reference), namespace },
      });
    }
  };

  return {
    async find(value, reference, options) {
      const namespace = options.namespace;
      if (reference === undefined) {
        const local = await openLocal(value);
        if (local !== undefined) {
          checkOwner(local, namespace);
          return { kind: 'local', checkpoint: local };
        }
        const shared = o.shared;
        if (shared === undefined) {
          throw new StoreError(StoreErrorCode.NOT_FOUND, `no checkpoint named ${value} in ${o.local.root} (and no shared store is configured)`, { step: 'find checkpoint', evidence: { name: value } });
        }
        const there = await shared.open(value); // STORE_NOT_FOUND when it is nowhere
        checkOwner(there, namespace); // before the copy: nothing of a refused checkpoint enters the local store
        await checkRoom(there.manifest.totals.bytes, namespace, `shared checkpoint ${value}`);
        const ready = once(value, options.interest, (signal) => copyCheckpoint(shared, o.local, value, { signal }));
        ready.catch(() => undefined);
        logger.info('checkpoint found in the shared store; copying it', { name: value, shared: shared.root });
        return { kind: 'incoming', checkpoint: { ...there, paths: o.local.pathsOf(value) }, from: 'shared', source: shared.root, ready };
      }
      // The policy first: a repository not allow-listed for this namespace is refused without a request.
      registryGrantOrThrow(reference, namespace);
      if (o.registry === undefined) {
        throw new StoreError(StoreErrorCode.NOT_FOUND, `${formatReference(reference)} is not in the local store and no registry access is configured`, { step: 'find checkpoint', evidence: { reference: formatReference(reference) } });
      }
      const client = clientFor(reference.registry);
      const timeout = AbortSignal.timeout(o.registry.resolveTimeoutMs ?? DEFAULT_RESOLVE_TIMEOUT_MS);
      const signal = options.signal ? AbortSignal.any([options.signal, timeout, stop.signal]) : AbortSignal.any([timeout, stop.signal]);
      if (reference.digest !== undefined) {
        const local = await openLocal(localNameFor(reference.digest));
        if (local !== undefined) {
          // Pulled before, maybe for another namespace: its signature is checked again for this one.
          const signature = await checkReference(client, reference, reference.digest, namespace, signal);
          logger.info('registry checkpoint found in the local store', { reference: formatReference(reference), namespace, signature: describeSignature(signature) });
          return { kind: 'local', checkpoint: local };
        }
      }
      const resolved = await resolveRemote(client, reference, { signal });
      const signature = await checkReference(client, reference, resolved.digest, namespace, signal);
      const local = await openLocal(resolved.name);
      if (local !== undefined) return { kind: 'local', checkpoint: local };
      // Weights layers land in the node's weights cache, on the store's filesystem: they need room too.
      await checkRoom(resolved.manifest.totals.bytes + resolved.weights.reduce((a, w) => a + w.size, 0), namespace, formatReference(reference));
      const pull = o.registry.pull ?? {};
      const ready = once(resolved.name, options.interest, async (signal) => (await fetchResolved(client, resolved, { ...pull, store: o.local, signal, logger })).checkpoint);
      ready.catch(() => undefined);
      logger.info('pulling checkpoint', { reference: formatReference(reference), namespace, digest: resolved.digest, name: resolved.name, bytes: resolved.manifest.totals.bytes, signature: describeSignature(signature) });
      return {
        kind: 'incoming',
        checkpoint: { name: resolved.name, manifest: { ...resolved.manifest, name: resolved.name }, paths: o.local.pathsOf(resolved.name) },
        from: 'registry',
        source: formatReference(reference),
        ready,
      };
    },

    transfersRunning: () => running,

    async close() {
      stop.abort(new Error('agent stopping'));
      await Promise.allSettled([...inFlight.values()].map((t) => t.promise));
      for (const c of clients.values()) c.close();
      clients.clear();
    },
  };
}

function describeSignature(s: VerifiedSignature | 'unsigned-allowed' | undefined): string {
  if (s === undefined) return 'none';
  if (s === 'unsigned-allowed') return 'not required (allowUnsigned)';
  return `verified with ${s.key}`;
}
