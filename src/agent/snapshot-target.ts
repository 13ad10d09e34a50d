/**
 * The NRI CreateContainer handling of a `thaw.dev/snapshot: <name>` container (the flow: snapshot.ts). It learns
 * the key, then hands the container to the restore branch (restore-target.ts) when the namespace's checkpoint for
 * that key is in the store, or to the checkpoint-source branch (checkpoint-source.ts) when it takes the node's
 * claim; otherwise it leaves the container as it is. Every path counts how the pod started (SnapshotTracker).
 * Never throws for a problem of the pod; within CreateContainer's budget it does one containerd call (bounded by
 * DEFAULT_SNAPSHOT_IMAGE_LOOKUP_TIMEOUT_MS) and one manifest read.
 */
import { errorMessage } from '../errors.js';
import type { AdjustmentBuilder, Container, NriHandlerContext, OnCheckpoint, PodSandbox } from '../nri-plugin/index.js';
import type { GpuConstraints } from '../store/index.js';
import { adjustCheckpointSource } from './checkpoint-source.js';
import { CRI_IMAGE_NAME_ANNOTATION } from './containers.js';
import { HandlerFallbackCause, SnapshotFallbackCause } from './errors.js';
import { describeContainer, type HandlerScope } from './nri-handler-scope.js';
import { adjustRestoreTarget, type ThawRestoreConfig } from './restore-target.js';
import { findSnapshotCheckpoint, snapshotKey, type SnapshotId, type SnapshotTracker } from './snapshot.js';

/** What the snapshot branch needs besides the restore configuration. */
export interface ThawSnapshotConfig {
  tracker: SnapshotTracker;
  /** The digest containerd resolves an image name to (readContainerdImageDigest); rejects when it cannot. */
  imageDigestOf(imageName: string): Promise<string>;
  /** This node's GPUs; absent: none (the key says `none`). */
  gpuFacts?: GpuConstraints;
}

export async function adjustSnapshotContainer(
  scope: HandlerScope,
  r: ThawRestoreConfig | undefined,
  s: ThawSnapshotConfig | undefined,
  pod: PodSandbox,
  container: Container,
  snapshotName: string,
  onCheckpoint: OnCheckpoint,
  ctx: NriHandlerContext,
): Promise<AdjustmentBuilder | undefined> {
  const namespace = pod.namespace ?? '';
  const containerId = container.id ?? '';
  const where = { ...describeContainer(pod, container), snapshot: snapshotName };
  const cold = (cause: string, message: string, extra: Record<string, unknown> = {}, fallback = true): undefined => {
    s?.tracker.count(namespace, snapshotName, 'cold', cause);
    if (fallback) scope.stats.countFallback(cause);
    ctx.logger[fallback ? 'warn' : 'info'](`thaw: ${message}; cold start`, { ...where, event: 'snapshot', outcome: 'cold', cause, ...extra });
    return undefined;
  };
  if (r === undefined || s === undefined) return cold(HandlerFallbackCause.RESTORE_UNAVAILABLE, 'a snapshot pod, but no restore engine is configured');
  const imageName = container.annotations?.[CRI_IMAGE_NAME_ANNOTATION];
  if (imageName === undefined || imageName === '') return cold(SnapshotFallbackCause.KEY_UNKNOWN, `the container has no ${CRI_IMAGE_NAME_ANNOTATION} annotation`);
  const args = container.args ?? [];
  if (args.length === 0 || !args[0]) return cold(SnapshotFallbackCause.KEY_UNKNOWN, 'the container has no process args');
  let imageDigest: string;
  try {
    imageDigest = await s.imageDigestOf(imageName);
  } catch (err) {
    return cold(SnapshotFallbackCause.KEY_UNKNOWN, 'containerd did not tell the image digest', { image: imageName, error: errorMessage(err) });
  }
  const key = snapshotKey({
    imageDigest,
    containerName: container.name ?? '',
    args,
    ...(s.gpuFacts !== undefined ? { gpu: s.gpuFacts } : {}),
  });
  const id: SnapshotId = { namespace, name: snapshotName, key };
  const lookup = await findSnapshotCheckpoint(r.store, id);
  if (lookup.kind === 'taken') return cold(SnapshotFallbackCause.NAME_TAKEN, 'the snapshot\'s store name holds another checkpoint', { key, storedName: lookup.storedName, reason: lookup.reason });
  if (lookup.kind === 'found') {
    let coldCause: string | undefined;
    const adjusted = await adjustRestoreTarget(scope, r, pod, container, lookup.checkpoint.name, undefined, ctx, {
      imageDigest,
      onColdStart: (cause) => (coldCause = cause),
    });
    if (adjusted === undefined) {
      // restore-target.ts logged and counted the fallback; here only how the snapshot pod started.
      s.tracker.count(namespace, snapshotName, 'cold', coldCause ?? HandlerFallbackCause.INTERNAL);
      return undefined;
    }
    s.tracker.expect(containerId, { namespace, snapshot: snapshotName, via: 'restore' });
    ctx.logger.info('thaw: snapshot found; restoring', { ...where, key, checkpoint: lookup.checkpoint.name });
    return adjusted;
  }
  if (!s.tracker.claims.tryClaim(id, containerId)) {
    return cold(SnapshotFallbackCause.CHECKPOINT_IN_PROGRESS, 'another container of this node is taking the snapshot\'s checkpoint', { key, holder: s.tracker.claims.holder(id) }, false);
  }
  let coldCause: string | undefined;
  const adjusted = await adjustCheckpointSource(scope, pod, container, lookup.storedName, onCheckpoint, ctx, {
    snapshot: { name: snapshotName, key },
    imageDigest,
    onColdStart: (cause) => (coldCause = cause),
  });
  if (adjusted === undefined) {
    s.tracker.claims.release(containerId);
    s.tracker.count(namespace, snapshotName, 'cold', coldCause ?? HandlerFallbackCause.INTERNAL);
    return undefined;
  }
  s.tracker.expect(containerId, { namespace, snapshot: snapshotName, via: 'checkpoint' });
  ctx.logger.info('thaw: no checkpoint for this snapshot key yet; cold start, and this container takes it', { ...where, key, checkpoint: lookup.storedName });
  return adjusted;
}
