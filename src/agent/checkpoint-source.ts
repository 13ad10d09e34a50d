/**
 * The NRI CreateContainer adjustment of a checkpoint source: a control directory mounted at
 * /snapshot-control, the environment a checkpointable worker needs, and the annotations that let an agent
 * that restarted learn the container back. Never throws for a problem of the pod: without a control
 * directory the container runs without thaw (counted as `control-dir`).
 */
import { AdjustmentBuilder } from '../nri-plugin/index.js';
import type { NriHandlerContext } from '../nri-plugin/index.js';
import { CHECKPOINT_ENV, CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH, LEGACY_CONTROL_DIR_ENV, type OnCheckpoint } from '../nri-plugin/index.js';
import type { Container, PodSandbox } from '../nri-plugin/index.js';
import { createControlDir } from '../sdk/index.js';
import { CRI_IMAGE_NAME_ANNOTATION } from './containers.js';
import { identityOf, managedAnnotations, type ManagedContainer } from './managed-container.js';
import { addStartHook, describeContainer, type HandlerScope } from './nri-handler-scope.js';
import { checkpointRefusal, restoreKeyOf } from './tenancy.js';
import { HandlerFallbackCause } from './errors.js';

/** What a `thaw.dev/snapshot` source adds (snapshot-target.ts). */
export interface SnapshotSourceExtras {
  snapshot: { name: string; key: string };
  imageDigest: string;
  /** Replace the checkpoint under the name (its restores kept failing). */
  replace?: boolean;
  /** Told the cause when the container is left unchanged after all. */
  onColdStart(cause: string): void;
}

export async function adjustCheckpointSource(
  scope: HandlerScope,
  pod: PodSandbox,
  container: Container,
  checkpointName: string,
  onCheckpoint: OnCheckpoint,
  ctx: NriHandlerContext,
  snapshot?: SnapshotSourceExtras,
): Promise<AdjustmentBuilder | undefined> {
  const containerId = container.id ?? '';
  const refusal = checkpointRefusal(scope.tenancy, pod.namespace ?? '');
  if (refusal !== undefined) {
    snapshot?.onColdStart('checkpoint-not-allowed');
    scope.stats.countFallback('checkpoint-not-allowed');
    ctx.logger.warn('thaw: the policy refuses checkpoints of this pod; the container runs without thaw', { ...describeContainer(pod, container), checkpoint: checkpointName, reason: refusal });
    return undefined;
  }
  // The checkpoint is its pod's namespace's: stored as <namespace>/<name>, whatever another namespace holds.
  const resolved = restoreKeyOf(checkpointName, pod.namespace ?? '');
  if ('reason' in resolved) {
    snapshot?.onColdStart('checkpoint-not-allowed');
    scope.stats.countFallback('checkpoint-not-allowed');
    ctx.logger.warn('thaw: the checkpoint cannot be named in this pod\'s namespace; the container runs without thaw', { ...describeContainer(pod, container), checkpoint: checkpointName, reason: resolved.reason });
    return undefined;
  }
  let controlDir: string;
  try {
    controlDir = await createControlDir(scope.controlRoot, containerId);
  } catch (err) {
    snapshot?.onColdStart(HandlerFallbackCause.CONTROL_DIR);
    scope.stats.countFallback(HandlerFallbackCause.CONTROL_DIR);
    ctx.logger.error('thaw: cannot create the control directory; the container runs without thaw', {
      ...describeContainer(pod, container),
      error: err,
    });
    return undefined;
  }
  const entry: ManagedContainer = {
    ...identityOf(pod, container),
    checkpointName: resolved.key,
    onCheckpoint,
    controlDir,
    ...(container.annotations?.[CRI_IMAGE_NAME_ANNOTATION] ? { imageRef: container.annotations[CRI_IMAGE_NAME_ANNOTATION] } : {}),
    role: 'checkpoint-source',
    ...(container.args !== undefined && container.args.length > 0 ? { specArgs: [...container.args] } : {}),
    ...(snapshot !== undefined ? { snapshot: snapshot.snapshot, imageDigest: snapshot.imageDigest, ...(snapshot.replace === true ? { replaceCheckpoint: true } : {}) } : {}),
  };
  const existingEnv = new Set((container.env ?? []).map((kv) => kv.slice(0, Math.max(0, kv.indexOf('=')))));
  const builder = new AdjustmentBuilder()
    .addMount({ destination: CONTROL_DIR_MOUNT_PATH, source: controlDir, type: 'bind', options: ['rbind', 'rw'] })
    .addEnv(CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH)
    .addEnv(LEGACY_CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH);
  // The pod's own settings win: a platform team that set NCCL_SOCKET_IFNAME knows why.
  for (const [key, value] of CHECKPOINT_ENV) if (!existingEnv.has(key)) builder.addEnv(key, value);
  for (const [key, value] of Object.entries(managedAnnotations(scope.annotationPrefix, 'checkpoint-source', entry))) builder.addAnnotation(key, value);
  // Its start is what its flow waits for (the worker's ready marker is watched from then on).
  addStartHook(scope, builder);
  scope.managed.set(containerId, entry);
  scope.coordinator?.checkpointSourceCreated?.(entry);
  ctx.logger.info('thaw: checkpoint source', { ...describeContainer(pod, container), namespace: resolved.owner.namespace, checkpoint: resolved.key, controlDir, ...(snapshot ? { snapshot: snapshot.snapshot.name, key: snapshot.snapshot.key } : {}) });
  return builder;
}
