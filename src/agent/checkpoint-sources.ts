/**
 * Where a restore target's checkpoint comes from, in this order:
 *
 *   a local name     (`thaw.dev/restore: qwen`)   the local store; else the shared store (an RWX volume mounted
 *                                                 on every node), copied into the local store
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
import type { LocalStore, OpenedCheckpoint } from '../store/index.js';
import { RegistryClient } from '../store/index.js';
import { fetchResolved, localNameFor, resolveRemote, type FetchOptions, type RegistryAccess } from '../store/index.js';
import { formatReference } from '../store/index.js';

export const DEFAULT_RESOLVE_TIMEOUT_MS = 1_000;

export interface RegistrySourceOptions {
  /** How to reach each registry host (`host:port` → credentials, CA, plainHttp). Others: https, anonymous. */
  access?: Record<string, RegistryAccess>;
  /** Manifest + config fetch at NRI time; past it the pod cold-starts (default DEFAULT_RESOLVE_TIMEOUT_MS). */
  resolveTimeoutMs?: number;
  /** Transfer tuning of the background pull. */
  pull?: Pick<FetchOptions, 'concurrency' | 'rangeBytes' | 'retries' | 'cache'>;
}

export interface CheckpointSourcesOptions {
  local: LocalStore;
  /** A second store root read like the local one (an RWX volume); absent: none. */
  shared?: LocalStore;
  /** Pull on demand from registries; absent: a reference cold-starts. */
  registry?: RegistrySourceOptions;
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

export interface CheckpointSources {
  /**
   * Finds a checkpoint by annotation value (and its parsed reference, when it is one). Throws the store's or
   * the registry's typed error (STORE_NOT_FOUND, OCI_*) when it is nowhere or cannot be resolved in time.
   */
  find(value: string, reference: CheckpointReference | undefined, options?: { signal?: AbortSignal }): Promise<FoundCheckpoint>;
  /** Aborts transfers in flight and closes registry connections. */
  close(): Promise<void>;
}

export function createCheckpointSources(o: CheckpointSourcesOptions): CheckpointSources {
  const clients = new Map<string, RegistryClient>();
  const inFlight = new Map<string, Promise<OpenedCheckpoint>>();
  const stop = new AbortController();
  // Every transfer of every pull listens on it (one listener per request in flight): not a leak.
  setMaxListeners(0, stop.signal);
  const logger = o.logger.child({ component: 'checkpoint-sources' });

  const clientFor = (registry: string): RegistryClient => {
    let client = clients.get(registry);
    if (client === undefined) {
      client = new RegistryClient({ ...(o.registry?.access?.[registry] ?? {}), registry, logger });
      clients.set(registry, client);
    }
    return client;
  };

  /** One transfer per local name; a second restore of the same checkpoint waits on the first. */
  const once = (name: string, start: () => Promise<OpenedCheckpoint>): Promise<OpenedCheckpoint> => {
    let p = inFlight.get(name);
    if (p === undefined) {
      p = start();
      inFlight.set(name, p);
      void p.finally(() => inFlight.delete(name)).catch(() => undefined);
    }
    return p;
  };

  const openLocal = (name: string): Promise<OpenedCheckpoint | undefined> =>
    o.local.open(name).catch((err: unknown) => {
      if (isThawError(err, StoreErrorCode.NOT_FOUND)) return undefined;
      throw err;
    });

  return {
    async find(value, reference, options = {}) {
      if (reference === undefined) {
        const local = await openLocal(value);
        if (local !== undefined) return { kind: 'local', checkpoint: local };
        const shared = o.shared;
        if (shared === undefined) {
          throw new StoreError(StoreErrorCode.NOT_FOUND, `no checkpoint named ${value} in ${o.local.root} (and no shared store is configured)`, { step: 'find checkpoint', evidence: { name: value } });
        }
        const there = await shared.open(value); // STORE_NOT_FOUND when it is nowhere
        const ready = once(value, () => copyCheckpoint(shared, o.local, value, { signal: stop.signal }));
        ready.catch(() => undefined);
        logger.info('checkpoint found in the shared store; copying it', { name: value, shared: shared.root });
        return { kind: 'incoming', checkpoint: { ...there, paths: o.local.pathsOf(value) }, from: 'shared', source: shared.root, ready };
      }
      if (reference.digest !== undefined) {
        const local = await openLocal(localNameFor(reference.digest));
        if (local !== undefined) return { kind: 'local', checkpoint: local };
      }
      if (o.registry === undefined) {
        throw new StoreError(StoreErrorCode.NOT_FOUND, `${formatReference(reference)} is not in the local store and no registry access is configured`, { step: 'find checkpoint', evidence: { reference: formatReference(reference) } });
      }
      const client = clientFor(reference.registry);
      const timeout = AbortSignal.timeout(o.registry.resolveTimeoutMs ?? DEFAULT_RESOLVE_TIMEOUT_MS);
      const signal = options.signal ? AbortSignal.any([options.signal, timeout, stop.signal]) : AbortSignal.any([timeout, stop.signal]);
      const resolved = await resolveRemote(client, reference, { signal });
      const local = await openLocal(resolved.name);
      if (local !== undefined) return { kind: 'local', checkpoint: local };
      const pull = o.registry.pull ?? {};
      const ready = once(resolved.name, async () => (await fetchResolved(client, resolved, { ...pull, store: o.local, signal: stop.signal, logger })).checkpoint);
      ready.catch(() => undefined);
      logger.info('pulling checkpoint', { reference: formatReference(reference), digest: resolved.digest, name: resolved.name, bytes: resolved.manifest.totals.bytes });
      return {
        kind: 'incoming',
        checkpoint: { name: resolved.name, manifest: { ...resolved.manifest, name: resolved.name }, paths: o.local.pathsOf(resolved.name) },
        from: 'registry',
        source: formatReference(reference),
        ready,
      };
    },

    async close() {
      stop.abort(new Error('agent stopping'));
      await Promise.allSettled([...inFlight.values()]);
      for (const c of clients.values()) c.close();
      clients.clear();
    },
  };
}
