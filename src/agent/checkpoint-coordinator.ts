/**
 * The checkpoint side of thaw's `ThawCoordinator`: what runs after the NRI handlers saw a checkpoint source
 * start. For each such container it waits (in the background, never inside an NRI handler) for the worker's
 * ready marker, then runs the checkpoint flow (restore-engine/checkpoint.ts) and logs one structured event:
 *
 *   {"event":"checkpoint","id":<manifest id>,"name":..,"pod":"ns/name","container":..,"containerId":..,
 *    "outcome":"succeeded"|"failed"|"cancelled","phases":{..},"bytes":..,"error"?:{code,step,message,evidence}}
 *
 * Rules: one checkpoint at a time per container (a second start of the same container while one runs is
 * logged and ignored); containers in parallel, each with its own AbortController; `containerGone` aborts the
 * wait or the running checkpoint (CRIU is killed, nothing is published). The wait for the worker has no
 * timeout by default: a worker may take an hour to load its model. A status map per container is kept for
 * the control API (`status()`).
 */
import { errorMessage, isThawError } from '../errors.js';
import type { Logger } from '../log.js';
import {
  checkpointContainer,
  type CheckpointContainerOptions,
  type CheckpointCudaHooks,
  type CheckpointPhases,
  type CheckpointResult,
  type OnCheckpoint,
} from '../restore-engine/index.js';
import type { ContainerdEndpoint, CriuClient, SourceDigests } from '../restore-engine/index.js';
import { readReadyPayload, waitForWorkerReady } from '../sdk/index.js';
import type { LocalStore, StoreLimits } from '../store/index.js';
import { StoreError, StoreErrorCode } from '../store/index.js';
import { namespaceOfKey } from '../checkpoint-name.js';
import { gpuMemoryReport, type GpuMemoryReport } from './gpu-memory-report.js';
import type { ManagedContainer, ThawCoordinator } from './managed-container.js';

export type CheckpointJobState = 'waiting-for-worker' | 'checkpointing' | 'succeeded' | 'failed' | 'cancelled';

export interface CheckpointJobStatus {
  containerId: string;
  name: string;
  pod: string;
  container: string;
  pid: number;
  state: CheckpointJobState;
  /** ISO 8601 times. */
  startedAt: string;
  readyAt?: string;
  finishedAt?: string;
  /** The manifest id, once published. */
  id?: string;
  bytes?: number;
  phases?: CheckpointPhases;
  error?: Record<string, unknown>;
}

/** The structured event logged once per checkpoint attempt that ended. */
export interface CheckpointEvent {
  event: 'checkpoint';
  id?: string;
  /** The store key (`namespace/name`). */
  name: string;
  /** The namespace that owns the checkpoint. */
  namespace: string;
  pod: string;
  container: string;
  containerId: string;
  outcome: 'succeeded' | 'failed' | 'cancelled';
  phases?: CheckpointPhases;
  bytes?: number;
  /** GPU checkpoints: the GPU memory saved against the worker's tensors (and a warning when it is mostly cache). */
  gpuMemory?: GpuMemoryReport;
  error?: Record<string, unknown>;
}

export interface CheckpointCoordinatorOptions {
  store: LocalStore;
  criu: CriuClient;
  criuVersion: string;
  /** The runtime's version for the manifest; a function when it is learnt later (NRI Configure). */
  containerdVersion: string | (() => string);
  logger: Logger;
  /**
   * The pod's `on-checkpoint` (policy.ts); default 'continue'. ManagedContainer does not carry it yet, so
   * the agent passes a lookup (e.g. from the decision it made at CreateContainer).
   */
  onCheckpointOf?: (container: ManagedContainer) => OnCheckpoint;
  /** The image's digest (CRI ImageStatus) for the manifest; absent → the manifest has the ref only. */
  imageDigestOf?: (container: ManagedContainer, signal: AbortSignal) => Promise<string | undefined>;
  /** Give up waiting for ready-for-checkpoint after this long; default: wait until the container goes. */
  readyTimeoutMs?: number;
  /** Passed to the flow (default its DEFAULT_CHECKPOINT_TIMEOUT_MS). */
  checkpointTimeoutMs?: number;
  /** Replace an existing checkpoint of the same name (default false: STORE_EXISTS, the worker resumes). */
  replace?: boolean;
  /**
   * The CUDA steps around the dump: one hooks object for every checkpoint, or a factory called once per
   * checkpoint (hooks that record per-checkpoint facts, such as the GPU constraints, need their own).
   */
  cuda?: CheckpointCudaHooks | (() => CheckpointCudaHooks);
  workRoot?: string;
  /** The weights service's node-wide source digests: weights regions are recorded in the manifest (docs/weights.md). */
  weights?: { digests: SourceDigests };
  /** containerd's socket and root: the flow takes the container's upperdir from containerd's snapshot record. */
  containerd: ContainerdEndpoint;
  /** thaw-pack: checkpoints compress their lazy pages (CheckpointContainerOptions.compressPages). */
  compressPages?: CheckpointContainerOptions['compressPages'];
  /** Told of every event after it is logged (metrics, tests). */
  onEvent?: (event: CheckpointEvent) => void;
  /** The store's bounds: a checkpoint is refused before it is written when its expected size does not fit. */
  storeLimits?: StoreLimits;
  /** Test seam: the flow to run (default checkpointContainer). */
  runCheckpoint?: (opts: CheckpointContainerOptions, call: { signal?: AbortSignal; timeoutMs?: number }) => Promise<CheckpointResult>;
  now?: () => Date;
}

interface Job {
  controller: AbortController;
  status: CheckpointJobStatus;
  done: Promise<void>;
}

/** How a job starts: a source waits for its worker's ready marker; an on-demand checkpoint (control API) does not. */
interface RunMode {
  waitForReady: boolean;
  replace?: boolean;
}

export class CheckpointCoordinator implements ThawCoordinator {
  private readonly log: Logger;
  private readonly now: () => Date;
  /** Running jobs by container id. */
  private readonly running = new Map<string, Job>();
  /** The last status of every container seen (running or finished), for the control API. */
  private readonly statuses = new Map<string, CheckpointJobStatus>();

  constructor(private readonly options: CheckpointCoordinatorOptions) {
    this.log = options.logger.child({ component: 'checkpoint-coordinator' });
    this.now = options.now ?? (() => new Date());
  }

  /** NRI PostStartContainer of a checkpoint source: start watching its control dir. Returns at once. */
  checkpointSourceStarted(container: ManagedContainer, pid: number): void {
    this.start(container, pid, { waitForReady: true });
  }

  /**
   * The control API's Checkpoint of a running container: checkpoint it now, without waiting for a ready
   * marker (the container may not speak the worker protocol; CRIU freezes it for the dump and it goes on
   * running). False when a checkpoint of this container is already running (the caller follows that one).
   */
  checkpointNow(container: ManagedContainer, pid: number, options: { replace?: boolean } = {}): boolean {
    return this.start(container, pid, { waitForReady: false, ...(options.replace !== undefined ? { replace: options.replace } : {}) });
  }

  /** The running job of a container, resolved when it ends (undefined when none runs). */
  jobDone(containerId: string): Promise<void> | undefined {
    return this.running.get(containerId)?.done;
  }

  private start(container: ManagedContainer, pid: number, mode: RunMode): boolean {
    const id = container.containerId;
    if (this.running.has(id)) {
      this.log.warn('a checkpoint of this container is already in progress; ignoring the second start', { containerId: id, pid });
      return false;
    }
    const controller = new AbortController();
    const status: CheckpointJobStatus = {
      containerId: id,
      name: container.checkpointName,
      pod: `${container.podNamespace}/${container.podName}`,
      container: container.containerName,
      pid,
      state: 'waiting-for-worker',
      startedAt: this.now().toISOString(),
    };
    const job: Job = { controller, status, done: Promise.resolve() };
    this.running.set(id, job);
    this.statuses.set(id, status);
    // Fire and forget: the job never rejects (every outcome is logged and recorded), and removes itself.
    job.done = this.run(container, pid, job, mode).finally(() => {
      if (this.running.get(id) === job) this.running.delete(id);
    });
    return true;
  }

  /** The container stopped or was removed: abort its wait or its checkpoint. */
  containerGone(containerId: string): void {
    this.running.get(containerId)?.controller.abort(new Error(`container ${containerId} is gone`));
  }

  /** A copy of the status of one container, or of every container seen. */
  status(): CheckpointJobStatus[];
  status(containerId: string): CheckpointJobStatus | undefined;
  status(containerId?: string): CheckpointJobStatus[] | CheckpointJobStatus | undefined {
    if (containerId !== undefined) {
      const s = this.statuses.get(containerId);
      return s === undefined ? undefined : { ...s };
    }
    return [...this.statuses.values()].map((s) => ({ ...s }));
  }

  /** Resolves when no job runs (the jobs running now, and any they are replaced by, have ended). */
  async idle(): Promise<void> {
    while (this.running.size > 0) await Promise.all([...this.running.values()].map((j) => j.done));
  }

  /** Aborts every job and waits for them to end (agent shutdown). */
  async close(): Promise<void> {
    for (const job of this.running.values()) job.controller.abort(new Error('the agent is shutting down'));
    await this.idle();
  }

  private async run(container: ManagedContainer, pid: number, job: Job, mode: RunMode): Promise<void> {
    const { status, controller } = job;
    const signal = controller.signal;
    const log = this.log.child({ containerId: container.containerId, checkpoint: container.checkpointName });
    try {
      const marker = mode.waitForReady
        ? await waitForWorkerReady(container.controlDir, {
            signal,
            ...(this.options.readyTimeoutMs !== undefined ? { timeoutMs: this.options.readyTimeoutMs } : {}),
          })
        : 'on-demand';
      status.readyAt = this.now().toISOString();
      status.state = 'checkpointing';
      // What the worker says it holds (tensor and allocator bytes), set against what the checkpoint saves.
      // An on-demand checkpoint (control API) has no marker, so no payload.
      const readyPayload = marker === 'on-demand' ? undefined : await readReadyPayload(container.controlDir, marker).catch((err: unknown) => {
        log.warn('the ready marker has an unreadable payload; going on without it', { error: errorMessage(err) });
        return undefined;
      });
      log.info('worker is ready for its checkpoint', { marker, pid });
      const imageDigest = container.imageDigest ?? await this.options.imageDigestOf?.(container, signal).catch((err: unknown) => {
        log.warn('image digest unknown; the manifest records the image ref only', { error: errorMessage(err) });
        return undefined;
      });
      const o = this.options;
      const replace = mode.replace ?? (container.replaceCheckpoint === true ? true : o.replace);
      // The key is the pod's namespace's (its directory): replacing one replaces only that namespace's checkpoint.
      this.checkOwnNamespace(container);
      const cuda = typeof o.cuda === 'function' ? o.cuda() : o.cuda;
      const result = await (o.runCheckpoint ?? checkpointContainer)(
        {
          store: o.store,
          criu: o.criu,
          containerId: container.containerId,
          pid,
          controlDir: container.controlDir,
          checkpointName: container.checkpointName,
          containerd: o.containerd,
          ...(o.compressPages !== undefined ? { compressPages: o.compressPages } : {}),
          onCheckpoint: o.onCheckpointOf?.(container) ?? 'continue',
          imageRef: container.imageRef ?? '',
          ...(imageDigest !== undefined ? { imageDigest } : {}),
          ...(container.snapshot !== undefined ? { snapshot: container.snapshot } : {}),
          source: {
            containerName: container.containerName,
            pod: { name: container.podName, namespace: container.podNamespace, uid: container.podUid },
            // The spec's args (NRI CreateContainer): what a restore target's must equal (manifest.ts).
            ...(container.specArgs !== undefined ? { args: container.specArgs } : {}),
          },
          containerdVersion: typeof o.containerdVersion === 'function' ? o.containerdVersion() : o.containerdVersion,
          criuVersion: o.criuVersion,
          logger: o.logger,
          ...(replace !== undefined ? { replace } : {}),
          ...(cuda !== undefined ? { cuda } : {}),
          ...(o.workRoot !== undefined ? { workRoot: o.workRoot } : {}),
          ...(o.weights !== undefined ? { weights: o.weights } : {}),
          ...(o.storeLimits !== undefined
            ? { makeRoom: async (bytes: number) => void (await o.store.makeRoom(o.storeLimits!, { namespace: container.podNamespace, bytes, name: container.checkpointName })) }
            : {}),
        },
        { signal, ...(o.checkpointTimeoutMs !== undefined ? { timeoutMs: o.checkpointTimeoutMs } : {}) },
      );
      status.state = 'succeeded';
      status.id = result.manifest.id;
      status.bytes = result.manifest.totals.bytes;
      status.phases = result.phases;
      const gpuMemory = gpuMemoryReport(result.manifest.constraints?.gpu?.memoryBytes, readyPayload);
      if (gpuMemory?.warning !== undefined) log.warn('most of the GPU memory this checkpoint saved is unused allocator cache', { ...gpuMemory });
      this.finish(status, { id: result.manifest.id, outcome: 'succeeded', phases: result.phases, bytes: result.manifest.totals.bytes, ...(gpuMemory ? { gpuMemory } : {}) });
    } catch (err) {
      const cancelled = signal.aborted;
      status.state = cancelled ? 'cancelled' : 'failed';
      status.error = isThawError(err) ? err.toJSON() : { message: errorMessage(err) };
      // The flow puts the phases it finished into its error: how far it got is part of the evidence.
      const phases = isThawError(err) ? (err.evidence.phases as CheckpointPhases | undefined) : undefined;
      if (phases !== undefined) status.phases = phases;
      this.finish(status, { outcome: cancelled ? 'cancelled' : 'failed', error: status.error, ...(phases ? { phases } : {}) });
    }
  }

  /**
   * A checkpoint is written (and replaced) only under its pod's own namespace: a pod of team-a, or an
   * operator's request naming team-b/llm for it, must not put team-a's process where team-b's pods restore
   * from. Throws STORE_INVALID_NAME naming both namespaces.
   */
  private checkOwnNamespace(container: ManagedContainer): void {
    const owner = namespaceOfKey(container.checkpointName);
    if (owner !== container.podNamespace) {
      throw new StoreError(StoreErrorCode.INVALID_NAME, `checkpoint ${container.checkpointName} is not of namespace ${container.podNamespace}; a pod of ${container.podNamespace} checkpoints only into ${container.podNamespace}/`, {
        step: 'check the checkpoint name',
        evidence: { name: container.checkpointName, owner, namespace: container.podNamespace },
      });
    }
  }

  private finish(status: CheckpointJobStatus, fields: Pick<CheckpointEvent, 'outcome'> & Partial<CheckpointEvent>): void {
    status.finishedAt = this.now().toISOString();
    const event: CheckpointEvent = {
      event: 'checkpoint',
      name: status.name,
      namespace: namespaceOfKey(status.name) ?? '',
      pod: status.pod,
      container: status.container,
      containerId: status.containerId,
      ...fields,
    };
    if (fields.outcome === 'succeeded') this.log.info('checkpoint', { ...event });
    else if (fields.outcome === 'cancelled') this.log.warn('checkpoint', { ...event });
    else this.log.error('checkpoint', { ...event });
    try {
      this.options.onEvent?.(event);
    } catch (err) {
      this.log.warn('onEvent listener threw', { error: errorMessage(err) });
    }
  }
}
