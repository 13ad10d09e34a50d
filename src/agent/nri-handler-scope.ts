import { START_HOOK_TIMEOUT_SECONDS, START_HOOK_WAIT_MS } from '../defaults.js';
import type { AdjustmentBuilder, Container, PodSandbox } from '../nri-plugin/index.js';
import type { ManagedContainer, ThawCoordinator } from './managed-container.js';
import type { ThawNriStats } from './nri-stats.js';
import type { TenancyPolicy } from './tenancy.js';

/** What thaw's NRI handlers share (thaw-nri.ts, checkpoint-source.ts, restore-target.ts). */
export interface HandlerScope {
  annotationPrefix: string;
  /** Host root of per-container control directories. */
  controlRoot: string;
  stats: ThawNriStats;
  /** The containers thaw adjusted, by container id. */
  managed: Map<string, ManagedContainer>;
  coordinator?: ThawCoordinator;
  /** Who may checkpoint and restore what (agent config `tenancy`). */
  tenancy: TenancyPolicy;
  /**
   * Per restore target (container id): its interest in the transfer its checkpoint's find started or joined,
   * with its pod. Aborted when the container or its pod goes, or when the target cold-starts after all: the
   * last abort cancels the transfer (checkpoint-sources.ts).
   */
  interests: Map<string, { podId: string; controller: AbortController }>;
  /**
   * The native hook and the agent's hook socket: present, every container thaw manages gets a poststart hook
   * that tells the agent it started (addStartHook), and the plugin subscribes to no PostStartContainer.
   */
  startHook?: { path: string; socketPath: string };
}

/** Adds the poststart hook that tells the agent a managed container started (none without a start hook). */
export function addStartHook(scope: HandlerScope, builder: AdjustmentBuilder): void {
  const h = scope.startHook;
  if (h === undefined) return;
  builder.addHook('poststart', {
    path: h.path,
    args: [h.path, '--started', '--socket', h.socketPath, '--wait-ms', String(START_HOOK_WAIT_MS)],
    env: [],
    timeoutSeconds: START_HOOK_TIMEOUT_SECONDS,
  });
}

/** Drops a restore target's interest in its checkpoint's transfer (no-op when it has none). */
export function dropInterest(scope: HandlerScope, containerId: string): void {
  const i = scope.interests.get(containerId);
  if (i === undefined) return;
  scope.interests.delete(containerId);
  i.controller.abort(new Error('the restore target is gone'));
}

/** The fields every handler log line names the container by. */
export function describeContainer(pod: PodSandbox, container: Container): Record<string, unknown> {
  return {
    pod: `${pod.namespace ?? ''}/${pod.name ?? ''}`,
    container: container.name,
    containerId: container.id,
  };
}
