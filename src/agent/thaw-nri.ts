/**
 * thaw's NRI handlers: the adjustment policy (src/nri-plugin/policy.ts) turned into container adjustments,
 * and the hand-off of checkpoint sources and restore targets to whoever runs the flows (the engine).
 *
 * Contract with the runtime (nri-protocol.md §5.4): CreateContainer must answer within the request timeout
 * (2 s by default) and an error status would fail the pod, so every handler here is fast (a mkdir at most)
 * and never throws: any problem leaves the container as it is and is logged and counted with its cause.
 */
import { AdjustmentBuilder } from '../nri-plugin/adjustment.js';
import type { NriHandlerContext, NriHandlers } from '../nri-plugin/plugin.js';
import {
  CHECKPOINT_ENV,
  CONTROL_DIR_ENV,
  CONTROL_DIR_MOUNT_PATH,
  decide,
  LEGACY_CONTROL_DIR_ENV,
  type OnCheckpoint,
  type PolicyDecision,
} from '../nri-plugin/policy.js';
import { ContainerState, type Container, type PodSandbox } from '../nri-plugin/nri-types.js';
import { createControlDir, removeControlDir } from '../sdk/control-dir.js';
import { errorMessage, isThawError } from '../errors.js';
import { supportsArgs } from '../nri-plugin/runtime-version.js';
import type { LocalStore, OpenedCheckpoint } from '../store/local-store.js';
import { StoreErrorCode } from '../store/errors.js';
import { readHostFacts } from '../store/host-facts.js';
import { checkCompatibility, isRestorable, type GpuConstraints, type NodeFacts } from '../store/manifest.js';
import { dirname, join } from 'node:path';
import type { CheckpointReference } from '../checkpoint-reference.js';
import type { CheckpointSources } from './checkpoint-sources.js';
import { checkpointRefusal, defaultTenancyPolicy, localRestoreRefusal, type TenancyPolicy } from './tenancy.js';

/** What the handlers know about a container thaw manages, handed to the flows. */
export interface ManagedContainer {
  containerId: string;
  containerName: string;
  podId: string;
  podName: string;
  podNamespace: string;
  podUid: string;
  checkpointName: string;
  /** Host path of the control directory (mounted at /snapshot-control in the container). */
  controlDir: string;
  /** The container's image as containerd names it in the spec's annotations, when present. */
  imageRef?: string;
  /** Checkpoint sources: what the worker does after its checkpoint (the pod's on-checkpoint annotation). */
  onCheckpoint?: OnCheckpoint;
  /** What thaw made of it (absent: checkpoint-source, for entries made before roles existed). */
  role?: 'checkpoint-source' | 'restore-target';
  /** Restore targets: how thaw-pause holds the original command (NRI args, or the createRuntime overlay). */
  placeholder?: 'args' | 'overlay';
  /**
   * Checkpoint sources: the process args of the container's spec as NRI gave them at CreateContainer (the
   * Kubernetes command and args, resolved by the runtime). Recorded in the manifest; a restore target's must be
   * the same. Not rebuilt after an agent restart (then the manifest records none, and the restore refuses it).
   */
  specArgs?: string[];
}

/**
 * The flows behind the plugin. The handlers call these without awaiting anything slow: a coordinator starts
 * its work in the background and returns.
 */
export interface ThawCoordinator {
  /**
   * A pod sandbox that names a local checkpoint to restore was created: start reading it into the page cache
   * (its container comes later: after image pulls, kubelet's work, CreateContainer).
   */
  restorePodCreated?(podId: string, checkpointName: string): void;
  /** A pod sandbox stopped or was removed: stop what was started for it at restorePodCreated. */
  podGone?(podId: string): void;
  /** A checkpoint source was created: watch its control directory. */
  checkpointSourceCreated?(container: ManagedContainer): void;
  /** A checkpoint source started: its pid is known. */
  checkpointSourceStarted?(container: ManagedContainer, pid: number): void;
  /**
   * A restore target was created (thaw-pause holds its command): start verifying/prefetching the checkpoint.
   * `incoming`: the checkpoint is still being pulled (or copied from the shared store) into the local store;
   * the restore waits for it, and its failure is a cold start.
   */
  restoreTargetCreated?(container: ManagedContainer, checkpoint: OpenedCheckpoint, incoming?: Promise<OpenedCheckpoint>): void;
  /** A restore target started: restore into it (pid = its PID 1, thaw-pause, on the host). */
  restoreTargetStarted?(container: ManagedContainer, pid: number): void;
  /** A managed container stopped or was removed: abandon what runs for it. */
  containerGone?(containerId: string): void;
  /** A managed container found running at NRI Synchronize (the agent restarted, or containerd did). */
  containerRecovered?(container: ManagedContainer, pid: number): void;
}

/** What the restore branch needs; without it a restore target cold-starts ("restore-unavailable"). */
export interface ThawRestoreConfig {
  store: LocalStore;
  /** Where else checkpoints come from (shared store, registries); absent: the local store only. */
  sources?: CheckpointSources;
  /** The toolkit prefix (CRIU, GNU tar, gzip, busybox), mounted read-only at the same path in the target. */
  toolkitDir: string;
  /** Host path of thaw-pause; its directory is mounted read-only at the same path in the target. */
  thawPausePath: string;
  /** argv that runs src/oci-hooks/main.js (absolute paths: hooks get no PATH), e.g. [node, .../main.js]. */
  hookArgv: string[];
  /** GNU tar for the rootfs diff (default: the toolkit's bin/tar). */
  tarPath?: string;
  /** Where the coordinator puts CRIU work dirs (`<workRoot>/<container id>`); the poststop hook removes them. */
  workRoot: string;
  /** This node's facts (default readHostFacts()). */
  hostFacts?: Pick<NodeFacts, 'arch' | 'kernelRelease'>;
  /** This node's GPUs (src/cuda gpuFacts); absent: no GPU, and a checkpoint that needs one is refused. */
  gpuFacts?: GpuConstraints;
  /** The createRuntime hook's timeout (the rootfs diff of a large layer). */
  hookTimeoutSeconds?: number;
}

export const DEFAULT_RESTORE_HOOK_TIMEOUT_SECONDS = 60;
/** Fallback causes that are the tenancy policy's refusals (counted per namespace for /metrics). */
const TENANCY_CAUSES: ReadonlySet<string> = new Set(['RESTORE_NOT_ALLOWED', 'RESTORE_SIGNATURE', 'RESTORE_NO_ROOM']);
/** Of the hook's timeout, what a hook waiting for a pulled checkpoint leaves itself to apply the rootfs diff. */
export const HOOK_WAIT_RESERVE_SECONDS = 15;

/** Counters of what the handlers decided, by outcome and cause, for logs, tests and /metrics. */
export class ThawNriStats {
  readonly decisions = new Map<PolicyDecision['kind'], number>();
  readonly rejectionsByAnnotation = new Map<string, number>();
  readonly fallbacksByCause = new Map<string, number>();
  /** Restore targets left cold at CreateContainer (never adjusted, so no restore event follows), by cause. */
  readonly restoreFallbacksAtCreate = new Map<string, number>();
  /** Restore targets the tenancy policy refused (cause RESTORE_NOT_ALLOWED, _SIGNATURE, _NO_ROOM), by `namespace cause`. */
  readonly tenancyRefusals = new Map<string, number>();

  countDecision(kind: PolicyDecision['kind']): void {
    this.decisions.set(kind, (this.decisions.get(kind) ?? 0) + 1);
  }
  countRejection(annotation: string): void {
    this.rejectionsByAnnotation.set(annotation, (this.rejectionsByAnnotation.get(annotation) ?? 0) + 1);
  }
  countFallback(cause: string): void {
    this.fallbacksByCause.set(cause, (this.fallbacksByCause.get(cause) ?? 0) + 1);
  }
  countTenancyRefusal(namespace: string, cause: string): void {
    const key = `${namespace} ${cause}`;
    this.tenancyRefusals.set(key, (this.tenancyRefusals.get(key) ?? 0) + 1);
  }
  countRestoreFallbackAtCreate(cause: string): void {
    this.countFallback(cause);
    this.restoreFallbacksAtCreate.set(cause, (this.restoreFallbacksAtCreate.get(cause) ?? 0) + 1);
  }
}

export interface ThawNriOptions {
  annotationPrefix: string;
  /** Host root of per-container control directories (default /run/thaw/control). */
  controlRoot: string;
  coordinator?: ThawCoordinator;
  stats?: ThawNriStats;
  restore?: ThawRestoreConfig;
  /** Who may checkpoint and restore what (agent config `tenancy`); absent: defaultTenancyPolicy(). */
  tenancy?: TenancyPolicy;
}

/** containerd's CRI plugin records the image of a container in this spec annotation. */
const CRI_IMAGE_NAME_ANNOTATION = 'io.kubernetes.cri.image-name';

/** The annotations thaw sets on containers it manages (under the configured prefix). */
export function managedAnnotations(prefix: string, role: 'checkpoint-source' | 'restore-target', container: ManagedContainer): Record<string, string> {
  return {
    [`${prefix}role`]: role,
    [`${prefix}checkpoint-name`]: container.checkpointName,
    [`${prefix}control-dir`]: container.controlDir,
    ...(container.placeholder ? { [`${prefix}placeholder`]: container.placeholder } : {}),
    ...(container.onCheckpoint ? { [`${prefix}on-checkpoint`]: container.onCheckpoint } : {}),
  };
}

/** The identity part of a ManagedContainer, from NRI's pod and container. */
function identityOf(pod: PodSandbox, container: Container): Pick<ManagedContainer, 'containerId' | 'containerName' | 'podId' | 'podName' | 'podNamespace' | 'podUid'> {
  return {
    containerId: container.id ?? '',
    containerName: container.name ?? '',
    podId: pod.id ?? container.podSandboxId ?? '',
    podName: pod.name ?? '',
    podNamespace: pod.namespace ?? '',
    podUid: pod.uid ?? '',
  };
}

/**
 * What thaw knew of a container it adjusted, rebuilt from the annotations it set on it (managedAnnotations):
 * how an agent that restarted learns its containers back from NRI Synchronize. Undefined for containers thaw
 * did not adjust, or whose annotations do not read back as thaw's.
 */
export function managedFromContainer(prefix: string, pod: PodSandbox, container: Container): ManagedContainer | undefined {
  const a = container.annotations ?? {};
  const role = a[`${prefix}role`];
  const checkpointName = a[`${prefix}checkpoint-name`];
  const controlDir = a[`${prefix}control-dir`];
  if ((role !== 'checkpoint-source' && role !== 'restore-target') || !checkpointName || !controlDir || !container.id) return undefined;
  const placeholder = a[`${prefix}placeholder`];
  const onCheckpoint = a[`${prefix}on-checkpoint`];
  return {
    ...identityOf(pod, container),
    checkpointName,
    controlDir,
    role,
    ...(a[CRI_IMAGE_NAME_ANNOTATION] ? { imageRef: a[CRI_IMAGE_NAME_ANNOTATION] } : {}),
    ...(placeholder === 'args' || placeholder === 'overlay' ? { placeholder } : {}),
    ...(onCheckpoint === 'continue' || onCheckpoint === 'exit' ? { onCheckpoint } : {}),
  };
}

export function createThawNriHandlers(options: ThawNriOptions): NriHandlers & { stats: ThawNriStats; managed: Map<string, ManagedContainer> } {
  const stats = options.stats ?? new ThawNriStats();
  const managed = new Map<string, ManagedContainer>();
  const prefix = options.annotationPrefix;
  const tenancy = options.tenancy ?? defaultTenancyPolicy();
  /**
   * Per restore target (container id): its interest in the transfer its checkpoint's find started or joined,
   * with its pod. Aborted when the container or its pod goes, or when the target cold-starts after all: the
   * last abort cancels the transfer (checkpoint-sources.ts).
   */
  const interests = new Map<string, { podId: string; controller: AbortController }>();
  const dropInterest = (containerId: string): void => {
    const i = interests.get(containerId);
    if (i === undefined) return;
    interests.delete(containerId);
    i.controller.abort(new Error('the restore target is gone'));
  };

  const describe = (pod: PodSandbox, container: Container): Record<string, unknown> => ({
    pod: `${pod.namespace ?? ''}/${pod.name ?? ''}`,
    container: container.name,
    containerId: container.id,
  });

  async function adjustCheckpointSource(
    pod: PodSandbox,
    container: Container,
    checkpointName: string,
    onCheckpoint: OnCheckpoint,
    ctx: NriHandlerContext,
  ): Promise<AdjustmentBuilder | undefined> {
    const containerId = container.id ?? '';
    const refusal = checkpointRefusal(tenancy, pod.namespace ?? '');
    if (refusal !== undefined) {
      stats.countFallback('checkpoint-not-allowed');
      ctx.logger.warn('thaw: the policy refuses checkpoints of this pod; the container runs without thaw', { ...describe(pod, container), checkpoint: checkpointName, reason: refusal });
      return undefined;
    }
    let controlDir: string;
    try {
      controlDir = await createControlDir(options.controlRoot, containerId);
    } catch (err) {
      stats.countFallback('control-dir');
      ctx.logger.error('thaw: cannot create the control directory; the container runs without thaw', {
        ...describe(pod, container),
        error: err,
      });
      return undefined;
    }
    const entry: ManagedContainer = {
      ...identityOf(pod, container),
      checkpointName,
      onCheckpoint,
      controlDir,
      ...(container.annotations?.[CRI_IMAGE_NAME_ANNOTATION] ? { imageRef: container.annotations[CRI_IMAGE_NAME_ANNOTATION] } : {}),
      role: 'checkpoint-source',
      ...(container.args !== undefined && container.args.length > 0 ? { specArgs: [...container.args] } : {}),
    };
    const existingEnv = new Set((container.env ?? []).map((kv) => kv.slice(0, Math.max(0, kv.indexOf('=')))));
    const builder = new AdjustmentBuilder()
      .addMount({ destination: CONTROL_DIR_MOUNT_PATH, source: controlDir, type: 'bind', options: ['rbind', 'rw'] })
      .addEnv(CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH)
      .addEnv(LEGACY_CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH);
    // The pod's own settings win: a platform team that set NCCL_SOCKET_IFNAME knows why.
    for (const [key, value] of CHECKPOINT_ENV) if (!existingEnv.has(key)) builder.addEnv(key, value);
    for (const [key, value] of Object.entries(managedAnnotations(prefix, 'checkpoint-source', entry))) builder.addAnnotation(key, value);
    managed.set(containerId, entry);
    options.coordinator?.checkpointSourceCreated?.(entry);
    ctx.logger.info('thaw: checkpoint source', { ...describe(pod, container), checkpoint: checkpointName, controlDir });
    return builder;
  }

  /** Restore fallbacks decided here, before the container exists: no adjustment, the pod starts cold. */
  const coldStart = (cause: string, message: string, pod: PodSandbox, container: Container, ctx: NriHandlerContext, extra: Record<string, unknown>): undefined => {
    stats.countRestoreFallbackAtCreate(cause);
    if (TENANCY_CAUSES.has(cause)) stats.countTenancyRefusal(pod.namespace ?? '', cause);
    ctx.logger.warn(`thaw: ${message}; cold start`, { ...describe(pod, container), event: 'restore', outcome: 'fallback', cause, ...extra });
    return undefined;
  };

  async function adjustRestoreTarget(
    r: ThawRestoreConfig,
    pod: PodSandbox,
    container: Container,
    checkpointName: string,
    reference: CheckpointReference | undefined,
    ctx: NriHandlerContext,
  ): Promise<AdjustmentBuilder | undefined> {
    const containerId = container.id ?? '';
    // Only the manifest here (a small JSON file): the full sha256 runs in the coordinator, after the 2 s deadline.
    // A checkpoint from elsewhere (registry, shared store): its manifest now, the transfer in the background.
    const namespace = pod.namespace ?? '';
    const interest = new AbortController();
    interests.set(containerId, { podId: pod.id ?? container.podSandboxId ?? '', controller: interest });
    const adjusted = await adjustRestoreTargetWith(r, pod, container, checkpointName, reference, ctx, namespace, interest.signal);
    // Cold start after all: this pod no longer wants a transfer it may have started.
    if (adjusted === undefined) dropInterest(containerId);
    return adjusted;
  }

  async function adjustRestoreTargetWith(
    r: ThawRestoreConfig,
    pod: PodSandbox,
    container: Container,
    checkpointName: string,
    reference: CheckpointReference | undefined,
    ctx: NriHandlerContext,
    namespace: string,
    interest: AbortSignal,
  ): Promise<AdjustmentBuilder | undefined> {
    const containerId = container.id ?? '';
    let checkpoint: OpenedCheckpoint;
    let incoming: { ready: Promise<OpenedCheckpoint>; from: string; source: string } | undefined;
    try {
      if (r.sources !== undefined) {
        const found = await r.sources.find(checkpointName, reference, { namespace, interest });
        checkpoint = found.checkpoint;
        if (found.kind === 'incoming') incoming = { ready: found.ready, from: found.from, source: found.source };
      } else if (reference !== undefined) {
        return coldStart('RESTORE_CHECKPOINT_MISSING', 'the pod names a registry checkpoint but no registry is configured', pod, container, ctx, { checkpoint: checkpointName });
      } else {
        checkpoint = await r.store.open(checkpointName);
        const refusal = localRestoreRefusal(tenancy, namespace, { namespace: checkpoint.manifest.source.pod?.namespace, name: checkpoint.name });
        if (refusal !== undefined) return coldStart('RESTORE_NOT_ALLOWED', refusal, pod, container, ctx, { checkpoint: checkpointName, namespace });
      }
    } catch (err) {
      const missing = isThawError(err, StoreErrorCode.NOT_FOUND) || isThawError(err, StoreErrorCode.INVALID_NAME);
      const notAllowed = isThawError(err, 'RESTORE_NOT_ALLOWED') || isThawError(err, 'OCI_NOT_ALLOWED');
      const unsigned = isThawError(err, 'OCI_SIGNATURE_MISSING') || isThawError(err, 'OCI_SIGNATURE_INVALID');
      const noRoom = isThawError(err, 'RESTORE_NO_ROOM');
      const remote = isThawError(err) && err.code.startsWith('OCI_');
      const cause = notAllowed ? 'RESTORE_NOT_ALLOWED' : unsigned ? 'RESTORE_SIGNATURE' : noRoom ? 'RESTORE_NO_ROOM' : remote ? 'RESTORE_PULL_FAILED' : missing ? 'RESTORE_CHECKPOINT_MISSING' : 'RESTORE_CHECKPOINT_CORRUPT';
      const what = notAllowed
        ? 'the tenancy policy refuses this checkpoint to the pod'
        : unsigned
          ? 'the registry checkpoint has no signature the policy accepts'
          : noRoom
            ? 'the checkpoint does not fit the store (free space or quota)'
          : remote
            ? 'the registry checkpoint cannot be resolved'
            : missing
              ? 'checkpoint not found'
              : 'checkpoint unreadable';
      return coldStart(cause, what, pod, container, ctx, {
        checkpoint: checkpointName,
        error: errorMessage(err),
        ...(isThawError(err) ? { code: err.code, evidence: err.evidence } : {}),
      });
    }
    if (incoming !== undefined && (reference !== undefined || checkpoint.name !== checkpointName)) {
      ctx.logger.info('thaw: restore target names a checkpoint that is being brought in', { ...describe(pod, container), checkpoint: checkpoint.name, from: incoming.from, source: incoming.source });
    }
    const imageRef = container.annotations?.[CRI_IMAGE_NAME_ANNOTATION];
    if (imageRef === undefined) {
      return coldStart('RESTORE_INCOMPATIBLE', `the container has no ${CRI_IMAGE_NAME_ANNOTATION} annotation to compare with the checkpoint's image`, pod, container, ctx, {
        checkpoint: checkpointName,
      });
    }
    const imageDigest = container.image?.digest;
    const mismatches = checkCompatibility(checkpoint.manifest, {
      ...(r.hostFacts ?? readHostFacts()),
      image: { ref: imageRef, ...(imageDigest !== undefined && /^sha256:[0-9a-f]{64}$/.test(imageDigest) ? { digest: imageDigest } : {}) },
      ...(r.gpuFacts !== undefined ? { gpu: r.gpuFacts } : {}),
      container: { name: container.name ?? '', args: container.args ?? [] },
    });
    if (!isRestorable(mismatches)) {
      return coldStart('RESTORE_INCOMPATIBLE', 'the checkpoint does not match this node or container', pod, container, ctx, {
        checkpoint: checkpointName,
        mismatches,
      });
    }
    const args = container.args ?? [];
    if (args.length === 0 || !args[0]) {
      return coldStart('RESTORE_INCOMPATIBLE', 'the container has no args to hold behind thaw-pause', pod, container, ctx, { checkpoint: checkpointName });
    }
    let controlDir: string;
    try {
      controlDir = await createControlDir(options.controlRoot, containerId);
    } catch (err) {
      return coldStart('control-dir', 'cannot create the control directory', pod, container, ctx, { error: errorMessage(err) });
    }
    const placeholder = supportsArgs(ctx.runtime.name, ctx.runtime.version, ctx.runtime.nriVersion) ? 'args' : 'overlay';
    const entry: ManagedContainer = {
      ...identityOf(pod, container),
      // The local name: for a registry checkpoint, the one derived from its digest.
      checkpointName: checkpoint.name,
      controlDir,
      imageRef,
      role: 'restore-target',
      placeholder,
    };
    const existingEnv = new Set((container.env ?? []).map((kv) => kv.slice(0, Math.max(0, kv.indexOf('=')))));
    const pauseDir = dirname(r.thawPausePath);
    const hookTimeout = r.hookTimeoutSeconds ?? DEFAULT_RESTORE_HOOK_TIMEOUT_SECONDS;
    const builder = new AdjustmentBuilder()
      .addMount({ destination: r.toolkitDir, source: r.toolkitDir, type: 'bind', options: ['rbind', 'ro'] })
      .addMount({ destination: CONTROL_DIR_MOUNT_PATH, source: controlDir, type: 'bind', options: ['rbind', 'rw'] })
      .addEnv(CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH)
      .addEnv(LEGACY_CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH)
      .addHook('createRuntime', {
        path: r.hookArgv[0] as string,
        args: [
          ...r.hookArgv,
          'create-runtime',
          '--mode', placeholder,
          '--control-dir', controlDir,
          '--checkpoint-dir', checkpoint.paths.dir,
          '--thaw-pause', r.thawPausePath,
          '--tar', r.tarPath ?? join(r.toolkitDir, 'bin', 'tar'),
          // Being pulled: the hook waits for it to be published (the rootfs diff is in it).
          ...(incoming !== undefined ? ['--wait-checkpoint-ms', String(Math.max(1, hookTimeout - HOOK_WAIT_RESERVE_SECONDS) * 1000)] : []),
        ],
        env: [],
        timeoutSeconds: hookTimeout,
      })
      .addHook('poststop', {
        path: r.hookArgv[0] as string,
        args: [...r.hookArgv, 'poststop', '--control-dir', controlDir, '--work-dir', join(r.workRoot, containerId)],
        env: [],
        timeoutSeconds: hookTimeout,
      });
    // thaw-pause's directory, unless the toolkit mount already shows it at the same path.
    if (!pauseDir.startsWith(`${r.toolkitDir}/`)) builder.addMount({ destination: pauseDir, source: pauseDir, type: 'bind', options: ['rbind', 'ro'] });
    // The same environment as a source: a cold-started fallback then runs as the checkpointed worker did.
    for (const [key, value] of CHECKPOINT_ENV) if (!existingEnv.has(key)) builder.addEnv(key, value);
    for (const [key, value] of Object.entries(managedAnnotations(prefix, 'restore-target', entry))) builder.addAnnotation(key, value);
    if (placeholder === 'args') builder.setArgs([r.thawPausePath, '--', ...args]);
    managed.set(containerId, entry);
    options.coordinator?.restoreTargetCreated?.(entry, checkpoint, incoming?.ready);
    ctx.logger.info('thaw: restore target', { ...describe(pod, container), checkpoint: checkpoint.name, controlDir, placeholder, ...(incoming ? { incoming: incoming.from, source: incoming.source } : {}) });
    return builder;
  }

  return {
    stats,
    managed,

    runPodSandbox(pod, ctx) {
      try {
        // The container this pod's annotations pick is not created yet: decide for the one they name.
        const decision = decide(
          { podAnnotations: pod.annotations ?? {}, containerName: pod.annotations?.[`${prefix}container`] ?? '' },
          { annotationPrefix: prefix },
        );
        // Local checkpoints only: a registry checkpoint is resolved (and pulled) at CreateContainer.
        if (decision.kind !== 'restore-target' || decision.reference !== undefined || !options.restore || !pod.id) return;
        options.coordinator?.restorePodCreated?.(pod.id, decision.checkpointName);
        ctx.logger.debug('thaw: reading the checkpoint of a restore pod early', { pod: `${pod.namespace ?? ''}/${pod.name ?? ''}`, checkpoint: decision.checkpointName });
      } catch (err) {
        ctx.logger.warn('thaw: runPodSandbox handler failed', { pod: pod.id, error: errorMessage(err) });
      }
    },

    stopPodSandbox(pod) {
      if (!pod.id) return;
      for (const [id, i] of interests) if (i.podId === pod.id) dropInterest(id);
      options.coordinator?.podGone?.(pod.id);
    },

    removePodSandbox(pod) {
      if (!pod.id) return;
      for (const [id, i] of interests) if (i.podId === pod.id) dropInterest(id);
      options.coordinator?.podGone?.(pod.id);
    },

    async createContainer(pod, container, ctx) {
      const decision = decide(
        { podAnnotations: pod.annotations ?? {}, containerName: container.name ?? '' },
        { annotationPrefix: prefix },
      );
      stats.countDecision(decision.kind);
      try {
        switch (decision.kind) {
          case 'untouched':
          case 'other-container':
            return undefined;
          case 'rejected':
            stats.countRejection(decision.annotation);
            ctx.logger.warn('thaw: malformed annotation; the container is created unchanged', {
              ...describe(pod, container),
              annotation: decision.annotation,
              reason: decision.reason,
            });
            return undefined;
          case 'checkpoint-source':
            return await adjustCheckpointSource(pod, container, decision.checkpointName, decision.onCheckpoint, ctx);
          case 'restore-target':
            if (options.restore) return await adjustRestoreTarget(options.restore, pod, container, decision.checkpointName, decision.reference, ctx);
            // Without a restore engine configured, the pod cold-starts.
            stats.countRestoreFallbackAtCreate('restore-unavailable');
            ctx.logger.warn('thaw: restore requested but no restore engine is configured; cold start', {
              ...describe(pod, container),
              checkpoint: decision.checkpointName,
            });
            return undefined;
        }
      } catch (err) {
        // A bug here must not fail the pod: log it and leave the container as it is.
        stats.countFallback('internal-error');
        ctx.logger.error('thaw: createContainer handler failed; the container is created unchanged', {
          ...describe(pod, container),
          error: errorMessage(err),
        });
        return undefined;
      }
    },

    // After a (re)connection: learn back the containers thaw adjusted, and let the flows pick up what a
    // previous agent left unfinished (no pod may stay in its placeholder, no worker wait forever).
    synchronize(pods, containers, ctx) {
      const podsById = new Map(pods.map((p) => [p.id ?? '', p]));
      let recovered = 0;
      for (const container of containers) {
        const entry = managedFromContainer(prefix, podsById.get(container.podSandboxId ?? '') ?? {}, container);
        if (!entry) continue;
        if (!managed.has(entry.containerId)) managed.set(entry.containerId, entry);
        if (container.state === ContainerState.RUNNING && container.pid) {
          recovered++;
          options.coordinator?.containerRecovered?.(managed.get(entry.containerId)!, container.pid);
        }
      }
      if (recovered > 0) ctx.logger.info('thaw: containers found on (re)connection', { managed: managed.size, running: recovered });
    },

    postStartContainer(_pod, container) {
      const entry = managed.get(container.id ?? '');
      if (!entry || !container.pid) return;
      if (entry.role === 'restore-target') options.coordinator?.restoreTargetStarted?.(entry, container.pid);
      else options.coordinator?.checkpointSourceStarted?.(entry, container.pid);
    },

    async removeContainer(_pod, container, ctx) {
      const containerId = container.id ?? '';
      dropInterest(containerId);
      if (!managed.has(containerId)) return;
      managed.delete(containerId);
      options.coordinator?.containerGone?.(containerId);
      try {
        await removeControlDir(options.controlRoot, containerId);
      } catch (err) {
        ctx.logger.warn('thaw: cannot remove the control directory', { containerId, error: errorMessage(err) });
      }
    },
  };
}
