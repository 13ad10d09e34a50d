/**
 * The NRI CreateContainer handling of a `thaw.dev/snapshot: <name>` container (the flow: snapshot.ts). It learns
 * the key, then hands the container to the restore branch (restore-target.ts) when the namespace's checkpoint for
 * that key is in the store, or to the checkpoint-source branch (checkpoint-source.ts) when it takes the node's
 * claim; otherwise it leaves the container as it is. Every path counts how the pod started (SnapshotTracker).
 * Never throws for a problem of the pod; within CreateContainer's budget it does one containerd call (bounded by
 * DEFAULT_SNAPSHOT_IMAGE_LOOKUP_TIMEOUT_MS) and one manifest read.
 */
import { parseCheckpointReference } from '../checkpoint-reference.js';
import { errorMessage, isThawError } from '../errors.js';
import { RestoreErrorCode } from '../restore-engine/index.js';
import { OciErrorCode, StoreErrorCode } from '../store/index.js';
import type { AdjustmentBuilder, Container, NriHandlerContext, OnCheckpoint, PodSandbox } from '../nri-plugin/index.js';
import type { GpuConstraints } from '../store/index.js';
import { adjustCheckpointSource } from './checkpoint-source.js';
import { CRI_IMAGE_NAME_ANNOTATION } from './containers.js';
import { HandlerFallbackCause, SnapshotFallbackCause } from './errors.js';
import { describeContainer, type HandlerScope } from './nri-handler-scope.js';
import { adjustRestoreTarget, type ThawRestoreConfig } from './restore-target.js';
import { findSnapshotCheckpoint, snapshotKey, snapshotReference, type SnapshotId, type SnapshotTracker } from './snapshot.js';

/** What the snapshot branch needs besides the restore configuration. */
export interface ThawSnapshotConfig {
  tracker: SnapshotTracker;
  /** The digest containerd resolves an image name to (readContainerdImageDigest); rejects when it cannot. */
  imageDigestOf(imageName: string): Promise<string>;
  /** This node's GPUs; absent: none (the key says `none`). */
  gpuFacts?: GpuConstraints;
  /** The namespace's `snapshotRepository` (tenancy.ts), where its snapshot checkpoints are pulled from; absent: none. */
  repositoryFor?(namespace: string): string | undefined;
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
  /** The restore branch, for a local checkpoint (its name) or the namespace's registry copy (its reference). */
  const restore = async (value: string, reference: ReturnType<typeof parseCheckpointReference> | undefined, from: string): Promise<AdjustmentBuilder | undefined> => {
    let coldCause: string | undefined;
    const adjusted = await adjustRestoreTarget(scope, r, pod, container, value, reference !== undefined && 'reference' in reference ? reference.reference : undefined, ctx, {
      imageDigest,
      onColdStart: (cause) => (coldCause = cause),
    });
    if (adjusted === undefined) {
      // restore-target.ts logged and counted the fallback; here only how the snapshot pod started.
      s.tracker.count(namespace, snapshotName, 'cold', coldCause ?? HandlerFallbackCause.INTERNAL);
      s.tracker.restoreFailed(lookup.storedName);
      return undefined;
    }
    s.tracker.expect(containerId, { namespace, snapshot: snapshotName, via: 'restore', storedName: lookup.storedName });
    ctx.logger.info('thaw: snapshot found; restoring', { ...where, key, checkpoint: value, from });
    return adjusted;
  };
  // A checkpoint whose restores keep failing is taken again (by this container, if it gets the claim).
  // One that a restore already failed from on this node because of the checkpoint (the store's restore-failure
  // mark, RESTORE_CHECKPOINT_FAILED_BEFORE) is taken again at once: no restore of it would succeed.
  const markedFailed = lookup.kind === 'found' ? await r.store.restoreFailure(lookup.checkpoint.name, lookup.checkpoint.manifest).catch(() => undefined) : undefined;
  const retake = s.tracker.shouldRetake(lookup.storedName) || markedFailed !== undefined;
  if (retake) ctx.logger.warn('thaw: the snapshot\'s checkpoint fell back in its last restores; this pod takes a new one if no other does', { ...where, key, checkpoint: lookup.storedName, failures: s.tracker.failuresOf(lookup.storedName), ...(markedFailed !== undefined ? { failedBefore: markedFailed.cause } : {}) });
  if (lookup.kind === 'found' && !retake) return restore(lookup.checkpoint.name, undefined, 'local store');
  // Not here: the namespace's repository may have it from another node (pushed by the node that took it).
  const repository = s.repositoryFor?.(namespace);
  if (repository !== undefined && r.sources !== undefined && lookup.kind === 'absent' && !retake) {
    const text = snapshotReference(repository, lookup.storedName);
    const parsed = parseCheckpointReference(text);
    if ('reference' in parsed) {
      // This lookup's interest in the pull it may start lasts until the restore branch holds its own.
      const interest = new AbortController();
      try {
        const found = await r.sources.find(text, parsed.reference, { namespace, interest: interest.signal });
        const m = found.checkpoint.manifest;
        if (m.snapshot?.name !== snapshotName || m.snapshot.key !== key || m.source.pod?.namespace !== namespace) {
          return cold(SnapshotFallbackCause.NAME_TAKEN, 'the snapshot\'s registry tag holds another checkpoint', { key, reference: text, record: m.snapshot ?? null, owner: m.source.pod?.namespace });
        }
        return await restore(text, parsed, 'registry');
      } catch (err) {
        // Not there (the tag is unknown, or no registry access is configured at all): take it on this node.
        if (!isThawError(err, OciErrorCode.NOT_FOUND) && !isThawError(err, StoreErrorCode.NOT_FOUND)) {
          const cause = isThawError(err, 'RESTORE_NOT_ALLOWED') || isThawError(err, 'OCI_NOT_ALLOWED') ? RestoreErrorCode.NOT_ALLOWED
            : isThawError(err, 'OCI_SIGNATURE_MISSING') || isThawError(err, 'OCI_SIGNATURE_INVALID') ? RestoreErrorCode.SIGNATURE
              : isThawError(err, 'RESTORE_NO_ROOM') ? RestoreErrorCode.NO_ROOM
                : RestoreErrorCode.PULL_FAILED;
          return cold(cause, 'the snapshot\'s registry copy cannot be used', { key, reference: text, error: errorMessage(err), ...(isThawError(err) ? { code: err.code } : {}) });
        }
        ctx.logger.debug('thaw: the snapshot is not in its repository yet', { ...where, key, reference: text });
      } finally {
        interest.abort(new Error('the snapshot lookup is done'));
      }
    }
  }
  if (!s.tracker.claims.tryClaim(id, containerId)) {
    return cold(SnapshotFallbackCause.CHECKPOINT_IN_PROGRESS, 'another container of this node is taking the snapshot\'s checkpoint', { key, holder: s.tracker.claims.holder(id) }, false);
  }
  let coldCause: string | undefined;
  const adjusted = await adjustCheckpointSource(scope, pod, container, lookup.storedName, onCheckpoint, ctx, {
    snapshot: { name: snapshotName, key },
    imageDigest,
    ...(lookup.kind === 'found' ? { replace: true } : {}),
    onColdStart: (cause) => (coldCause = cause),
  });
  if (adjusted === undefined) {
    s.tracker.claims.release(containerId);
    s.tracker.count(namespace, snapshotName, 'cold', coldCause ?? HandlerFallbackCause.INTERNAL);
    return undefined;
  }
  s.tracker.expect(containerId, { namespace, snapshot: snapshotName, via: 'checkpoint', storedName: lookup.storedName });
  ctx.logger.info('thaw: no checkpoint for this snapshot key yet; cold start, and this container takes it', { ...where, key, checkpoint: lookup.storedName });
  return adjusted;
}
