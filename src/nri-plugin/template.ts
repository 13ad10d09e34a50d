/**
 * A template NRI plugin: the starting point for a newcomer. Every handler logs one line; the comment above
 * it says what that handler may change. Delete the handlers you do not need — the event subscription is
 * derived from the methods present. Run it against a runtime with:
 *
 *   const plugin = createNriPlugin({ name: 'template', idx: '90', handlers: templateHandlers(logger), logger });
 *   await plugin.start();
 *
 * Rules: answer fast (the runtime waits at most plugin_request_timeout, 2 s by default, and a handler is cut
 * off a little before that); never await plugin.updateContainers() inside a handler (return updates instead);
 * a thrown error is logged and answered with an empty reply — throw NriHandlerRejection only to fail the pod.
 */
import type { Logger } from '../log.js';
import { AdjustmentBuilder } from './adjustment.js';
import type { NriHandlers } from './plugin.js';

export function templateHandlers(logger: Logger): NriHandlers {
  return {
    // May change: nothing. Read the drop-in config and the runtime's name/version; throwing refuses the connection.
    configure: (config, runtimeName, runtimeVersion) => logger.info('Configure', { config, runtimeName, runtimeVersion }),

    // May change: resources of existing containers, by returning ContainerUpdate[].
    synchronize: (pods, containers) => void logger.info('Synchronize', { pods: pods.length, containers: containers.length }),

    // May change: nothing (notification; an error would fail RunPodSandbox, hence never thrown here).
    runPodSandbox: (pod) => logger.info('RunPodSandbox', { pod: pod.name }),

    // May change: nothing (notification).
    stopPodSandbox: (pod) => logger.info('StopPodSandbox', { pod: pod.name }),

    // May change: nothing (notification).
    removePodSandbox: (pod) => logger.info('RemovePodSandbox', { pod: pod.name }),

    // May change: the new container's env, mounts, annotations, hooks, devices, rlimits, resources, CDI
    // devices, and (containerd >= 2.2 only) its argv; plus updates/evictions of other containers.
    createContainer: (pod, container, ctx) => {
      logger.info('CreateContainer', { pod: pod.name, container: container.name });
      return new AdjustmentBuilder().addAnnotation('example.dev/seen-by', 'template').build(ctx.runtime).adjustment;
    },

    // May change: nothing (notification after the container record exists).
    postCreateContainer: (_pod, container) => logger.info('PostCreateContainer', { container: container.name }),

    // May change: nothing; an error would fail StartContainer.
    startContainer: (_pod, container) => logger.info('StartContainer', { container: container.name }),

    // May change: nothing (notification after the process started).
    postStartContainer: (_pod, container) => logger.info('PostStartContainer', { container: container.name }),

    // May change: the requested resources (return updates) or evict containers.
    updateContainer: (_pod, container) => void logger.info('UpdateContainer', { container: container.name }),

    // May change: nothing (notification after the update).
    postUpdateContainer: (_pod, container) => logger.info('PostUpdateContainer', { container: container.name }),

    // May change: resources of other containers (return ContainerUpdate[]), e.g. hand back freed CPUs.
    stopContainer: (_pod, container) => void logger.info('StopContainer', { container: container.name }),

    // May change: nothing (notification; clean up per-container state here).
    removeContainer: (_pod, container) => logger.info('RemoveContainer', { container: container.name }),
  };
}
