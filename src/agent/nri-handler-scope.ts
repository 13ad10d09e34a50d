import type { Container, PodSandbox } from '../nri-plugin/index.js';
import type { ManagedContainer, ThawCoordinator } from './managed-container.js';
import type { ThawNriStats } from './nri-stats.js';

/** What thaw's NRI handlers share (thaw-nri.ts, checkpoint-source.ts, restore-target.ts). */
export interface HandlerScope {
  annotationPrefix: string;
  /** Host root of per-container control directories. */
  controlRoot: string;
  stats: ThawNriStats;
  /** The containers thaw adjusted, by container id. */
  managed: Map<string, ManagedContainer>;
  coordinator?: ThawCoordinator;
}

/** The fields every handler log line names the container by. */
export function describeContainer(pod: PodSandbox, container: Container): Record<string, unknown> {
  return {
    pod: `${pod.namespace ?? ''}/${pod.name ?? ''}`,
    container: container.name,
    containerId: container.id,
  };
}
