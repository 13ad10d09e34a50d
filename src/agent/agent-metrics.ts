/**
 * The agent's Prometheus series (docs/operations.md "Running the agent" lists them). Event-driven counters and histograms
 * move when a restore or checkpoint event is logged; the rest is read from the engine and the store at scrape.
 */
import type { CheckpointEvent } from './checkpoint-coordinator.js';
import { MetricsRegistry } from './metrics.js';
import type { RestoreEvent } from '../restore-engine/index.js';
import type { ThawNriStats } from './nri-stats.js';
import type { SnapshotPodCount } from './snapshot.js';

/** Seconds: restores take from ~50 ms (small, cached) to minutes (large, cold); checkpoints up to the flow's timeout. */
export const PHASE_BUCKETS_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800];

const RESTORE_PHASES: Record<Exclude<keyof RestoreEvent['phases'], 'at'>, string> = {
  hookMs: 'hook',
  hookStartupMs: 'hook-startup',
  transferMs: 'transfer',
  verifyMs: 'verify',
  waitVerifyMs: 'wait-verify',
  overlayMs: 'overlay',
  criuRestoreMs: 'criu-restore',
  criuChecksMs: 'criu-checks',
  adoptMs: 'adopt',
  cudaRestoreMs: 'cuda-restore',
  weightsWaitMs: 'weights-wait',
  weightsHandoverMs: 'weights-handover',
  memoryFillWaitMs: 'memory-fill-wait',
  totalMs: 'total',
};
const CHECKPOINT_PHASES: Record<string, string> = {
  inspectMs: 'inspect',
  cudaMs: 'cuda',
  dumpMs: 'dump',
  rootfsDiffMs: 'rootfs-diff',
  publishMs: 'publish',
  totalMs: 'total',
};

export interface AgentMetricsSources {
  stats: ThawNriStats;
  /**
   * Checkpoints in the store and their bytes (read at scrape), in all and per owning namespace (pulled
   * checkpoints under PULLED_NAMESPACE_LABEL), and the `thaw.dev/snapshot` ones by namespace and name.
   */
  stored(): Promise<{ count: number; bytes: number; byNamespace?: ReadonlyMap<string, { count: number; bytes: number }>; snapshots?: ReadonlyArray<{ namespace: string; snapshot: string; count: number }> }>;
  /** How `thaw.dev/snapshot` pods started (snapshot.ts SnapshotTracker.rows); absent: none counted. */
  snapshotPods?(): SnapshotPodCount[];
  restoresInFlight(): number;
  checkpointsInFlight(): number;
  version: string;
  /** What the store's collection removed since start (engine.gcTotals); absent: no GC series move. */
  gc?: () => { runs: number; checkpoints: ReadonlyMap<string, number>; bytes: ReadonlyMap<string, number>; cacheFiles: number; cacheBytes: number };
}

/** The `namespace` label of pulled checkpoints (owned by none; a Kubernetes namespace never begins with '.'). */
export const PULLED_NAMESPACE_LABEL = '.oci';

export interface AgentMetrics {
  registry: MetricsRegistry;
  onRestoreEvent(e: RestoreEvent): void;
  onCheckpointEvent(e: CheckpointEvent): void;
}

export function createAgentMetrics(src: AgentMetricsSources): AgentMetrics {
  const r = new MetricsRegistry();
  const restores = r.counter('thaw_restores_total', 'Restore targets by outcome: restored, or fallback (cold start; at CreateContainer or after a failed restore).', ['outcome']);
  const restorePhases = r.histogram('thaw_restore_phase_seconds', 'Duration of each phase of a restore (total: from the container start to restore-complete or the fallback).', PHASE_BUCKETS_SECONDS, ['phase']);
  const bytesRead = r.counter('thaw_restore_bytes_read_total', 'Bytes of checkpoint files restored (the checkpoint size of every successful restore).');
  const memoryFills = r.counter('thaw_restore_memory_fills_total', 'Successful restores by who placed the restored memory: thaw-fill (through userfaultfd, in parallel) or criu (its restorer: thaw-fill off, not built, no lazy pages here, or a checkpoint without a plan; the restore event says why).', ['by']);
  const memoryFilledBytes = r.counter('thaw_restore_memory_filled_bytes_total', 'Bytes thaw-fill placed in restored processes: copied from the images, and zero pages the checkpoint dropped.', ['kind']);
  const checkpoints = r.counter('thaw_checkpoints_total', 'Checkpoints by outcome: succeeded, failed, cancelled.', ['outcome']);
  const checkpointPhases = r.histogram('thaw_checkpoint_phase_seconds', 'Duration of each phase of a successful checkpoint.', PHASE_BUCKETS_SECONDS, ['phase']);
  const bytesWritten = r.counter('thaw_checkpoint_bytes_written_total', 'Bytes of checkpoint files published.');
  const fallbacks = r.counter('thaw_fallbacks_total', 'Cold starts and unmanaged containers that thaw caused to fall back, by cause (the RESTORE_* codes and the AGENT_* handler causes of docs/errors.md).', ['cause']);
  const stored = r.gauge('thaw_checkpoints_stored', 'Checkpoints in the local store.');
  const storedBytes = r.gauge('thaw_checkpoints_stored_bytes', 'Total bytes of the checkpoints in the local store (manifest totals).');
  const restoresInFlight = r.gauge('thaw_restores_in_flight', 'Restore targets this agent holds (prepared or restoring).');
  const checkpointsInFlight = r.gauge('thaw_checkpoints_in_flight', 'Checkpoints running or waiting for their worker.');
  const byNamespace = r.counter('thaw_restores_by_namespace_total', 'Restore events (restored, or fallback after the container was adjusted) by the target pod\'s namespace.', ['namespace', 'outcome']);
  const refusals = r.counter('thaw_tenancy_refusals_total', 'Restore targets the tenancy policy sent to a cold start, by the pod\'s namespace and cause (RESTORE_NOT_ALLOWED, RESTORE_SIGNATURE, RESTORE_NO_ROOM).', ['namespace', 'cause']);
  const snapshotPods = r.counter('thaw_snapshot_pods_total', 'thaw.dev/snapshot pods by how they started: restored, cold (cause: why; AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS when another pod takes the checkpoint), checkpointed (cold-started and checkpointed), by namespace and snapshot name.', ['namespace', 'snapshot', 'outcome', 'cause']);
  const snapshotStored = r.gauge('thaw_snapshot_checkpoints_stored', 'thaw.dev/snapshot checkpoints in the local store (one per key: image digest, args, GPU), by namespace and snapshot name.', ['namespace', 'snapshot']);
  const storeBytes = r.gauge('thaw_store_bytes', `Bytes of the checkpoints in the local store by owning namespace (manifest totals; pulled checkpoints: namespace="${PULLED_NAMESPACE_LABEL}").`, ['namespace']);
  const storeCheckpoints = r.gauge('thaw_store_checkpoints', `Checkpoints in the local store by owning namespace (pulled: namespace="${PULLED_NAMESPACE_LABEL}").`, ['namespace']);
  const checkpointsByNamespace = r.counter('thaw_checkpoints_by_namespace_total', 'Checkpoints by the namespace that owns them and outcome.', ['namespace', 'outcome']);
  const gcRuns = r.counter('thaw_gc_runs_total', 'Collections of the local store that deleted (thaw gc, room made for a checkpoint or pull, after a checkpoint).');
  const gcCollected = r.counter('thaw_gc_collected_total', 'Checkpoints the store\'s collection deleted (least recently used, none in use), by owning namespace.', ['namespace']);
  const gcCollectedBytes = r.counter('thaw_gc_collected_bytes_total', 'Declared bytes of the checkpoints the store\'s collection deleted, by owning namespace.', ['namespace']);
  const gcCacheFiles = r.counter('thaw_gc_cache_files_collected_total', 'File cache entries the store\'s collection deleted (no checkpoint linked them).');
  const gcCacheBytes = r.counter('thaw_gc_cache_bytes_collected_total', 'Bytes of the file cache entries the store\'s collection deleted.');
  const info = r.gauge('thaw_agent_info', 'Always 1; the agent version as a label.', ['version']);

  for (const outcome of ['restored', 'fallback']) restores.touch({ outcome });
  for (const outcome of ['succeeded', 'failed', 'cancelled']) checkpoints.touch({ outcome });
  bytesRead.touch();
  gcRuns.touch();
  gcCacheFiles.touch();
  gcCacheBytes.touch();
  bytesWritten.touch();
  info.set(1, { version: src.version });
  // Restore events counted here; fallbacks decided at CreateContainer have no event and are added at scrape.
  const restoreEvents = { restored: 0, fallback: 0 };
  const seenNamespaces = new Set<string>();

  r.onCollect(async () => {
    const atCreate = [...src.stats.restoreFallbacksAtCreate.values()].reduce((a, b) => a + b, 0);
    restores.setTotal(restoreEvents.restored, { outcome: 'restored' });
    restores.setTotal(restoreEvents.fallback + atCreate, { outcome: 'fallback' });
    for (const [cause, n] of src.stats.fallbacksByCause) fallbacks.setTotal(n, { cause });
    for (const [key, n] of src.stats.tenancyRefusals) {
      const [namespace = '', cause = ''] = key.split(' ');
      refusals.setTotal(n, { namespace, cause });
    }
    const gc = src.gc?.();
    if (gc !== undefined) {
      gcRuns.setTotal(gc.runs);
      for (const [namespace, n] of gc.checkpoints) gcCollected.setTotal(n, { namespace });
      for (const [namespace, n] of gc.bytes) gcCollectedBytes.setTotal(n, { namespace });
      gcCacheFiles.setTotal(gc.cacheFiles);
      gcCacheBytes.setTotal(gc.cacheBytes);
    }
    restoresInFlight.set(src.restoresInFlight());
    checkpointsInFlight.set(src.checkpointsInFlight());
    for (const row of src.snapshotPods?.() ?? []) snapshotPods.setTotal(row.count, { namespace: row.namespace, snapshot: row.snapshot, outcome: row.outcome, cause: row.cause });
    const s = await src.stored();
    stored.set(s.count);
    storedBytes.set(s.bytes);
    snapshotStored.reset(); // a snapshot whose checkpoints were all deleted leaves no series behind
    for (const row of s.snapshots ?? []) snapshotStored.set(row.count, { namespace: row.namespace, snapshot: row.snapshot });
    // A namespace whose last checkpoint went reads 0 rather than its last value.
    for (const namespace of seenNamespaces) {
      storeBytes.set(0, { namespace });
      storeCheckpoints.set(0, { namespace });
    }
    for (const [namespace, v] of s.byNamespace ?? []) {
      seenNamespaces.add(namespace);
      storeBytes.set(v.bytes, { namespace });
      storeCheckpoints.set(v.count, { namespace });
    }
  });

  return {
    registry: r,
    onRestoreEvent(e) {
      restoreEvents[e.outcome]++;
      byNamespace.inc({ namespace: e.pod.split('/')[0] ?? '', outcome: e.outcome });
      for (const [key, phase] of Object.entries(RESTORE_PHASES)) {
        const ms = e.phases[key as Exclude<keyof RestoreEvent['phases'], 'at'>];
        if (ms !== undefined) restorePhases.observe(ms / 1000, { phase });
      }
      if (e.outcome === 'restored' && e.bytes !== undefined) bytesRead.inc({}, e.bytes);
      if (e.outcome === 'restored') {
        const fill = e.memoryFill;
        memoryFills.inc({ by: fill?.by ?? 'criu' });
        if (fill?.by === 'thaw-fill') {
          memoryFilledBytes.inc({ kind: 'copied' }, fill.copiedBytes);
          memoryFilledBytes.inc({ kind: 'zero' }, fill.zeroedBytes);
        }
      }
    },
    onCheckpointEvent(e) {
      checkpoints.inc({ outcome: e.outcome });
      checkpointsByNamespace.inc({ namespace: e.namespace, outcome: e.outcome });
      if (e.outcome !== 'succeeded') return;
      for (const [key, phase] of Object.entries(CHECKPOINT_PHASES)) {
        const ms = (e.phases as Record<string, number | undefined> | undefined)?.[key];
        if (ms !== undefined) checkpointPhases.observe(ms / 1000, { phase });
      }
      if (e.bytes !== undefined) bytesWritten.inc({}, e.bytes);
    },
  };
}
