/**
 * The agent's side of the restore flow (the flow itself: restore-engine/restore-flow.ts). Never inside an NRI
 * handler: the handlers call `restoreTargetCreated` and `restoreTargetStarted`, which start background work
 * and return at once. The coordinator holds the jobs (which target is prepared or restoring), the checkpoint
 * prefetches shared by the pods and targets that want them, and the leases; the flow does the steps.
 */
import { rm } from 'node:fs/promises';
import { errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import { readHookOutcome, writeCheckpointUnavailable } from '../oci-hooks/index.js';
import type { CriuClient } from '../restore-engine/index.js';
import {
  createRestoreFlow,
  CriuImageCodec,
  criuPageReads,
  undoJournalFor,
  type CudaRestoreStep,
  type PreparedRestore,
  type RestoreEvent,
  type RestoreFlowOptions,
  type RestoreJob,
  type RestoreStepContext,
  type RestoreWeightsService,
} from '../restore-engine/index.js';
import type { LocalStore, OpenedCheckpoint } from '../store/index.js';
import type { ManagedContainer, ThawCoordinator } from './managed-container.js';
import type { ThawNriStats } from './nri-stats.js';
import { PrefetchGate, SharedPrefetch } from './shared-prefetch.js';
import { DEFAULT_RESTORE_WORK_ROOT } from '../defaults.js';

export interface RestoreCoordinatorOptions {
  store: LocalStore;
  criu: CriuClient;
  logger: Logger;
  stats?: ThawNriStats;
  /** Per-container CRIU work directories (restore.log) go to `<workRoot>/<container id>`. */
  workRoot?: string;
  /** The toolkit's bin directory (mounted at the same path in the target): its busybox does the umount there. */
  toolkitBinDir: string;
  /** Host path of thaw-pause (restore-flow's thawPausePath). */
  thawPausePath: string;
  nsenterPath?: string;
  /** Reads the files a restore runs (restore-tools.ts) into the page cache; run before each checkpoint prefetch. */
  warmTools?: (signal: AbortSignal) => Promise<unknown>;
  verifyTimeoutMs?: number;
  criuRestoreTimeoutMs?: number;
  /** thaw-pause's deadline (restore-flow's thawPauseDeadlineMs). */
  thawPauseDeadlineMs?: number;
  cudaRestore?: CudaRestoreStep;
  /** restore-flow's memoryFill (thaw-fill, its threads and time limit). */
  memoryFill?: RestoreFlowOptions['memoryFill'];
  /** The weights service (docs/weights.md); absent: checkpoints with weights outside them cold-start. */
  weights?: RestoreWeightsService;
  /** Test seam: runs after verify, right before CRIU (e.g. to damage an image file CRIU then reads). */
  beforeCriuRestore?: (ctx: RestoreStepContext) => Promise<void>;
  /** Every restore event, after it was logged. */
  onEvent?: (event: RestoreEvent) => void;
}

export interface RestoreCoordinator extends Required<Pick<ThawCoordinator, 'restorePodCreated' | 'podGone' | 'restoreTargetCreated' | 'restoreTargetStarted' | 'containerGone'>> {
  /**
   * A restore target found running when the agent (re)connected (NRI Synchronize). If no restore of this
   * process is in flight and the worker was told neither restore-complete nor restore-failed, the agent that
   * was restoring it died: fall back (cold start), so that no pod stays in its placeholder.
   */
  recoverTarget(container: ManagedContainer, pid: number): Promise<void>;
  /** Resolves when every restore started so far has ended (tests, shutdown). */
  idle(): Promise<void>;
  /** Restores this process holds: prepared (created, not started yet) or restoring. */
  inFlight(): RestoreInFlight[];
  /** Aborts everything in flight (each target falls back). */
  close(): Promise<void>;
}

export interface RestoreInFlight {
  containerId: string;
  pod: string;
  checkpoint: string;
  phase: 'prepared' | 'restoring';
  /** ISO 8601: when thaw adjusted the container. */
  since: string;
}

interface Job extends RestoreJob {
  container: ManagedContainer;
  createdAtIso: string;
  createdAt: number;
  run?: Promise<void>;
}

export function createRestoreCoordinator(o: RestoreCoordinatorOptions): RestoreCoordinator {
  const jobs = new Map<string, Job>();
  const workRoot = o.workRoot ?? DEFAULT_RESTORE_WORK_ROOT;
  /** Set by close(): a target created after it is not restored here. */
  let closed = false;
  /** Leases of targets created while the agent was stopping (released at once; close() waits for them). */
  const lateReleases: Promise<unknown>[] = [];
  const running = new Set<Promise<void>>();
  const logger = o.logger.child({ component: 'restore' });
  // Held while a restore reads its worker's file pages: those small reads would otherwise queue behind the
  // prefetch's megabytes, and CRIU waits for them.
  const prefetchGate = new PrefetchGate();
  const prefetches = new SharedPrefetch(
    async (name, signal) => {
      // The restore's own tools first: behind the checkpoint's reads, each of their page faults would wait.
      await o.warmTools?.(signal).catch((err: unknown) => logger.debug('reading the restore tools failed', { error: errorMessage(err) }));
      // With thaw-fill, CRIU itself reads only the pages that cannot be lazy, one preadv after another: those first.
      const first = o.memoryFill !== undefined ? { first: (c: OpenedCheckpoint) => criuPageReads(c.paths.criuDir, CriuImageCodec.shared()) } : {};
      return o.store.prefetch(name, { signal, gate: () => prefetchGate.wait(), ...first });
    },
    (name, err) => logger.debug('prefetch stopped', { checkpoint: name, error: errorMessage(err) }),
  );
  const jobHolder = (containerId: string): string => `container:${containerId}`;
  const podHolder = (podId: string): string => `pod:${podId}`;

  const flow = createRestoreFlow({
    store: o.store,
    hookRecords: { readHookOutcome, writeCheckpointUnavailable },
    prefetch: {
      hold: (job) => prefetches.hold(job.checkpoint.name, jobHolder(job.container.containerId)),
      holdGate: () => prefetchGate.hold(),
    },
    criu: o.criu,
    logger,
    ...(o.stats ? { fallbacks: o.stats } : {}),
    workRoot,
    toolkitBinDir: o.toolkitBinDir,
    thawPausePath: o.thawPausePath,
    ...(o.nsenterPath !== undefined ? { nsenterPath: o.nsenterPath } : {}),
    ...(o.verifyTimeoutMs !== undefined ? { verifyTimeoutMs: o.verifyTimeoutMs } : {}),
    ...(o.criuRestoreTimeoutMs !== undefined ? { criuRestoreTimeoutMs: o.criuRestoreTimeoutMs } : {}),
    ...(o.thawPauseDeadlineMs !== undefined ? { thawPauseDeadlineMs: o.thawPauseDeadlineMs } : {}),
    ...(o.cudaRestore ? { cudaRestore: o.cudaRestore } : {}),
    ...(o.memoryFill ? { memoryFill: o.memoryFill } : {}),
    ...(o.weights ? { weights: o.weights } : {}),
    ...(o.beforeCriuRestore ? { beforeCriuRestore: o.beforeCriuRestore } : {}),
    ...(o.onEvent ? { onEvent: o.onEvent } : {}),
  });

  const track = (p: Promise<void>): Promise<void> => {
    running.add(p);
    void p.finally(() => running.delete(p));
    return p;
  };

  async function runRestore(job: Job, pid: number): Promise<void> {
    try {
      await flow.run(job, pid);
    } finally {
      // Whatever the prefetch had left to read, CRIU has read by now (or the restore is abandoned).
      prefetches.release(jobHolder(job.container.containerId));
      prefetches.release(podHolder(job.container.podId));
      await job.release?.().catch(() => undefined);
      jobs.delete(job.container.containerId);
    }
  }

  const coordinator: RestoreCoordinator = {
    restorePodCreated(podId, checkpointName) {
      void prefetches.hold(checkpointName, podHolder(podId));
    },

    podGone(podId) {
      prefetches.release(podHolder(podId));
    },

    restoreTargetCreated(container, checkpoint, incoming, lease) {
      if (closed) {
        // The handler leased the checkpoint while the agent was stopping (close() ran during its await): nothing
        // will run this target here, so its lease goes now; the next agent falls the target back when it starts.
        if (lease !== undefined) lateReleases.push(lease().catch(() => undefined));
        return;
      }
      const job: Job = {
        createdAtIso: new Date().toISOString(),
        container,
        checkpoint,
        ...(incoming !== undefined ? { incoming } : {}),
        ...(lease !== undefined ? { release: lease } : {}),
        abort: new AbortController(),
        createdAt: performance.now(),
        prepared: Promise.resolve<PreparedRestore>({ verifyMs: 0, hashed: false }),
      };
      job.prepared = flow.prepare(job);
      job.prepared.catch(() => undefined); // awaited in the flow's run; an early failure must not be unhandled
      jobs.set(container.containerId, job);
    },

    restoreTargetStarted(container, pid) {
      const job = jobs.get(container.containerId);
      if (job === undefined) {
        // Created under an earlier agent (learnt back at Synchronize), started under this one: nothing was
        // prepared for it here, so it falls back rather than wait in its placeholder.
        logger.warn('restore target started without a prepared restore (the agent restarted); falling back', { containerId: container.containerId });
        void coordinator.recoverTarget(container, pid).catch((err: unknown) => logger.error('restore: fallback failed', { containerId: container.containerId, error: errorMessage(err) }));
        return;
      }
      if (job.run !== undefined) return;
      job.run = track(runRestore(job, pid));
    },

    async recoverTarget(container, pid) {
      if (jobs.has(container.containerId)) return; // this process is restoring it (containerd reconnected)
      await flow.recover(container, pid);
    },

    containerGone(containerId) {
      // Its rootfs is gone: nothing is left to undo (the poststop hook removes the journal too; this covers a
      // runtime that ran no poststop).
      void rm(undoJournalFor(workRoot, containerId), { force: true }).catch(() => undefined);
      const job = jobs.get(containerId);
      if (job === undefined) return;
      job.abort.abort(new Error('container removed'));
      prefetches.release(jobHolder(containerId));
      if (job.run === undefined) {
        jobs.delete(containerId);
        // prepared may have rejected (a failed pull): its failure was reported where it happened, and an
        // unhandled rejection here would end the agent.
        void job.prepared.catch(() => undefined).finally(() => job.release?.());
      }
    },

    inFlight() {
      return [...jobs.values()].map((j) => ({
        containerId: j.container.containerId,
        pod: `${j.container.podNamespace}/${j.container.podName}`,
        checkpoint: j.checkpoint.name,
        phase: j.run === undefined ? ('prepared' as const) : ('restoring' as const),
        since: j.createdAtIso,
      }));
    },

    async idle() {
      while (running.size > 0) await Promise.allSettled([...running]);
    },

    async close() {
      closed = true;
      for (const job of jobs.values()) job.abort.abort(new Error('agent stopping'));
      await prefetches.close();
      // Targets created but not started: nothing runs for them here; release their leases. The next agent
      // falls them back when they start (restoreTargetStarted without a prepared job).
      const prepared = [...jobs.values()].filter((j) => j.run === undefined);
      await Promise.allSettled(prepared.map((j) => j.prepared.catch(() => undefined).then(() => j.release?.())));
      for (const j of prepared) jobs.delete(j.container.containerId);
      await this.idle();
      await Promise.allSettled(lateReleases);
    },
  };
  return coordinator;
}
