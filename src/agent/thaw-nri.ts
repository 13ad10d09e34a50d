/**
 * thaw's NRI handlers: the adjustment policy (src/nri-plugin/policy.ts) turned into container adjustments,
 * and the hand-off of checkpoint sources and restore targets to whoever runs the flows (the engine).
 *
 * Contract with the runtime (nri-protocol.md §5.4): CreateContainer must answer within the request timeout
 * (2 s by default) and an error status would fail the pod, so every handler here is fast (a mkdir at most)
 * and never throws: any problem leaves the container as it is and is logged and counted with its cause.
 */
import { errorMessage } from '../errors.js';
import type { Container, NriHandlers, PodSandbox } from '../nri-plugin/index.js';
import { decide } from '../nri-plugin/index.js';
import { ContainerState } from '../nri-plugin/index.js';
import { removeControlDir } from '../sdk/index.js';
import { adjustCheckpointSource } from './checkpoint-source.js';
import { managedFromContainer, type ManagedContainer, type ThawCoordinator } from './managed-container.js';
import { describeContainer, dropInterest, type HandlerScope } from './nri-handler-scope.js';
import { defaultTenancyPolicy, localRestoreRefusal, restoreKeyOf, type TenancyPolicy } from './tenancy.js';
import { ThawNriStats } from './nri-stats.js';
import { adjustRestoreTarget, type ThawRestoreConfig } from './restore-target.js';
import { HandlerFallbackCause } from './errors.js';
import { adjustSnapshotContainer, type ThawSnapshotConfig } from './snapshot-target.js';

export interface ThawNriOptions {
  annotationPrefix: string;
  /** Host root of per-container control directories (default /run/thaw/control). */
  controlRoot: string;
  coordinator?: ThawCoordinator;
  stats?: ThawNriStats;
  restore?: ThawRestoreConfig;
  /** `thaw.dev/snapshot` pods (snapshot.ts); absent: they cold-start (AGENT_RESTORE_UNAVAILABLE). */
  snapshot?: ThawSnapshotConfig;
  /** Who may checkpoint and restore what (agent config `tenancy`); absent: defaultTenancyPolicy(). */
  tenancy?: TenancyPolicy;
  /**
   * With a start hook: watches a managed container, learnt back at Synchronize, created and without thaw's
   * poststart hook, until it runs (the engine asks containerd); `started` is then called with its pid.
   */
  watchStart?(containerId: string, started: (pid: number) => void): void;
}

/** Whether `container`'s spec has the poststart hook that tells this agent its start (thaw-hook --started on this socket). */
function hasStartHook(container: Container, hook: { path: string; socketPath: string }): boolean {
  return (container.hooks?.poststart ?? []).some((h) => h.path === hook.path && (h.args ?? []).includes('--started') && (h.args ?? []).includes(hook.socketPath));
}

/**
 * thaw's handlers, and `containerStarted`: a managed container's process runs (the poststart hook's word through
 * the hook server when the agent has a native hook; NRI PostStartContainer otherwise, the only case in which the
 * handlers include postStartContainer and so subscribe to it).
 */
export function createThawNriHandlers(
  options: ThawNriOptions,
): NriHandlers & { stats: ThawNriStats; managed: Map<string, ManagedContainer>; containerStarted(containerId: string, pid: number): void } {
  const stats = options.stats ?? new ThawNriStats();
  const managed = new Map<string, ManagedContainer>();
  const prefix = options.annotationPrefix;

  const scope: HandlerScope = {
    annotationPrefix: prefix,
    controlRoot: options.controlRoot,
    stats,
    managed,
    ...(options.coordinator ? { coordinator: options.coordinator } : {}),
    tenancy: options.tenancy ?? defaultTenancyPolicy(),
    interests: new Map(),
    ...(options.restore?.nativeHook !== undefined ? { startHook: { path: options.restore.nativeHook.path, socketPath: options.restore.nativeHook.server.socketPath } } : {}),
  };
  /** Managed containers whose start was handed on: a start is acted on once (the hook and a watch may both tell it). */
  const startedIds = new Set<string>();
  /** Hands a managed container's start to its flow; any other container's start is none of thaw's. */
  const containerStarted = (containerId: string, pid: number): void => {
    const entry = managed.get(containerId);
    if (!entry || !Number.isSafeInteger(pid) || pid <= 0 || startedIds.has(containerId)) return;
    startedIds.add(containerId);
    if (entry.role === 'restore-target') options.coordinator?.restoreTargetStarted?.(entry, pid);
    else options.coordinator?.checkpointSourceStarted?.(entry, pid);
  };
  /** A pod's restore targets no longer want their transfers. */
  const podLeft = (podId: string): void => {
    for (const [id, i] of scope.interests) if (i.podId === podId) dropInterest(scope, id);
  };
  const describe = describeContainer;

  return {
    stats,
    managed,
    containerStarted,
    // Without a start hook, NRI says when a container started (a synchronous event for every pod on the node).
    ...(scope.startHook === undefined ? { postStartContainer: (_pod: PodSandbox, container: Container) => containerStarted(container.id ?? '', container.pid ?? 0) } : {}),

    runPodSandbox(pod, ctx) {
      try {
        // The container this pod's annotations pick is not created yet: decide for the one they name.
        const decision = decide(
          { podAnnotations: pod.annotations ?? {}, containerName: pod.annotations?.[`${prefix}container`] ?? '' },
          { annotationPrefix: prefix },
        );
        // Local checkpoints only: a registry checkpoint is resolved (and pulled) at CreateContainer.
        if (decision.kind !== 'restore-target' || decision.reference !== undefined || !options.restore || !pod.id) return;
        // Only a checkpoint this pod may restore is read for it (its own namespace's, or one shared with it).
        const resolved = restoreKeyOf(decision.checkpointName, pod.namespace ?? '');
        if ('reason' in resolved || localRestoreRefusal(scope.tenancy, pod.namespace ?? '', resolved.owner) !== undefined) return;
        options.coordinator?.restorePodCreated?.(pod.id, resolved.key);
        ctx.logger.debug('thaw: reading the checkpoint of a restore pod early', { pod: `${pod.namespace ?? ''}/${pod.name ?? ''}`, namespace: pod.namespace, checkpoint: resolved.key });
      } catch (err) {
        ctx.logger.warn('thaw: runPodSandbox handler failed', { pod: pod.id, error: errorMessage(err) });
      }
    },

    stopPodSandbox(pod) {
      if (!pod.id) return;
      podLeft(pod.id);
      options.coordinator?.podGone?.(pod.id);
    },

    removePodSandbox(pod) {
      if (!pod.id) return;
      podLeft(pod.id);
      options.coordinator?.podGone?.(pod.id);
    },

    // Most containers are none of thaw's: decided from the request's head, answered without the full decode.
    createContainerWanted(pod, container) {
      const kind = decide({ podAnnotations: pod.annotations ?? {}, containerName: container.name ?? '' }, { annotationPrefix: prefix }).kind;
      if (kind !== 'untouched' && kind !== 'other-container') return true;
      stats.countDecision(kind);
      return false;
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
          case 'snapshot':
            return await adjustSnapshotContainer(scope, options.restore, options.snapshot, pod, container, decision.snapshotName, decision.onCheckpoint, ctx);
          case 'checkpoint-source':
            return await adjustCheckpointSource(scope, pod, container, decision.checkpointName, decision.onCheckpoint, ctx);
          case 'restore-target':
            if (options.restore) return await adjustRestoreTarget(scope, options.restore, pod, container, decision.checkpointName, decision.reference, ctx);
            // Without a restore engine configured, the pod cold-starts.
            stats.countRestoreFallbackAtCreate(HandlerFallbackCause.RESTORE_UNAVAILABLE);
            ctx.logger.warn('thaw: restore requested but no restore engine is configured; cold start', {
              ...describe(pod, container),
              checkpoint: decision.checkpointName,
            });
            return undefined;
        }
      } catch (err) {
        // A bug here must not fail the pod: log it and leave the container as it is.
        stats.countFallback(HandlerFallbackCause.INTERNAL);
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
        const entry = managedFromContainer(prefix, options.controlRoot, podsById.get(container.podSandboxId ?? '') ?? {}, container);
        if (!entry) {
          if (container.annotations?.[`${prefix}role`] !== undefined) {
            ctx.logger.warn('thaw: container with thaw annotations refused on (re)connection: its control directory is not <root>/<id> as thaw made it', {
              containerId: container.id,
              controlDir: container.annotations?.[`${prefix}control-dir`],
            });
          }
          continue;
        }
        if (!managed.has(entry.containerId)) managed.set(entry.containerId, entry);
        if (container.state === ContainerState.RUNNING && container.pid) {
          recovered++;
          startedIds.add(entry.containerId);
          options.coordinator?.containerRecovered?.(managed.get(entry.containerId)!, container.pid);
        } else if (container.state === ContainerState.CREATED && scope.startHook !== undefined && !hasStartHook(container, scope.startHook)) {
          // Made by an agent that learnt starts from NRI (or from another socket): only containerd can tell its start now.
          const id = entry.containerId;
          options.watchStart?.(id, (pid) => containerStarted(id, pid));
        }
      }
      if (recovered > 0) ctx.logger.info('thaw: containers found on (re)connection', { managed: managed.size, running: recovered });
    },

    // A container that stopped (killed, or exited by itself) will not be checkpointed: what waits for it goes,
    // and with it a snapshot claim it held (the next pod of the workload may take the checkpoint).
    stopContainer(_pod, container) {
      const id = container.id ?? '';
      if (managed.has(id)) options.coordinator?.containerStopped?.(id);
    },

    async removeContainer(_pod, container, ctx) {
      const containerId = container.id ?? '';
      startedIds.delete(containerId);
      dropInterest(scope, containerId);
      // A hook that never ran (the create failed): its registration goes with the container.
      options.restore?.nativeHook?.server.forget(containerId);
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
