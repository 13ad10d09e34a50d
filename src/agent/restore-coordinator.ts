/**
 * The restore flow after NRI (design.md, Restore steps 3-4): what runs for a restore target between its
 * CreateContainer and the pod serving. Never inside an NRI handler: the handlers call `restoreTargetCreated`
 * and `restoreTargetStarted`, which start background work and return at once.
 *
 *   created   lease the checkpoint, verify every file's sha256 and read it into the page cache
 *   started   (the container's PID 1 is thaw-pause) wait for verify; read what the create-runtime hook
 *             recorded; in overlay mode unmount thaw-pause from the entrypoint inside the container;
 *             CRIU restore inside the container's namespaces and cgroups; [CUDA restore seam]; SIGUSR1
 *             (thaw-pause adopts the worker); restore-complete
 *   any error kill what the restore left; make sure the overlay is gone; restore-failed; SIGUSR2 (thaw-pause
 *             execs the original command: a cold start). One `restore` event per target, either way.
 */
import { execFile } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { errorMessage, isThawError } from '../errors.js';
import type { Logger } from '../log.js';
import { readHookOutcome, writeCheckpointUnavailable, type HookOutcome } from '../oci-hooks/records.js';
import type { CriuClient } from '../restore-engine/criu/client.js';
import { RestoreError, RestoreErrorCode } from '../restore-engine/restore-errors.js';
import { killRestoredTree, restoreIntoContainer, type RestoredTree } from '../restore-engine/restore.js';
import { CriuImageCodec } from '../restore-engine/criu/images.js';
import { mappedFilePages, readMappedFilePages, type MappedFile, type ReadMappedResult } from '../restore-engine/mapped-files.js';
import { clearStaleMarkers, writeMarker } from '../sdk/control-dir.js';
import { firstPresent } from '../sdk/marker-files.js';
import { RESTORE_COMPLETE, RESTORE_FAILED } from '../sdk/protocol.js';
import type { LocalStore, OpenedCheckpoint, ReleaseLease } from '../store/local-store.js';
import { StoreErrorCode } from '../store/errors.js';
import { PrefetchGate, SharedPrefetch } from './shared-prefetch.js';
import type { ManagedContainer, ThawCoordinator, ThawNriStats } from './thaw-nri.js';

const execFileP = promisify(execFile);

/** sha256 of a multi-GiB checkpoint on a busy node; past this the pod cold-starts rather than wait. */
export const DEFAULT_VERIFY_TIMEOUT_MS = 300_000;
export const DEFAULT_CRIU_RESTORE_TIMEOUT_MS = 120_000;
/** One umount inside the container. */
export const OVERLAY_UMOUNT_TIMEOUT_MS = 5_000;
export const DEFAULT_WORK_ROOT = '/run/thaw/restore';

/** Context handed to the seams. */
export interface RestoreStepContext {
  container: ManagedContainer;
  checkpoint: OpenedCheckpoint;
  targetPid: number;
  signal: AbortSignal;
}

/** The CUDA restore step (cuda-checkpoint restore + unlock of every CUDA process of the tree) slots in here. */
export type CudaRestoreStep = (tree: RestoredTree, ctx: RestoreStepContext) => Promise<void>;

export interface RestoreEvent {
  event: 'restore';
  outcome: 'restored' | 'fallback';
  /** The RESTORE_* code of the fallback (absent when restored). */
  cause?: string;
  reason?: string;
  checkpoint: string;
  /** The checkpoint's manifest id, when it was opened. */
  id?: string;
  containerId: string;
  /** The container's name in its pod. */
  container: string;
  pod: string;
  mode?: 'args' | 'overlay';
  restoredPid?: number;
  /** Bytes of the checkpoint's files (what the restore read), when restored. */
  bytes?: number;
  /** How the checkpoint's digests were checked: hashed now, or its files unchanged since they were hashed here. */
  digests?: 'hashed' | 'unchanged-since-hashed';
  /** The modified pages of the worker's private file mappings, read ahead beside CRIU (restore-engine/mapped-files.ts). */
  mappedFiles?: ReadMappedResult;
  phases: { hookMs?: number; hookStartupMs?: number; transferMs?: number; verifyMs?: number; waitVerifyMs?: number; overlayMs?: number; criuRestoreMs?: number; cudaRestoreMs?: number; totalMs: number };
}

/** After CRIU, how long the stopped reads of the worker's file pages get to report (one read in flight each). */
export const MAPPED_READ_SETTLE_MS = 100;

export interface RestoreCoordinatorOptions {
  store: LocalStore;
  criu: CriuClient;
  logger: Logger;
  stats?: ThawNriStats;
  /** Per-container CRIU work directories (restore.log) go to `<workRoot>/<container id>`. */
  workRoot?: string;
  /** The toolkit's bin directory (mounted at the same path in the target): its busybox does the umount there. */
  toolkitBinDir: string;
  nsenterPath?: string;
  /** Reads the files a restore runs (restore-tools.ts) into the page cache; run before each checkpoint prefetch. */
  warmTools?: (signal: AbortSignal) => Promise<unknown>;
  verifyTimeoutMs?: number;
  criuRestoreTimeoutMs?: number;
  cudaRestore?: CudaRestoreStep;
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

interface Job {
  createdAtIso: string;
  container: ManagedContainer;
  checkpoint: OpenedCheckpoint;
  /** The checkpoint is still being pulled (or copied from the shared store); prepare() waits for it. */
  incoming?: Promise<OpenedCheckpoint>;
  /** Set when `incoming` failed: the cause of the cold start. */
  pullError?: RestoreError;
  abort: AbortController;
  createdAt: number;
  prepared: Promise<{ verifyMs: number; hashed: boolean; transferMs?: number }>;
  release?: ReleaseLease;
  run?: Promise<void>;
  /** The file pages CRIU will fault in (listed from the images while the container is created). */
  mappedFiles?: Promise<MappedFile[]>;
}

/** The agent marker a worker was given, if any (restore-complete or restore-failed). */
async function firstMarker(controlDir: string): Promise<string | undefined> {
  // lstat, not access(): the directory is the pod's, and a planted symlink is never followed.
  return firstPresent(controlDir, [RESTORE_COMPLETE, RESTORE_FAILED]);
}

export function workDirFor(workRoot: string, containerId: string): string {
  return join(workRoot, containerId);
}

export function createRestoreCoordinator(o: RestoreCoordinatorOptions): RestoreCoordinator {
  const jobs = new Map<string, Job>();
  const running = new Set<Promise<void>>();
  const workRoot = o.workRoot ?? DEFAULT_WORK_ROOT;
  const logger = o.logger.child({ component: 'restore' });
  // Held while a restore reads its worker's file pages: those small reads would otherwise queue behind the
  // prefetch's megabytes, and CRIU waits for them.
  const prefetchGate = new PrefetchGate();
  const prefetches = new SharedPrefetch(
    async (name, signal) => {
      // The restore's own tools first: behind the checkpoint's reads, each of their page faults would wait.
      await o.warmTools?.(signal).catch((err: unknown) => logger.debug('reading the restore tools failed', { error: errorMessage(err) }));
      return o.store.prefetch(name, { signal, gate: () => prefetchGate.wait() });
    },
    (name, err) => logger.debug('prefetch stopped', { checkpoint: name, error: errorMessage(err) }),
  );
  const imageCodec = CriuImageCodec.load();
  const jobHolder = (containerId: string): string => `container:${containerId}`;
  const podHolder = (podId: string): string => `pod:${podId}`;

  const track = (p: Promise<void>): Promise<void> => {
    running.add(p);
    void p.finally(() => running.delete(p));
    return p;
  };

  async function prepare(job: Job): Promise<{ verifyMs: number; hashed: boolean; transferMs?: number }> {
    const name = job.checkpoint.name;
    const signal = job.abort.signal;
    let transferMs: number | undefined;
    if (job.incoming !== undefined) {
      const t = performance.now();
      try {
        await job.incoming;
        transferMs = performance.now() - t;
      } catch (err) {
        const code = isThawError(err) ? err.code : 'INTERNAL';
        job.pullError = new RestoreError(RestoreErrorCode.PULL_FAILED, errorMessage(err), {
          step: 'bring the checkpoint into the local store',
          cause: err,
          evidence: { code, ...(isThawError(err) ? err.evidence : {}) },
        });
        // A create-runtime hook waiting for this checkpoint stops waiting (the container then starts cold).
        await writeCheckpointUnavailable(job.container.controlDir, { code, reason: errorMessage(err) }).catch(() => undefined);
        throw job.pullError;
      }
    }
    try {
      job.release = await o.store.acquireLease(name);
      const t0 = performance.now();
      // Reading the checkpoint into the page cache is a hint, not a step: the restore does not wait for it
      // (CRIU's own reads find whatever it has read already). A 4 GB checkpoint already in the page cache cost
      // ~1.7 s on the critical path when it was awaited (bench:restore). Verification is awaited; it hashes only
      // files changed since they were last hashed on this node (LocalStore.verify). The read may be running
      // already, started at RunPodSandbox.
      prefetches.hold(name, jobHolder(job.container.containerId));
      job.mappedFiles = mappedFilePages(job.checkpoint.paths.criuDir, imageCodec).catch((err: unknown) => {
        logger.debug('cannot list the mapped file pages', { checkpoint: name, error: errorMessage(err) });
        return [];
      });
      const verified = await o.store.verify(name, { signal });
      return { verifyMs: performance.now() - t0, hashed: verified.hashed, ...(transferMs !== undefined ? { transferMs } : {}) };
    } catch (err) {
      if (isThawError(err, StoreErrorCode.NOT_FOUND) || isThawError(err, StoreErrorCode.INVALID_NAME)) {
        throw new RestoreError(RestoreErrorCode.CHECKPOINT_MISSING, errorMessage(err), { step: 'verify checkpoint', cause: err });
      }
      if (isThawError(err, StoreErrorCode.ABORTED)) throw new RestoreError(RestoreErrorCode.ABORTED, errorMessage(err), { step: 'verify checkpoint', cause: err });
      throw new RestoreError(RestoreErrorCode.CHECKPOINT_CORRUPT, errorMessage(err), {
        step: 'verify checkpoint',
        cause: err,
        evidence: { code: isThawError(err) ? err.code : undefined, ...(isThawError(err) ? err.evidence : {}) },
      });
    }
  }

  async function unmountOverlay(pid: number, path: string): Promise<void> {
    try {
      // Lazy: thaw-pause runs from that very file, so a plain umount would be EBUSY.
      await execFileP(o.nsenterPath ?? '/usr/bin/nsenter', ['-t', String(pid), '-m', '--', join(o.toolkitBinDir, 'busybox'), 'umount', '-l', path], {
        timeout: OVERLAY_UMOUNT_TIMEOUT_MS,
        env: {},
      });
    } catch (err) {
      const stderr = (err as { stderr?: string }).stderr ?? '';
      throw new RestoreError(RestoreErrorCode.OVERLAY, `umount ${path} inside the container failed: ${stderr.trim() || errorMessage(err)}`, {
        step: 'remove the thaw-pause overlay',
        cause: err,
        evidence: { pid, path },
      });
    }
  }

  /**
   * Beside CRIU, not before it: the worker's file pages CRIU will fault in, read in parallel through the
   * container's root (where CRIU opens them), the checkpoint prefetch held back meanwhile. stop() when CRIU is
   * done (also if a read hangs: every checkpoint's prefetch waits on the gate); settled() then gives the reads
   * MAPPED_READ_SETTLE_MS to report. A file list still being made is not waited for.
   */
  function startMappedFileReads(job: Job, pid: number): { stop(): void; settled(): Promise<ReadMappedResult | undefined> } {
    const stopReads = new AbortController();
    let releaseGate: (() => void) | undefined;
    let reading: Promise<ReadMappedResult | undefined> | undefined;
    void (job.mappedFiles ?? Promise.resolve([])).then((files) => {
      if (stopReads.signal.aborted) return;
      releaseGate = prefetchGate.hold();
      reading = readMappedFilePages(`/proc/${pid}/root`, files, { signal: stopReads.signal })
        .catch(() => undefined)
        .finally(() => releaseGate?.());
    });
    return {
      stop() {
        stopReads.abort();
        releaseGate?.();
      },
      async settled() {
        return reading === undefined ? undefined : Promise.race([reading, sleep(MAPPED_READ_SETTLE_MS, undefined, { ref: false })]);
      },
    };
  }

  async function runRestore(job: Job, pid: number): Promise<void> {
    const { container, checkpoint } = job;
    const signal = job.abort.signal;
    const started = performance.now();
    const phases: RestoreEvent['phases'] = { totalMs: 0 };
    const workDir = workDirFor(workRoot, container.containerId);
    let hook: HookOutcome = { kind: 'missing' };
    let overlayMounted = false;
    let tree: RestoredTree | undefined;
    let digests: RestoreEvent['digests'];
    const mode = container.placeholder ?? 'overlay';
    const ctx: RestoreStepContext = { container, checkpoint, targetPid: pid, signal };
    const event = (e: Omit<RestoreEvent, 'event' | 'checkpoint' | 'id' | 'containerId' | 'container' | 'pod' | 'phases' | 'mode'>): RestoreEvent => ({
      event: 'restore',
      ...e,
      checkpoint: checkpoint.name,
      id: checkpoint.manifest.id,
      containerId: container.containerId,
      container: container.containerName,
      pod: `${container.podNamespace}/${container.podName}`,
      mode,
      phases: { ...phases, totalMs: Math.round(performance.now() - started) },
    });
    try {
      hook = await readHookOutcome(container.controlDir);
      // The hook gave up because the pull failed: that failure is the cause.
      if (hook.kind !== 'done' && job.pullError !== undefined) throw job.pullError;
      if (hook.kind !== 'done') {
        throw new RestoreError(
          RestoreErrorCode.HOOK_FAILED,
          hook.kind === 'failed' ? `create-runtime hook: ${hook.record.code}: ${hook.record.reason}` : 'the create-runtime hook left no record (did the runtime run it?)',
          { step: 'read the hook record' },
        );
      }
      overlayMounted = hook.record.mode === 'overlay';
      phases.hookMs = hook.record.ms;
      if (typeof hook.record.startupMs === 'number' && Number.isFinite(hook.record.startupMs)) phases.hookStartupMs = hook.record.startupMs;
      const t0 = performance.now();
      const verifyTimeoutMs = o.verifyTimeoutMs ?? DEFAULT_VERIFY_TIMEOUT_MS;
      const timer = new AbortController();
      const { verifyMs, hashed, transferMs } = await Promise.race([
        job.prepared,
        sleep(verifyTimeoutMs, undefined, { signal: timer.signal }).then(() => {
          job.abort.abort(new Error('verify timed out'));
          throw new RestoreError(RestoreErrorCode.TIMEOUT, `verifying the checkpoint took longer than ${verifyTimeoutMs} ms`, { step: 'verify checkpoint' });
        }),
      ]).finally(() => timer.abort());
      phases.verifyMs = Math.round(verifyMs);
      if (transferMs !== undefined) phases.transferMs = Math.round(transferMs);
      phases.waitVerifyMs = Math.round(performance.now() - t0);
      digests = hashed ? 'hashed' : 'unchanged-since-hashed';
      if (signal.aborted) throw new RestoreError(RestoreErrorCode.ABORTED, 'the container went away', { step: 'restore' });

      if (hook.record.mode === 'overlay' && hook.record.overlayPath !== undefined) {
        const t1 = performance.now();
        await unmountOverlay(pid, hook.record.overlayPath);
        overlayMounted = false;
        phases.overlayMs = Math.round(performance.now() - t1);
      }
      await o.beforeCriuRestore?.(ctx);
      await clearStaleMarkers(container.controlDir);
      await rm(workDir, { recursive: true, force: true });
      await mkdir(workDir, { recursive: true, mode: 0o700 });
      const mappedReads = startMappedFileReads(job, pid);
      try {
        tree = await restoreIntoContainer({
          criu: o.criu,
          manifest: checkpoint.manifest,
          imagesDir: checkpoint.paths.criuDir,
          workDir,
          targetPid: pid,
          timeoutMs: o.criuRestoreTimeoutMs ?? DEFAULT_CRIU_RESTORE_TIMEOUT_MS,
          signal,
          logger,
          ...(o.nsenterPath ? { nsenterPath: o.nsenterPath } : {}),
        });
      } finally {
        mappedReads.stop();
      }
      phases.criuRestoreMs = Math.round(tree.criuRestoreMs);
      const mappedFiles = await mappedReads.settled();

      // --- CUDA restore seam: cuda-checkpoint restore + unlock of the restored tree goes here. ---
      if (o.cudaRestore) {
        const t2 = performance.now();
        try {
          await o.cudaRestore(tree, ctx);
        } catch (err) {
          throw new RestoreError(RestoreErrorCode.DEVICES, errorMessage(err), { step: 'cuda restore', cause: err });
        }
        phases.cudaRestoreMs = Math.round(performance.now() - t2);
      }

      try {
        process.kill(pid, 'SIGUSR1'); // thaw-pause adopts its only child, the restored root
      } catch (err) {
        throw new RestoreError(RestoreErrorCode.TARGET_GONE, `cannot signal the placeholder ${pid}: ${errorMessage(err)}`, { step: 'adopt', cause: err });
      }
      await writeMarker(container.controlDir, 'restore-complete', { checkpoint: checkpoint.name, restoredAt: new Date().toISOString() });
      const e = event({ outcome: 'restored', restoredPid: tree.hostPid, bytes: checkpoint.manifest.totals.bytes, ...(digests ? { digests } : {}), ...(mappedFiles ? { mappedFiles } : {}) });
      logger.info('restore', { ...e, criuOptions: tree.options, criuLog: tree.logPath, cgroupsJoined: tree.cgroupsJoined.length });
      o.onEvent?.(e);
    } catch (err) {
      const cause = isThawError(err) ? err.code : RestoreErrorCode.INTERNAL;
      const reason = errorMessage(err);
      killRestoredTree(tree?.hostPid);
      // thaw-pause is PID 1 unless the hook failed in overlay mode (then the original command already runs).
      const placeholderRuns = mode === 'args' || hook.kind === 'done';
      const problems: string[] = [];
      if (overlayMounted && hook.kind === 'done' && hook.record.overlayPath !== undefined) {
        await unmountOverlay(pid, hook.record.overlayPath).catch((e: unknown) => problems.push(errorMessage(e)));
      }
      await writeMarker(container.controlDir, 'restore-failed', { reason, cause }).catch((e: unknown) => problems.push(`restore-failed marker: ${errorMessage(e)}`));
      if (placeholderRuns) {
        try {
          process.kill(pid, 'SIGUSR2');
        } catch (e) {
          problems.push(`SIGUSR2 to ${pid}: ${errorMessage(e)}`);
        }
      }
      o.stats?.countFallback(cause);
      const e = event({ outcome: 'fallback', cause, reason });
      logger.warn('restore', { ...e, ...(isThawError(err) ? { error: err.toJSON() } : {}), ...(problems.length > 0 ? { problems } : {}) });
      o.onEvent?.(e);
    } finally {
      // Whatever the prefetch had left to read, CRIU has read by now (or the restore is abandoned).
      prefetches.release(jobHolder(container.containerId));
      prefetches.release(podHolder(container.podId));
      await job.release?.().catch(() => undefined);
      jobs.delete(container.containerId);
    }
  }

  const coordinator: RestoreCoordinator = {
    restorePodCreated(podId, checkpointName) {
      prefetches.hold(checkpointName, podHolder(podId));
    },

    podGone(podId) {
      prefetches.release(podHolder(podId));
    },

    restoreTargetCreated(container, checkpoint, incoming) {
      const job: Job = {
        createdAtIso: new Date().toISOString(),
        container,
        checkpoint,
        ...(incoming !== undefined ? { incoming } : {}),
        abort: new AbortController(),
        createdAt: performance.now(),
        prepared: Promise.resolve({ verifyMs: 0, hashed: false }),
      };
      job.prepared = prepare(job);
      job.prepared.catch(() => undefined); // awaited in runRestore; an early failure must not be unhandled
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
      const outcome = await firstMarker(container.controlDir);
      if (outcome !== undefined) return; // finished before the restart: restored, or fallen back
      const cause = RestoreErrorCode.AGENT_RESTARTED;
      const reason = 'the agent restarted while this container waited for its restore';
      const hook = await readHookOutcome(container.controlDir);
      const problems: string[] = [];
      if (hook.kind === 'done' && hook.record.mode === 'overlay' && hook.record.overlayPath !== undefined) {
        // The overlay may already be gone (the restore had got past it): then umount fails, which is fine.
        await unmountOverlay(pid, hook.record.overlayPath).catch((e: unknown) => problems.push(errorMessage(e)));
      }
      await writeMarker(container.controlDir, 'restore-failed', { reason, cause }).catch((e: unknown) => problems.push(`restore-failed marker: ${errorMessage(e)}`));
      // thaw-pause kills whatever a half-finished restore left under it, then execs the original command.
      if (hook.kind === 'done' || container.placeholder === 'args') {
        try {
          process.kill(pid, 'SIGUSR2');
        } catch (e) {
          problems.push(`SIGUSR2 to ${pid}: ${errorMessage(e)}`);
        }
      }
      o.stats?.countFallback(cause);
      const e: RestoreEvent = {
        event: 'restore',
        outcome: 'fallback',
        cause,
        reason,
        checkpoint: container.checkpointName,
        containerId: container.containerId,
        container: container.containerName,
        pod: `${container.podNamespace}/${container.podName}`,
        mode: container.placeholder ?? 'overlay',
        phases: { totalMs: 0 },
      };
      logger.warn('restore', { ...e, ...(problems.length > 0 ? { problems } : {}) });
      o.onEvent?.(e);
    },

    containerGone(containerId) {
      const job = jobs.get(containerId);
      if (job === undefined) return;
      job.abort.abort(new Error('container removed'));
      prefetches.release(jobHolder(containerId));
      if (job.run === undefined) {
        jobs.delete(containerId);
        void job.prepared.finally(() => job.release?.());
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
      for (const job of jobs.values()) job.abort.abort(new Error('agent stopping'));
      await prefetches.close();
      // Targets created but not started: nothing runs for them here; release their leases. The next agent
      // falls them back when they start (restoreTargetStarted without a prepared job).
      const prepared = [...jobs.values()].filter((j) => j.run === undefined);
      await Promise.allSettled(prepared.map((j) => j.prepared.catch(() => undefined).then(() => j.release?.())));
      for (const j of prepared) jobs.delete(j.container.containerId);
      await this.idle();
    },
  };
  return coordinator;
}
