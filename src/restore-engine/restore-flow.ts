/**
 * The restore flow (design.md, Restore steps 3-4), beside the checkpoint flow (checkpoint.ts): what runs for a
 * restore target between its CreateContainer and the pod serving. The agent's coordinator
 * (agent/restore-coordinator.ts) owns the jobs (which container is prepared or restoring, the shared
 * prefetches, leases held per pod) and calls the three steps here:
 *
 *   prepare   lease the checkpoint, verify every file's sha256 and read it into the page cache
 *             and, when the checkpoint's weights are outside it, start loading them into shareable GPU
 *             memory (weights/loader.ts), beside everything that follows
 *   run       (the container's PID 1 is thaw-pause) wait for verify; read what the create-runtime hook
 *             recorded; in overlay mode unmount thaw-pause from the entrypoint inside the container;
 *             CRIU restore inside the container's namespaces and cgroups; [CUDA restore seam]; the
 *             weights handed to the restored worker over weights.sock and mapped by it at its VAs (its
 *             answer awaited); SIGUSR1 (thaw-pause adopts the worker); restore-complete
 *   recover   a target found waiting after an agent restart: fall back
 *
 * Any error → fallBackToColdStart: kill what the restore left; make sure the overlay is gone;
 * restore-failed; SIGUSR2 (thaw-pause execs the original command: a cold start). One `restore` event per
 * target, either way.
 *
 * The engine does not know the agent: what it needs from the store, the hook records, the fallback counters
 * and the prefetch is handed in as the small interfaces below.
 */
import { execFile } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { errorMessage, isThawError } from '../errors.js';
import type { Logger } from '../log.js';
import { clearStaleMarkers, firstPresent, writeMarker } from '../sdk/index.js';
import { RESTORE_COMPLETE, RESTORE_FAILED } from '../sdk/index.js';
import type { LocalStore, OpenedCheckpoint, ReleaseLease } from '../store/index.js';
import { MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES, StoreErrorCode } from '../store/index.js';
import type { CriuClient } from './criu/client.js';
import { CriuImageCodec } from './criu/images.js';
import { readRecordedCredentials, type ThreadCredentials } from './credentials.js';
import { firstIrregularMappedFile, mappedFilePages, readMappedFilePages, type MappedFile, type ReadMappedResult } from './mapped-files.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';
import { killRestoredTree, restoreIntoContainer, type RestoredTree } from './restore.js';
import { discardUndo, undoRootfsDiff, type UndoJournal } from './rootfs-diff/index.js';
import { deferred } from '../util.js';
import { DEFAULT_NSENTER_PATH, DEFAULT_POD_CRIU_RESTORE_TIMEOUT_MS, DEFAULT_THAW_PAUSE_DEADLINE_MS, DEFAULT_VERIFY_TIMEOUT_MS, DEFAULT_WEIGHTS_HANDOVER_TIMEOUT_MS, PLACEHOLDER_EXEC_WAIT_MS, WEIGHTS_ORDER_DEFAULT, WEIGHTS_READERS_DEFAULT, type WeightsOrder } from '../defaults.js';
import type { CudaVmm } from '../cuda/index.js';
import { processTree } from './container-inspect.js';
import { WeightsError, WeightsErrorCode } from './weights/errors.js';
import { listenForWorker } from './weights/handover.js';
import { loadWeights, type LoadedWeights } from './weights/loader.js';
import { openContainerRoot, regionsOfManifest, restoreSourceOpener, type ContainerBindMount } from './weights/service.js';
import type { SourceDigests } from './weights/source-digests.js';
import { closeSync } from 'node:fs';
import { FILL_PLAN_IMAGE, fillSourceOf, startMemoryFill, type FillSource, type FillStats, type RunningFill } from './memory-fill.js';

const execFileP = promisify(execFile);

/** One umount inside the container. */
export const OVERLAY_UMOUNT_TIMEOUT_MS = 5_000;
/** After CRIU, how long the stopped reads of the worker's file pages get to report (one read in flight each). */
export const MAPPED_READ_SETTLE_MS = 100;

/** What the flow knows of a restore target (the agent's ManagedContainer is one). */
export interface RestoreTarget {
  containerId: string;
  containerName: string;
  podId: string;
  podName: string;
  podNamespace: string;
  checkpointName: string;
  /** Host path of the control directory (mounted at /snapshot-control in the container). */
  controlDir: string;
  /** How thaw-pause holds the original command (NRI args, or the createRuntime overlay); default overlay. */
  placeholder?: 'args' | 'overlay';
  /** The container's bind mounts (NRI CreateContainer): where weights sources on host model dirs are. */
  mounts?: ContainerBindMount[];
}

/** Context handed to the seams. */
export interface RestoreStepContext {
  container: RestoreTarget;
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
  /**
   * The diff could not be undone (cause RESTORE_UNDO_FAILED): the container was SIGKILLed rather than cold-started
   * on a changed rootfs; `fellBackFor` is the cause the restore had fallen back for.
   */
  killed?: boolean;
  fellBackFor?: string;
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
  /** The weights load (docs/weights.md), when the checkpoint's weights are outside it. */
  weights?: { bytes: number; loadMs: number; setupMs: number; copyMs: number; readers: number; mbPerS: number; order: WeightsOrder; readWaitMs: number };
  /** Who filled the restored memory: thaw-fill (its account) or CRIU's restorer (and why not thaw-fill). */
  memoryFill?: ({ by: 'thaw-fill' } & FillStats) | { by: 'criu'; reason: string };
  phases: {
    /**
     * When things happened (epoch ms): the weights load runs beside CRIU and the CUDA restore, so its
     * start comes before criuEnd (ordering, not durations, shows the overlap).
     */
    at?: { weightsLoadStart?: number; weightsLoadEnd?: number; criuStart?: number; criuEnd?: number; cudaRestoreEnd?: number; weightsHandedOver?: number; memoryFilled?: number };
    /** After the CUDA restore and the weights, waiting for thaw-fill's last page (0 when it was done already). */
    memoryFillWaitMs?: number;
    /** After the CUDA restore, waiting for the weights load to end (0 when it ended beside CRIU). */
    weightsWaitMs?: number;
    /** Inside criuStart..criuEnd, around CRIU's own criuRestoreMs: thaw's checks before it, finding the restored root after. */
    criuChecksMs?: number; adoptMs?: number;
    /** The hand-over: the worker connects, maps and answers. */
    weightsHandoverMs?: number; hookMs?: number; hookStartupMs?: number; transferMs?: number; verifyMs?: number; waitVerifyMs?: number; overlayMs?: number; criuRestoreMs?: number; cudaRestoreMs?: number; totalMs: number };
}

/** What the create-runtime hook recorded in the control directory, as the flow reads it (oci-hooks/records.ts). */
export type HookOutcomeView =
  | { kind: 'done'; record: { mode: 'args' | 'overlay'; overlayPath?: string; originalPath?: string; ms: number; startupMs?: number } }
  | { kind: 'failed'; record: { code: string; reason: string } }
  | { kind: 'missing' };

/** The hook records of a control directory (oci-hooks/records.ts implements them). */
export interface HookRecords {
  readHookOutcome(controlDir: string): Promise<HookOutcomeView>;
  /** Tells a create-runtime hook waiting for the checkpoint to stop waiting (the container then starts cold). */
  writeCheckpointUnavailable(controlDir: string, record: { code: string; reason: string }): Promise<void>;
}

/** The store as the flow uses it. */
export type RestoreStore = Pick<LocalStore, 'acquireLease' | 'verify' | 'recordRestoreFailure'>;

/**
 * Fallback causes that say the checkpoint itself cannot be restored here: after one, the checkpoint is marked
 * failed in the store (LocalStore.recordRestoreFailure) and the next pod naming it cold-starts at once
 * (RESTORE_CHECKPOINT_FAILED_BEFORE) instead of applying the same diff and running the same CRIU again. Not
 * here: causes of the target or the moment (the container gone, the agent stopping or restarted, a time limit,
 * its cgroups, mounts or spec, the overlay) and a checkpoint whose files do not match their digests (verify
 * refuses it on every attempt before CRIU, and a repaired copy of the same manifest must restore again).
 */
export const CHECKPOINT_FAULT_CAUSES: ReadonlySet<string> = new Set([
  RestoreErrorCode.CRIU,
  RestoreErrorCode.MAPPED_FILE_UNSAFE,
  RestoreErrorCode.CREDENTIALS_EXCEED_SPEC,
  RestoreErrorCode.ADOPT,
  RestoreErrorCode.DEVICES,
]);
/** The create-runtime hook's codes that are the checkpoint's rootfs diff refused or failing to apply. */
export const CHECKPOINT_FAULT_HOOK_CODES: ReadonlySet<string> = new Set(['HOOK_ROOTFS_DIFF_FAILED']);

/** Whether a fallback with `cause` (and this hook outcome) marks the checkpoint failed on this node. */
export function isCheckpointFault(cause: string, hook: HookOutcomeView): boolean {
  if (CHECKPOINT_FAULT_CAUSES.has(cause)) return true;
  return cause === RestoreErrorCode.HOOK_FAILED && hook.kind === 'failed' && CHECKPOINT_FAULT_HOOK_CODES.has(hook.record.code);
}

/** Where each fallback is counted, by cause (the agent's ThawNriStats). */
export interface FallbackCounter {
  countFallback(cause: string): void;
}

/** The checkpoint prefetch the coordinator runs. */
export interface RestorePrefetch {
  /**
   * The checkpoint is leased for this target: keep (or start) reading it into the page cache for it. Resolves when
   * that read ended (read, failed or stopped); never rejects.
   */
  hold(job: RestoreJob): Promise<void>;
  /** Holds the checkpoint prefetches back (small reads CRIU waits for go first); returns the release. */
  holdGate(): () => void;
}

export interface PreparedRestore {
  verifyMs: number;
  hashed: boolean;
  transferMs?: number;
}

/** One restore target's state, shared by the coordinator (which holds it) and the flow. */
export interface RestoreJob {
  container: RestoreTarget;
  checkpoint: OpenedCheckpoint;
  /** The checkpoint is still being pulled (or copied from the shared store); prepare() waits for it. */
  incoming?: Promise<OpenedCheckpoint>;
  /** Set when `incoming` failed: the cause of the cold start. */
  pullError?: RestoreError;
  abort: AbortController;
  prepared: Promise<PreparedRestore>;
  release?: ReleaseLease;
  /** The file pages CRIU will fault in (listed from the images while the container is created). */
  mappedFiles?: Promise<MappedFile[]>;
  /** The weights load started at prepare (the checkpoint's weights are outside it). */
  weights?: WeightsLoadJob;
  /**
   * The memory fill's source, found at prepare (memory-fill.ts fillSourceOf: the plan stored with the checkpoint, or
   * one made from its images); absent, or `none`: CRIU fills the memory.
   */
  fillPlan?: Promise<FillSource | { none: string }>;
  /** Every thread's recorded credentials, read from the images once they were verified (restore.ts checks them). */
  recordedCredentials?: Promise<ThreadCredentials[]>;
}

/** A weights load under way for one restore target. */
export interface WeightsLoadJob {
  loaded: Promise<LoadedWeights>;
  startedAt: number;
  endedAt?: number;
  readers: number;
  order: WeightsOrder;
  /** Hands the load the container's root dir fd (rootfs sources wait for it). */
  provideRoot(fd: number): void;
  /** Stops the load and releases whatever it made, now or when it finishes (idempotent). */
  dispose(): void;
}

/** The agent's weights service, as the flow uses it. */
export interface RestoreWeightsService {
  vmm: CudaVmm;
  digests: SourceDigests;
  /** Host directories weights may be read from through the container's bind mounts. */
  modelDirs: readonly string[];
  /** The node's weights cache directory (store/oci/weights-cache.ts): sources no model dir has are looked up there by sha256. */
  weightsCacheDir?: string;
  /** This node's GPU count: a region recorded on an ordinal it lacks is GPU_MISMATCH. */
  gpuCount: number;
  readers?: number;
  /** When the weights are read: after the checkpoint's read, or beside it (default WEIGHTS_ORDER_DEFAULT). */
  order?: WeightsOrder;
  /** How long the restored worker gets to connect, map and answer (default DEFAULT_WEIGHTS_HANDOVER_TIMEOUT_MS). */
  handoverTimeoutMs?: number;
}

export interface RestoreFlowOptions {
  store: RestoreStore;
  hookRecords: HookRecords;
  prefetch: RestorePrefetch;
  criu: CriuClient;
  logger: Logger;
  fallbacks?: FallbackCounter;
  /** Per-container CRIU work directories (restore.log) go to `<workRoot>/<container id>`. */
  workRoot: string;
  /** The toolkit's bin directory (mounted at the same path in the target): its busybox does the umount there. */
  toolkitBinDir: string;
  /**
   * Host path of thaw-pause: whether PID 1 runs it (by inode) tells a placeholder whose exec is done from one whose
   * exec is under way (run), and one that still waits from one that fell back by itself (recover).
   */
  thawPausePath: string;
  nsenterPath?: string;
  verifyTimeoutMs?: number;
  criuRestoreTimeoutMs?: number;
  /**
   * thaw-pause's deadline (DEFAULT_THAW_PAUSE_DEADLINE_MS): while a restore runs, the placeholder is told
   * "a restore is under way" (SIGWINCH) every third of it, so it falls back by itself only when the agent
   * is gone.
   */
  thawPauseDeadlineMs?: number;
  cudaRestore?: CudaRestoreStep;
  /** The weights service; absent: a checkpoint whose weights are outside it cold-starts (WEIGHTS_UNAVAILABLE). */
  weights?: RestoreWeightsService;
  /**
   * The memory fill through userfaultfd (memory-fill.ts): thaw-fill's path, its threads and time limit. Absent,
   * or when a checkpoint has no plan or the filler cannot start, CRIU's restorer fills the memory itself.
   */
  memoryFill?: { binary: string; threads: number; timeoutMs: number };
  /** Test seam: runs after verify, right before CRIU (e.g. to damage an image file CRIU then reads). */
  beforeCriuRestore?: (ctx: RestoreStepContext) => Promise<void>;
  /** Every restore event, after it was logged. */
  onEvent?: (event: RestoreEvent) => void;
}

export interface RestoreFlow {
  /** Lease and verify the checkpoint (after the pull, when one runs); rejects with the RestoreError of the fallback. */
  prepare(job: RestoreJob): Promise<PreparedRestore>;
  /** Restore into the started target (pid: its PID 1 on the host), or fall back; never rejects for a restore problem. */
  run(job: RestoreJob, pid: number): Promise<void>;
  /**
   * A target whose restore no process runs (the agent restarted): unless the worker was told restore-complete
   * or restore-failed already, fall back.
   */
  recover(container: RestoreTarget, pid: number): Promise<void>;
}

export function workDirFor(workRoot: string, containerId: string): string {
  return join(workRoot, containerId);
}

/**
 * The rootfs diff's undo journal the create-runtime hook leaves for a container (`--undo-journal`): a host file
 * of the agent's (beside the work dirs, not in the pod's control directory, which the pod could rewrite).
 */
export function undoJournalFor(workRoot: string, containerId: string): string {
  return join(workRoot, 'rootfs-undo', `${containerId}.json`);
}

/**
 * Tells the placeholder (thaw-pause, PID 1 of the target) "a restore is under way" now and every third of its
 * deadline until stopped: its deadline starts again at each, so it falls back by itself only when no agent
 * is left to say it. A placeholder that is gone is not an error here (the flow finds that out itself).
 */
export function holdPlaceholder(pid: number, deadlineMs: number): { stop(): void } {
  const say = () => {
    try {
      process.kill(pid, 'SIGWINCH');
    } catch {
      // gone: the restore's own steps report it
    }
  };
  say();
  const timer = setInterval(say, Math.max(1, Math.floor(deadlineMs / 3)));
  timer.unref();
  return { stop: () => clearInterval(timer) };
}

/** The agent marker a worker was given, if any (restore-complete or restore-failed). */
async function firstMarker(controlDir: string): Promise<string | undefined> {
  // lstat, not access(): the directory is the pod's, and a planted symlink is never followed.
  return firstPresent(controlDir, [RESTORE_COMPLETE, RESTORE_FAILED]);
}

/** What a fallback needs to know about how far the restore got. */
interface ColdStart {
  container: RestoreTarget;
  pid: number;
  cause: string;
  reason: string;
  hook: HookOutcomeView;
  /** thaw-pause is still mounted over the entrypoint inside the container (overlay mode). */
  overlayMounted: boolean;
  /** The restored tree's root on the host, when CRIU got that far. */
  restoredPid?: number;
  error?: unknown;
  /** The restore event, made after the cleanup (its totalMs includes it). */
  event(): RestoreEvent;
}

export function createRestoreFlow(o: RestoreFlowOptions): RestoreFlow {
  const logger = o.logger;
  const imageCodec = CriuImageCodec.load();

  /** Removes thaw-pause's overlay and the hook's second mount of the original entrypoint, in one umount. */
  async function unmountOverlay(pid: number, path: string, originalPath?: string): Promise<void> {
    try {
      // Lazy: thaw-pause runs from that very file, so a plain umount would be EBUSY.
      await execFileP(o.nsenterPath ?? DEFAULT_NSENTER_PATH, ['-t', String(pid), '-m', '--', join(o.toolkitBinDir, 'busybox'), 'umount', '-l', path, ...(originalPath !== undefined ? [originalPath] : [])], {
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

  /** The hook's undo journal for a container, if it left one (undefined: no diff, or nothing kept). */
  async function readUndoJournal(containerId: string): Promise<{ file: string; journal: UndoJournal } | undefined> {
    const file = undoJournalFor(o.workRoot, containerId);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    return { file, journal: (JSON.parse(text) as { rootfsDiffUndo: UndoJournal }).rootfsDiffUndo };
  }

  /** Undoes the hook's diff in the container's rootfs (through thaw-pause's root), then drops the journal. */
  async function undoHookDiff(containerId: string, pid: number): Promise<void> {
    const found = await readUndoJournal(containerId);
    if (found === undefined) return;
    undoRootfsDiff(`/proc/${pid}/root/.`, found.journal);
    await rm(found.file, { force: true });
  }

  /** After restore-complete: the originals the diff replaced are dropped (problems are logged, not thrown). */
  async function discardHookUndo(containerId: string, pid: number): Promise<void> {
    try {
      const found = await readUndoJournal(containerId);
      if (found === undefined) return;
      discardUndo(`/proc/${pid}/root/.`, found.journal);
      await rm(found.file, { force: true });
    } catch (err) {
      logger.warn('the rootfs diff backup could not be removed after the restore', { containerId, error: errorMessage(err) });
    }
  }

  /**
   * The one way a restore target gives up: kill what the restore left, make sure the overlay is gone, tell the
   * worker restore-failed, SIGUSR2 thaw-pause (it kills whatever a half-finished restore left under it, then
   * execs the original command), count the cause, log and emit the event. Cleanup problems are reported in
   * the log line, never thrown: the pod must start either way.
   */
  async function fallBackToColdStart(c: ColdStart): Promise<void> {
    killRestoredTree(c.restoredPid);
    // thaw-pause is PID 1 unless the hook failed in overlay mode (then the original command already runs).
    const mode = c.container.placeholder ?? 'overlay';
    const placeholderRuns = mode === 'args' || c.hook.kind === 'done';
    const problems: string[] = [];
    // A restore may fail before its PID 1 exec'd (the start is told beside the exec): thaw-pause must run before it
    // is signalled (a signal to the runtime's init would end the container) or the overlay goes.
    if (placeholderRuns) await waitForPlaceholder(c.pid, new AbortController().signal).catch((e: unknown) => problems.push(errorMessage(e)));
    if (c.overlayMounted && c.hook.kind === 'done' && c.hook.record.overlayPath !== undefined) {
      // The overlay may already be gone (a restore of an earlier agent had got past it): then umount fails, which is fine.
      await unmountOverlay(c.pid, c.hook.record.overlayPath, c.hook.record.originalPath).catch((e: unknown) => problems.push(errorMessage(e)));
    }
    // The original command must run on the image's own rootfs: undo what the hook's diff changed first. If that
    // fails, the rootfs is half changed: the container is killed instead (the kubelet starts it afresh), and the
    // cause is RESTORE_UNDO_FAILED, not the one the restore fell back for.
    let undoError: unknown;
    if (placeholderRuns) {
      try {
        await undoHookDiff(c.container.containerId, c.pid);
      } catch (e) {
        undoError = e;
      }
    }
    const killed = undoError !== undefined;
    const cause = killed ? RestoreErrorCode.UNDO_FAILED : c.cause;
    const reason = killed ? `undoing the rootfs diff failed: ${errorMessage(undoError)}; the container is killed, not cold-started (the restore had fallen back for ${c.cause}: ${c.reason})` : c.reason;
    await writeMarker(c.container.controlDir, 'restore-failed', { reason, cause }).catch((e: unknown) => problems.push(`restore-failed marker: ${errorMessage(e)}`));
    if (placeholderRuns) {
      const signal = killed ? 'SIGKILL' : 'SIGUSR2';
      try {
        process.kill(c.pid, signal);
      } catch (e) {
        problems.push(`${signal} to ${c.pid}: ${errorMessage(e)}`);
      }
    }
    o.fallbacks?.countFallback(cause);
    const e: RestoreEvent = killed ? { ...c.event(), cause, reason, killed: true, fellBackFor: c.cause } : c.event();
    const error = killed ? undoError : c.error;
    logger.warn('restore', { ...e, ...(isThawError(error) ? { error: error.toJSON() } : {}), ...(problems.length > 0 ? { problems } : {}) });
    o.onEvent?.(e);
  }

  /** Records that this checkpoint (this manifest) failed here; a failure to record is logged, never thrown. */
  async function markCheckpointFailed(job: RestoreJob, cause: string, reason: string): Promise<void> {
    const c = job.container;
    try {
      const failure = await o.store.recordRestoreFailure(job.checkpoint, { cause, reason, containerId: c.containerId, pod: `${c.podNamespace}/${c.podName}` });
      logger.warn('checkpoint marked failed on this node: pods naming it cold-start until it is replaced or `thaw clear-failure` clears the mark', {
        checkpoint: failure.name,
        id: failure.manifestId,
        manifestDigest: failure.manifestDigest,
        cause,
        containerId: c.containerId,
      });
    } catch (err) {
      logger.error('cannot mark the checkpoint failed', { checkpoint: job.checkpoint.name, cause, error: errorMessage(err) });
    }
  }

  /**
   * Beside CRIU, not before it: the worker's file pages CRIU will fault in, read in parallel through the
   * container's root (where CRIU opens them), the checkpoint prefetch held back meanwhile. stop() when CRIU is
   * done (also if a read hangs: every checkpoint's prefetch waits on the gate); settled() then gives the reads
   * MAPPED_READ_SETTLE_MS to report. A file list still being made is not waited for.
   */
  function startMappedFileReads(job: RestoreJob, pid: number): { stop(): void; settled(): Promise<ReadMappedResult | undefined> } {
    const stopReads = new AbortController();
    let releaseGate: (() => void) | undefined;
    let reading: Promise<ReadMappedResult | undefined> | undefined;
    void (job.mappedFiles ?? Promise.resolve([])).then((files) => {
      if (stopReads.signal.aborted) return;
      releaseGate = o.prefetch.holdGate();
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

  /**
   * Starts the weights load for a target whose checkpoint keeps its weights outside: from here (CreateContainer)
   * the sources on allowed host model dirs are read at once; rootfs sources wait for the container's root.
   */
  function startWeightsLoad(job: RestoreJob, service: RestoreWeightsService, checkpointRead: Promise<void>): WeightsLoadJob {
    const stop = new AbortController();
    let provide: (fd: number) => void = () => undefined;
    let refuse: (err: Error) => void = () => undefined;
    const rootReady = new Promise<number>((resolve, reject) => {
      provide = resolve;
      refuse = reject;
    });
    rootReady.catch(() => undefined);
    const opener = restoreSourceOpener({
      mounts: job.container.mounts ?? [],
      modelDirs: service.modelDirs,
      rootReady,
      // A checkpoint still being pulled brings its weights layers into the cache before it is published.
      ...(service.weightsCacheDir !== undefined ? { weightsCache: { dir: service.weightsCacheDir, ...(job.incoming !== undefined ? { ready: job.incoming } : {}) } } : {}),
    });
    const readers = service.readers ?? WEIGHTS_READERS_DEFAULT;
    const order = service.order ?? WEIGHTS_ORDER_DEFAULT;
    const w: WeightsLoadJob = {
      startedAt: Date.now(),
      readers,
      order,
      loaded: Promise.resolve().then(() =>
        loadWeights({
          regions: regionsOfManifest(job.checkpoint.manifest.weights),
          vmm: service.vmm,
          deviceFor: (recorded) => {
            if (recorded >= service.gpuCount) {
              throw new WeightsError(WeightsErrorCode.GPU_MISMATCH, `the weights were on GPU ${recorded}; this node has ${service.gpuCount}`, { step: 'map the weights\' GPU', evidence: { recorded, gpus: service.gpuCount } });
            }
            return recorded;
          },
          openSource: opener.open,
          digests: service.digests,
          readers,
          ...(order === 'checkpoint-first' ? { readsAfter: checkpointRead } : {}),
          signal: stop.signal,
        }),
      ),
      provideRoot: (fd) => provide(fd),
      dispose: () => {
        if (stop.signal.aborted) return;
        stop.abort(new Error('the restore is over'));
        refuse(new Error('the container never ran'));
        void w.loaded.then((l) => l.release(), () => undefined).finally(() => opener.close());
      },
    };
    w.loaded.then(() => (w.endedAt = Date.now()), () => (w.endedAt = Date.now()));
    job.abort.signal.addEventListener('abort', () => w.dispose(), { once: true });
    return w;
  }

  async function prepare(job: RestoreJob): Promise<PreparedRestore> {
    const name = job.checkpoint.name;
    const signal = job.abort.signal;
    // Resolved when the checkpoint's read into the page cache ended, or when prepare gave up before it began.
    const checkpointRead = deferred();
    if (job.checkpoint.manifest.weights !== undefined && o.weights !== undefined && job.weights === undefined) {
      job.weights = startWeightsLoad(job, o.weights, checkpointRead.promise);
      job.weights.loaded.catch(() => undefined); // awaited in run; a target that never runs must not leave it unhandled
    }
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
        await o.hookRecords.writeCheckpointUnavailable(job.container.controlDir, { code, reason: errorMessage(err) }).catch(() => undefined);
        checkpointRead.resolve(); // no read will come: the weights (disposed with the job) need not wait for one
        throw job.pullError;
      }
    }
    try {
      // Local checkpoints are leased at CreateContainer (restore-target.ts), before the hook can read them.
      job.release ??= await o.store.acquireLease(name);
      const t0 = performance.now();
      // Reading the checkpoint into the page cache is a hint, not a step: the restore does not wait for it
      // (CRIU's own reads find whatever it has read already; bench/RESULTS.md has what awaiting it cost).
      // Verification is awaited; it hashes only files changed since they were last hashed on this node
      // (LocalStore.verify). The read may be running already, started at RunPodSandbox.
      void o.prefetch.hold(job).then(checkpointRead.resolve);
      if (o.memoryFill !== undefined) {
        job.fillPlan = fillSourceOf(job.checkpoint.paths.criuDir, imageCodec).catch((err: unknown) => ({ none: `no plan: ${errorMessage(err)}` }));
      }
      job.mappedFiles = mappedFilePages(job.checkpoint.paths.criuDir, imageCodec).catch((err: unknown) => {
        logger.debug('cannot list the mapped file pages', { checkpoint: name, error: errorMessage(err) });
        return [];
      });
      // Hashed against the very manifest object CRIU will be given (job.checkpoint.manifest), not a re-read.
      const verified = await o.store.verify(name, { signal, manifest: job.checkpoint.manifest });
      // Read now, from the verified images, while the container is still being started: with the page cache cold
      // these dozens of small reads queue behind the prefetch, and here they do not hold up CRIU.
      job.recordedCredentials = readRecordedCredentials(job.checkpoint.paths.criuDir, imageCodec);
      job.recordedCredentials.catch(() => undefined); // awaited by restoreIntoContainer; a target that never runs must not leave it unhandled
      return { verifyMs: performance.now() - t0, hashed: verified.hashed, ...(transferMs !== undefined ? { transferMs } : {}) };
    } catch (err) {
      checkpointRead.resolve();
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

  async function run(job: RestoreJob, pid: number): Promise<void> {
    const { container, checkpoint } = job;
    const signal = job.abort.signal;
    const started = performance.now();
    const phases: RestoreEvent['phases'] = { totalMs: 0 };
    const workDir = workDirFor(o.workRoot, container.containerId);
    let hook: HookOutcomeView = { kind: 'missing' };
    let overlayMounted = false;
    let tree: RestoredTree | undefined;
    let digests: RestoreEvent['digests'];
    let holding: { stop(): void } | undefined;
    let rootFd: number | undefined;
    let weightsInfo: RestoreEvent['weights'];
    let fill: RunningFill | undefined;
    let fillInfo: RestoreEvent['memoryFill'];
    const at: NonNullable<RestoreEvent['phases']['at']> = {};
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
      phases: { ...phases, ...(Object.keys(at).length > 0 ? { at: { ...at, ...weightsTimes() } } : {}), totalMs: Math.round(performance.now() - started) },
    });
    const weightsTimes = (): NonNullable<RestoreEvent['phases']['at']> =>
      job.weights ? { weightsLoadStart: job.weights.startedAt, ...(job.weights.endedAt !== undefined ? { weightsLoadEnd: job.weights.endedAt } : {}) } : {};
    try {
      if (checkpoint.manifest.weights !== undefined && job.weights === undefined) {
        throw new WeightsError(WeightsErrorCode.UNAVAILABLE, 'the checkpoint keeps its weights outside, and this agent has no weights service (no CUDA driver)', { step: 'load the weights' });
      }
      if (job.weights !== undefined) {
        // The rootfs exists now: sources inside it can be opened (host model dirs were being read already).
        rootFd = openContainerRoot(pid);
        job.weights.provideRoot(rootFd);
        Object.assign(at, weightsTimes());
      }
      hook = await o.hookRecords.readHookOutcome(container.controlDir);
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
      // The hook succeeded, so PID 1 is thaw-pause (a failed hook leaves the original command there, which
      // must get no signal of ours) once its exec is done: the start may be told before (the poststart hook runs
      // beside it), and an overlay removed before the exec would let the original entrypoint run.
      await waitForPlaceholder(pid, signal);
      holding = holdPlaceholder(pid, o.thawPauseDeadlineMs ?? DEFAULT_THAW_PAUSE_DEADLINE_MS);
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
        await unmountOverlay(pid, hook.record.overlayPath, hook.record.originalPath);
        overlayMounted = false;
        phases.overlayMs = Math.round(performance.now() - t1);
      }
      await o.beforeCriuRestore?.(ctx);
      await clearStaleMarkers(container.controlDir);
      await rm(workDir, { recursive: true, force: true });
      await mkdir(workDir, { recursive: true, mode: 0o700 });
      // One O_PATH openat2 + fstat per mapped file (the list was made while the container was created): a FIFO
      // planted at one of them would hold CRIU's open until its timeout, and the pod in its placeholder with it.
      const irregular = await firstIrregularMappedFile(`/proc/${pid}/root`, await (job.mappedFiles ?? Promise.resolve([])));
      if (irregular !== undefined) {
        throw new RestoreError(RestoreErrorCode.MAPPED_FILE_UNSAFE, `${irregular.path}, which the checkpoint maps, is a ${irregular.type} in the target`, { step: 'check the mapped files', evidence: irregular });
      }
      ({ fill, info: fillInfo } = await startFill(job, workDir));
      const mappedReads = startMappedFileReads(job, pid);
      at.criuStart = Date.now();
      try {
        tree = await restoreIntoContainer({
          criu: o.criu,
          manifest: checkpoint.manifest,
          imagesDir: checkpoint.paths.criuDir,
          workDir,
          targetPid: pid,
          timeoutMs: o.criuRestoreTimeoutMs ?? DEFAULT_POD_CRIU_RESTORE_TIMEOUT_MS,
          signal,
          logger,
          ...(o.nsenterPath ? { nsenterPath: o.nsenterPath } : {}),
          ...(fill !== undefined ? { lazyPages: true } : {}),
          ...(job.recordedCredentials !== undefined ? { recordedCredentials: job.recordedCredentials } : {}),
        });
      } finally {
        mappedReads.stop();
      }
      // From here the tree runs while thaw-fill places its pages: a step that touches them waits on the fill,
      // so a failed fill (whose faults never end) must end that step too.
      const running = fill;
      const orFillFailure = <T>(p: Promise<T>): Promise<T> => (running === undefined ? p : Promise.race([p, running.done.then(() => p)]));
      phases.criuRestoreMs = Math.round(tree.criuRestoreMs);
      phases.criuChecksMs = Math.round(tree.checksMs);
      phases.adoptMs = Math.round(tree.adoptMs);
      at.criuEnd = Date.now();
      const mappedFiles = await mappedReads.settled();

      // --- CUDA restore seam: cuda-checkpoint restore + unlock of the restored tree goes here. ---
      if (o.cudaRestore) {
        const t2 = performance.now();
        try {
          await orFillFailure(o.cudaRestore(tree, ctx));
        } catch (err) {
          if (isThawError(err, RestoreErrorCode.MEMORY_FILL)) throw err;
          throw new RestoreError(RestoreErrorCode.DEVICES, errorMessage(err), { step: 'cuda restore', cause: err });
        }
        phases.cudaRestoreMs = Math.round(performance.now() - t2);
        at.cudaRestoreEnd = Date.now();
      }

      if (job.weights !== undefined) {
        const tw = performance.now();
        const loaded = await job.weights.loaded;
        phases.weightsWaitMs = Math.round(performance.now() - tw);
        const t3 = performance.now();
        const loadMs = (job.weights.endedAt ?? Date.now()) - job.weights.startedAt;
        weightsInfo = { bytes: loaded.bytes, loadMs, setupMs: loaded.setupMs, copyMs: loaded.copyMs, readers: job.weights.readers, mbPerS: loadMs > 0 ? Math.round(loaded.bytes / 1e3 / loadMs) : 0, order: job.weights.order, readWaitMs: loaded.readWaitMs };
        await orFillFailure(handOverWeights(tree, container.controlDir, loaded, signal));
        at.weightsHandedOver = Date.now();
        phases.weightsHandoverMs = Math.round(performance.now() - t3);
      }
      if (fill !== undefined) {
        // Every page in before the tree runs its own code: the uffds close with the filler, nothing is left to fault.
        const tf = performance.now();
        fillInfo = { by: 'thaw-fill', ...(await fill.done) };
        phases.memoryFillWaitMs = Math.round(performance.now() - tf);
        at.memoryFilled = Date.now();
      }

      holding?.stop();
      try {
        process.kill(pid, 'SIGUSR1'); // thaw-pause adopts its only child, the restored root
      } catch (err) {
        throw new RestoreError(RestoreErrorCode.TARGET_GONE, `cannot signal the placeholder ${pid}: ${errorMessage(err)}`, { step: 'adopt', cause: err });
      }
      // Before restore-complete: the worker that wakes on it never sees the originals the diff replaced.
      await discardHookUndo(container.containerId, pid);
      await writeMarker(container.controlDir, 'restore-complete', { checkpoint: checkpoint.name, restoredAt: new Date().toISOString() });
      const e = event({ outcome: 'restored', restoredPid: tree.hostPid, bytes: checkpoint.manifest.totals.bytes, ...(digests ? { digests } : {}), ...(mappedFiles ? { mappedFiles } : {}), ...(weightsInfo ? { weights: weightsInfo } : {}), ...(fillInfo ? { memoryFill: fillInfo } : {}) });
      logger.info('restore', { ...e, criuOptions: tree.options, criuLog: tree.logPath, cgroupsJoined: tree.cgroupsJoined.length });
      o.onEvent?.(e);
    } catch (err) {
      const cause = isThawError(err) ? err.code : RestoreErrorCode.INTERNAL;
      const reason = errorMessage(err);
      holding?.stop(); // the fallback's SIGUSR2 is the last word
      // Before the fallback's event: a pod created right after it already finds the mark.
      if (isCheckpointFault(cause, hook)) await markCheckpointFailed(job, cause, reason);
      await fallBackToColdStart({
        container,
        pid,
        cause,
        reason,
        hook,
        overlayMounted,
        ...(tree !== undefined ? { restoredPid: tree.hostPid } : {}),
        error: err,
        event: () => event({ outcome: 'fallback', cause, reason }),
      });
    } finally {
      // thaw's own handles and allocations go: the worker holds its imported ones (or was killed).
      job.weights?.dispose();
      if (rootFd !== undefined) closeSync(rootFd);
      // After the fallback killed the tree (never before: see memory-fill.ts); a filler that is done has exited.
      fill?.stop();
    }
  }

  /**
   * Starts thaw-fill for this restore when the agent has it and the checkpoint has a plan. Any problem here
   * changes nothing yet: CRIU then fills the memory itself, and the event says why.
   */
  async function startFill(job: RestoreJob, workDir: string): Promise<{ fill?: RunningFill; info?: RestoreEvent['memoryFill'] }> {
    // Compressed pages are in no image CRIU reads: without thaw-fill they would restore as zeros, so such a
    // checkpoint falls back instead (compressed-pages.ts). Its verified manifest says so (schema 2 lists the frames).
    const compressed = job.checkpoint.manifest.schemaVersion === MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES;
    const required = (reason: string, cause?: unknown): RestoreError =>
      new RestoreError(RestoreErrorCode.MEMORY_FILL_REQUIRED, `the checkpoint's pages are compressed and only thaw-fill places them: ${reason}`, { step: 'start the memory fill', ...(cause !== undefined ? { cause } : {}) });
    if (o.memoryFill === undefined || job.fillPlan === undefined) {
      if (compressed) throw required('this agent restores without thaw-fill (restore.memoryFill criu, thaw-fill not built, or no lazy pages in CRIU or the kernel)');
      return {};
    }
    const plan = await job.fillPlan;
    if ('none' in plan) {
      if (compressed) throw required(plan.none);
      return { info: { by: 'criu', reason: plan.none } };
    }
    if (compressed && !('planFile' in plan)) throw required(`the checkpoint has no stored plan (${FILL_PLAN_IMAGE})`);
    try {
      return { fill: await startMemoryFill({ binary: o.memoryFill.binary, workDir, source: plan, threads: o.memoryFill.threads, timeoutMs: o.memoryFill.timeoutMs }) };
    } catch (err) {
      if (compressed) throw required(`thaw-fill did not start: ${errorMessage(err)}`, err);
      logger.warn('thaw-fill did not start: CRIU fills the memory of this restore', { checkpoint: job.checkpoint.name, error: errorMessage(err) });
      return { info: { by: 'criu', reason: `thaw-fill did not start: ${errorMessage(err)}` } };
    }
  }

  /**
   * Hands the loaded weights to the restored worker: weights.sock in its control dir, served only to a pid of
   * the restored tree, and the worker's answer awaited (it maps all regions or none). Any failure throws a
   * WeightsError: the caller falls back, killing the restored tree, so nothing half-mapped survives.
   */
  async function handOverWeights(tree: RestoredTree, controlDir: string, loaded: LoadedWeights, signal: AbortSignal): Promise<void> {
    const timeoutMs = o.weights?.handoverTimeoutMs ?? DEFAULT_WEIGHTS_HANDOVER_TIMEOUT_MS;
    const handover = await listenForWorker(controlDir, loaded.regions, async (peer) => (await processTree('/proc', tree.hostPid).catch((): number[] => [])).includes(peer), {
      awaitAnswer: { timeoutMs },
    });
    const timer = new AbortController();
    try {
      const { answer } = await Promise.race([
        handover.delivered,
        sleep(timeoutMs, undefined, { signal: timer.signal }).then(() => {
          throw new WeightsError(WeightsErrorCode.HANDOVER, `the restored worker did not take its weights within ${timeoutMs} ms`, { step: 'hand the weights to the worker' });
        }),
        new Promise<never>((_, reject) => signal.addEventListener('abort', () => reject(new RestoreError(RestoreErrorCode.ABORTED, 'the container went away', { step: 'hand the weights to the worker' })), { once: true, signal: timer.signal })),
      ]);
      if (answer === undefined || !answer.ok) {
        throw new WeightsError(WeightsErrorCode.IMPORT, `the restored worker could not map its weights: ${answer?.error ?? 'no answer'}`, { step: 'hand the weights to the worker', evidence: { answer } });
      }
    } finally {
      timer.abort();
      await handover.close();
    }
  }

  /**
   * Whether PID 1 of the target still runs thaw-pause (the same file as the host's; in overlay mode it is mounted
   * over the entrypoint, so the inode tells, not the name). Unknown (/proc unreadable: the process is gone):
   * assumed to (the step that needs it then fails on its own).
   */
  function placeholderRuns(pid: number): boolean {
    try {
      const exe = statSync(`/proc/${pid}/exe`);
      const pause = statSync(o.thawPausePath);
      return exe.dev === pause.dev && exe.ino === pause.ino;
    } catch {
      return true;
    }
  }

  /** Resolves once PID 1 runs thaw-pause (placeholderRuns); RESTORE_PLACEHOLDER_NOT_STARTED past PLACEHOLDER_EXEC_WAIT_MS. */
  async function waitForPlaceholder(pid: number, signal: AbortSignal): Promise<void> {
    const deadline = performance.now() + PLACEHOLDER_EXEC_WAIT_MS;
    for (let n = 0; !placeholderRuns(pid); n++) {
      if (signal.aborted) throw new RestoreError(RestoreErrorCode.ABORTED, 'the container went away', { step: 'wait for the placeholder' });
      if (performance.now() > deadline) {
        throw new RestoreError(RestoreErrorCode.PLACEHOLDER_NOT_STARTED, `PID 1 (${pid}) does not run thaw-pause ${PLACEHOLDER_EXEC_WAIT_MS} ms after the container started`, { step: 'wait for the placeholder', evidence: { pid } });
      }
      // The exec takes microseconds to milliseconds: look often at first.
      await sleep(Math.min(20, 1 + n));
    }
  }

  /** Whether PID 1 is still runc's init (its comm `runc:[2:INIT]`), before the exec of the container's process. */
  function runtimeInitPending(pid: number): boolean {
    try {
      return readFileSync(`/proc/${pid}/comm`, 'utf8').startsWith('runc:[');
    } catch {
      return false;
    }
  }

  async function recover(container: RestoreTarget, pid: number): Promise<void> {
    const outcome = await firstMarker(container.controlDir);
    if (outcome !== undefined) return; // finished before the restart: restored, or fallen back
    const event = (cause: string, reason: string): RestoreEvent => ({
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
    });
    const hookSeen = await o.hookRecords.readHookOutcome(container.controlDir);
    // A start told by the poststart hook may come before PID 1's exec is done: while it is still the runtime's init,
    // nothing can be told yet (a thaw-pause that fell back by itself runs the original command, not the init).
    const until = performance.now() + PLACEHOLDER_EXEC_WAIT_MS;
    while (hookSeen.kind === 'done' && runtimeInitPending(pid) && performance.now() < until) await sleep(2);
    if (hookSeen.kind === 'done' && !placeholderRuns(pid)) {
      // thaw-pause's deadline ran out while no agent was there: it exec'd the original command itself. Its
      // process is the pod's own now: no signal, no undo under it, no write into its control directory.
      const e = event(RestoreErrorCode.PLACEHOLDER_DEADLINE, 'thaw-pause fell back by itself (no word from the agent within its deadline); the original command runs');
      o.fallbacks?.countFallback(RestoreErrorCode.PLACEHOLDER_DEADLINE);
      logger.warn('restore', { ...e });
      o.onEvent?.(e);
      return;
    }
    const cause = RestoreErrorCode.AGENT_RESTARTED;
    const reason = 'the agent restarted while this container waited for its restore';
    const hook = hookSeen;
    await fallBackToColdStart({
      container,
      pid,
      cause,
      reason,
      hook,
      overlayMounted: hook.kind === 'done' && hook.record.mode === 'overlay',
      event: () => event(cause, reason),
    });
  }

  return { prepare, run, recover };
}
