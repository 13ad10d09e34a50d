/**
 * The NRI CreateContainer adjustment of a restore target: find the checkpoint (local, or being brought in
 * from a registry or the shared store), check its manifest against this node and the container, then hold
 * the container's command behind thaw-pause (NRI args, or the createRuntime overlay), mount the toolkit and
 * the control directory, add the hooks, and hand the target to the restore coordinator. Only the manifest is
 * read here (CreateContainer answers within containerd's 2 s); any problem leaves the container as it is (a
 * cold start, counted with its cause).
 */
import { writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { CheckpointReference } from '../checkpoint-reference.js';
import { errorMessage, isThawError } from '../errors.js';
import { DEFAULT_THAW_PAUSE_DEADLINE_MS, HOOK_ANSWER_GRACE_MS, HOOK_TIMEOUT_MARGIN_MS } from '../defaults.js';
import type { HookServer, HookWork } from './hook-server.js';
import { AdjustmentBuilder } from '../nri-plugin/index.js';
import type { NriHandlerContext } from '../nri-plugin/index.js';
import { CHECKPOINT_ENV, CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH, LEGACY_CONTROL_DIR_ENV } from '../nri-plugin/index.js';
import type { Container, PodSandbox } from '../nri-plugin/index.js';
import { supportsArgs } from '../nri-plugin/index.js';
import { createControlDir } from '../sdk/index.js';
import type { LocalStore, OpenedCheckpoint, ReleaseLease, RestoreFailure } from '../store/index.js';
import { DELETED_FILES_FILE_NAME, ROOTFS_DIFF_FILE_NAME, type Manifest } from '../store/index.js';
import { StoreErrorCode } from '../store/index.js';
import { checkCompatibility, isRestorable, type GpuConstraints, type NodeFacts } from '../store/index.js';
import { readHostFacts } from '../sys/host-facts.js';
import type { CheckpointSources } from './checkpoint-sources.js';
import { CRI_IMAGE_NAME_ANNOTATION } from './containers.js';
import { identityOf, managedAnnotations, type ManagedContainer } from './managed-container.js';
import { addStartHook, describeContainer, dropInterest, type HandlerScope } from './nri-handler-scope.js';
import { localRestoreRefusal, restoreKeyOf } from './tenancy.js';
import { RestoreErrorCode, undoJournalFor } from '../restore-engine/index.js';
import { DIFF_APPLIED_FILE, ORIGINAL_ENTRYPOINT_FILE } from '../oci-hooks/index.js';
import { HandlerFallbackCause } from './errors.js';

/** Fallback causes that are the tenancy policy's refusals (counted per namespace for /metrics). */
const TENANCY_CAUSES: ReadonlySet<string> = new Set([RestoreErrorCode.NOT_ALLOWED, RestoreErrorCode.SIGNATURE, RestoreErrorCode.NO_ROOM]);

/** What the restore branch needs; without it a restore target cold-starts (AGENT_RESTORE_UNAVAILABLE). */
export interface ThawRestoreConfig {
  store: LocalStore;
  /** Where else checkpoints come from (shared store, registries); absent: the local store only. */
  sources?: CheckpointSources;
  /** The toolkit prefix (CRIU, with the GNU tar and gzip it runs for tmpfs contents; busybox), mounted read-only at the same path in the target. */
  toolkitDir: string;
  /** Host path of thaw-pause; its directory is mounted read-only at the same path in the target. */
  thawPausePath: string;
  /** argv that runs src/oci-hooks/main.js (absolute paths: hooks get no PATH), e.g. [node, .../main.js]. */
  hookArgv: string[];
  /**
   * The native createRuntime hook (native/thaw-hook.c) and the agent's server that does its work: present, the
   * createRuntime hook is that static binary (no Node.js start on the restore's critical path); absent, the
   * Node.js hook of hookArgv. The poststop hook is hookArgv's either way (it runs after the pod, off the path).
   */
  nativeHook?: { path: string; server: HookServer };
  /** Where the coordinator puts CRIU work dirs (`<workRoot>/<container id>`); the poststop hook removes them. */
  workRoot: string;
  /** This node's facts (default readHostFacts()). */
  hostFacts?: Pick<NodeFacts, 'arch' | 'kernelRelease'>;
  /** This node's GPUs (src/cuda gpuFacts); absent: no GPU, and a checkpoint that needs one is refused. */
  gpuFacts?: GpuConstraints;
  /**
   * Whether this agent places compressed pages (thaw-fill runs here: the engine asked CRIU and the kernel at
   * start). false: a checkpoint with compressed pages cold-starts here at CreateContainer, before the hook does
   * any work (RESTORE_MEMORY_FILL_REQUIRED). Absent: decided by the restore flow when the fill would start.
   */
  placesCompressedPages?: boolean;
  /** The createRuntime hook's timeout (the rootfs diff of a large layer). */
  hookTimeoutSeconds?: number;
  /** thaw-pause's deadline without a word from the agent (default DEFAULT_THAW_PAUSE_DEADLINE_MS). */
  thawPauseDeadlineMs?: number;
}

/** The env variable thaw-pause reads its deadline from (native/thaw-pause.c). */
export const THAW_PAUSE_DEADLINE_ENV = 'THAW_PAUSE_DEADLINE_MS';
/** overlay mode: where thaw-pause finds the original entrypoint while the overlay still covers it (native/thaw-pause.c). */
export const THAW_PAUSE_ORIGINAL_ENV = 'THAW_PAUSE_ORIGINAL';
/** thaw-pause's env: where the hook's DIFF_APPLIED_FILE appears in the container (native/thaw-pause.c). */
export const THAW_PAUSE_DIFF_MARKER_ENV = 'THAW_PAUSE_DIFF_MARKER';

export const DEFAULT_RESTORE_HOOK_TIMEOUT_SECONDS = 60;
/** Of the hook's timeout, what a hook waiting for a pulled checkpoint leaves itself to apply the rootfs diff. */
export const HOOK_WAIT_RESERVE_SECONDS = 15;

/** What a `thaw.dev/snapshot` restore adds (snapshot-target.ts). */
export interface RestoreCallExtras {
  /** The image digest learnt from containerd: compared with the manifest's instead of NRI's (absent before NRI 0.12). */
  imageDigest?: string;
  /** Told the cause when the pod is sent to a cold start here. */
  onColdStart?(cause: string): void;
}

/** Restore fallbacks decided here, before the container exists: no adjustment, the pod starts cold. */
function coldStart(scope: HandlerScope, call: RestoreCallExtras, cause: RestoreErrorCode | HandlerFallbackCause, message: string, pod: PodSandbox, container: Container, ctx: NriHandlerContext, extra: Record<string, unknown>): undefined {
  call.onColdStart?.(cause);
  scope.stats.countRestoreFallbackAtCreate(cause);
  if (TENANCY_CAUSES.has(cause)) scope.stats.countTenancyRefusal(pod.namespace ?? '', cause);
  ctx.logger.warn(`thaw: ${message}; cold start`, { ...describeContainer(pod, container), event: 'restore', outcome: 'fallback', cause, ...extra });
  return undefined;
}

/** The container's bind mounts as the weights service reads them (destination → host source). */
export function bindMountsOf(container: Container): Array<{ destination: string; source: string }> {
  return (container.mounts ?? [])
    .filter((m) => m.type === 'bind' || (m.options ?? []).some((o) => o === 'bind' || o === 'rbind'))
    .flatMap((m) => (m.destination && m.source ? [{ destination: m.destination, source: m.source }] : []));
}

/** The sha256 of both diff files in a manifest that lists both; undefined otherwise. */
export function diffDigests(manifest: Manifest): { rootfsDiff: string; deletedFiles: string } | undefined {
  const sha = (p: string): string | undefined => manifest.files.find((f) => f.path === p)?.sha256;
  const tar = sha(ROOTFS_DIFF_FILE_NAME);
  const deleted = sha(DELETED_FILES_FILE_NAME);
  return tar !== undefined && deleted !== undefined ? { rootfsDiff: tar, deletedFiles: deleted } : undefined;
}

/** The Node hook's command line for a hook's work (src/oci-hooks/main.ts parses it back). */
export function hookWorkArgs(w: HookWork): string[] {
  return [
    '--mode', w.mode,
    '--control-dir', w.controlDir,
    '--checkpoint-dir', w.checkpointDir,
    '--thaw-pause', w.thawPausePath,
    ...(w.budgetMs !== undefined ? ['--budget-ms', String(w.budgetMs)] : []),
    ...(w.waitCheckpointMs !== undefined ? ['--wait-checkpoint-ms', String(w.waitCheckpointMs)] : []),
    ...(w.diffSha256 !== undefined ? ['--diff-sha256', `${w.diffSha256.rootfsDiff}:${w.diffSha256.deletedFiles}`] : []),
    ...(w.undoJournalFile !== undefined ? ['--undo-journal', w.undoJournalFile] : []),
    ...(w.originalEntrypointPath !== undefined ? ['--original-entrypoint', w.originalEntrypointPath] : []),
  ];
}

export async function adjustRestoreTarget(
  scope: HandlerScope,
  r: ThawRestoreConfig,
  pod: PodSandbox,
  container: Container,
  checkpointName: string,
  reference: CheckpointReference | undefined,
  ctx: NriHandlerContext,
  call: RestoreCallExtras = {},
): Promise<AdjustmentBuilder | undefined> {
  const containerId = container.id ?? '';
  const namespace = pod.namespace ?? '';
  const interest = new AbortController();
  scope.interests.set(containerId, { podId: pod.id ?? container.podSandboxId ?? '', controller: interest });
  const adjusted = await adjustWith(scope, r, pod, container, checkpointName, reference, ctx, namespace, interest.signal, call);
  // Cold start after all: this pod no longer wants a transfer it may have started.
  if (adjusted === undefined) dropInterest(scope, containerId);
  return adjusted;
}

async function adjustWith(
  scope: HandlerScope,
  r: ThawRestoreConfig,
  pod: PodSandbox,
  container: Container,
  checkpointName: string,
  reference: CheckpointReference | undefined,
  ctx: NriHandlerContext,
  namespace: string,
  interest: AbortSignal,
  call: RestoreCallExtras,
): Promise<AdjustmentBuilder | undefined> {
  const containerId = container.id ?? '';
  // Only the manifest here (a small JSON file): the full sha256 runs in the coordinator, after the 2 s deadline.
  // A checkpoint from elsewhere (registry, shared store): its manifest now, the transfer in the background.
  let checkpoint: OpenedCheckpoint;
  let incoming: { ready: Promise<OpenedCheckpoint>; from: string; source: string } | undefined;
  // A local name means the pod's own namespace's checkpoint (or `namespace/name`, shared by the policy): never
  // one another namespace holds under the same name.
  if (reference === undefined) {
    const resolved = restoreKeyOf(checkpointName, namespace);
    if ('reason' in resolved) return coldStart(scope, call, RestoreErrorCode.CHECKPOINT_MISSING, `the checkpoint name cannot be resolved: ${resolved.reason}`, pod, container, ctx, { checkpoint: checkpointName, namespace });
    checkpointName = resolved.key;
  }
  try {
    if (r.sources !== undefined) {
      const found = await r.sources.find(checkpointName, reference, { namespace, interest });
      checkpoint = found.checkpoint;
      if (found.kind === 'incoming') incoming = { ready: found.ready, from: found.from, source: found.source };
    } else if (reference !== undefined) {
      return coldStart(scope, call, RestoreErrorCode.CHECKPOINT_MISSING, 'the pod names a registry checkpoint but no registry is configured', pod, container, ctx, { checkpoint: checkpointName });
    } else {
      checkpoint = await r.store.open(checkpointName);
      const refusal = localRestoreRefusal(scope.tenancy, namespace, { namespace: checkpoint.namespace, name: checkpoint.manifest.name });
      if (refusal !== undefined) return coldStart(scope, call, 'RESTORE_NOT_ALLOWED', refusal, pod, container, ctx, { checkpoint: checkpointName, namespace });
    }
  } catch (err) {
    const missing = isThawError(err, StoreErrorCode.NOT_FOUND) || isThawError(err, StoreErrorCode.INVALID_NAME);
    const notAllowed = isThawError(err, 'RESTORE_NOT_ALLOWED') || isThawError(err, 'OCI_NOT_ALLOWED');
    const unsigned = isThawError(err, 'OCI_SIGNATURE_MISSING') || isThawError(err, 'OCI_SIGNATURE_INVALID');
    const noRoom = isThawError(err, 'RESTORE_NO_ROOM');
    const remote = isThawError(err) && err.code.startsWith('OCI_');
    const cause = notAllowed ? RestoreErrorCode.NOT_ALLOWED : unsigned ? RestoreErrorCode.SIGNATURE : noRoom ? RestoreErrorCode.NO_ROOM : remote ? RestoreErrorCode.PULL_FAILED : missing ? RestoreErrorCode.CHECKPOINT_MISSING : RestoreErrorCode.CHECKPOINT_CORRUPT;
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
    return coldStart(scope, call, cause, what, pod, container, ctx, {
      checkpoint: checkpointName,
      error: errorMessage(err),
      ...(isThawError(err) ? { code: err.code, evidence: err.evidence } : {}),
    });
  }
  if (incoming !== undefined && (reference !== undefined || checkpoint.name !== checkpointName)) {
    ctx.logger.info('thaw: restore target names a checkpoint that is being brought in', { ...describeContainer(pod, container), checkpoint: checkpoint.name, from: incoming.from, source: incoming.source });
  }
  const imageRef = container.annotations?.[CRI_IMAGE_NAME_ANNOTATION];
  if (imageRef === undefined) {
    return coldStart(scope, call, RestoreErrorCode.INCOMPATIBLE, `the container has no ${CRI_IMAGE_NAME_ANNOTATION} annotation to compare with the checkpoint's image`, pod, container, ctx, {
      checkpoint: checkpointName,
    });
  }
  const imageDigest = call.imageDigest ?? container.image?.digest;
  const mismatches = checkCompatibility(checkpoint.manifest, {
    ...(r.hostFacts ?? readHostFacts()),
    image: { ref: imageRef, ...(imageDigest !== undefined && /^sha256:[0-9a-f]{64}$/.test(imageDigest) ? { digest: imageDigest } : {}) },
    ...(r.gpuFacts !== undefined ? { gpu: r.gpuFacts } : {}),
    ...(r.placesCompressedPages !== undefined ? { placesCompressedPages: r.placesCompressedPages } : {}),
    container: { name: container.name ?? '', args: container.args ?? [] },
  });
  if (!isRestorable(mismatches)) {
    // Only the pages stand in the way: the restore flow's cause for the same refusal (a node condition).
    const pagesOnly = mismatches.every((m) => m.severity !== 'fatal' || m.what === 'pages');
    const [cause, what] = pagesOnly
      ? [RestoreErrorCode.MEMORY_FILL_REQUIRED, 'the checkpoint\'s pages are compressed and only thaw-fill places them, which cannot run on this node']
      : [RestoreErrorCode.INCOMPATIBLE, 'the checkpoint does not match this node or container'];
    return coldStart(scope, call, cause, what, pod, container, ctx, {
      checkpoint: checkpointName,
      mismatches,
    });
  }
  // One small read (ENOENT when nothing failed): a checkpoint whose restore failed here because of the checkpoint
  // is not applied again (restore-flow's CHECKPOINT_FAULT_CAUSES; store/restore-failures.ts).
  let failedBefore: RestoreFailure | undefined;
  try {
    failedBefore = await r.store.restoreFailure(checkpoint.name, checkpoint.manifest);
  } catch (err) {
    ctx.logger.warn('thaw: cannot read the restore-failure mark; restoring', { checkpoint: checkpoint.name, error: errorMessage(err) });
  }
  if (failedBefore !== undefined) {
    return coldStart(scope, call, RestoreErrorCode.CHECKPOINT_FAILED_BEFORE, `a restore of this checkpoint failed on this node before (${failedBefore.cause}); \`thaw clear-failure ${checkpoint.name}\` lets pods restore from it again`, pod, container, ctx, {
      checkpoint: checkpoint.name,
      failure: { cause: failedBefore.cause, at: failedBefore.at, containerId: failedBefore.containerId, pod: failedBefore.pod, id: failedBefore.manifestId },
    });
  }
  const args = container.args ?? [];
  if (args.length === 0 || !args[0]) {
    return coldStart(scope, call, RestoreErrorCode.INCOMPATIBLE, 'the container has no args to hold behind thaw-pause', pod, container, ctx, { checkpoint: checkpointName });
  }
  let controlDir: string;
  try {
    controlDir = await createControlDir(scope.controlRoot, containerId);
  } catch (err) {
    return coldStart(scope, call, HandlerFallbackCause.CONTROL_DIR, 'cannot create the control directory', pod, container, ctx, { error: errorMessage(err) });
  }
  // A local checkpoint is leased now, before CreateContainer returns and the hook can read it (issue 12, item 6);
  // one being brought in is leased by the restore flow once it is published.
  let lease: ReleaseLease | undefined;
  if (incoming === undefined) {
    try {
      lease = await r.store.acquireLease(checkpoint.name);
    } catch (err) {
      return coldStart(scope, call, 'RESTORE_CHECKPOINT_MISSING', 'cannot lease the checkpoint', pod, container, ctx, { checkpoint: checkpoint.name, error: errorMessage(err) });
    }
  }
  const placeholder = supportsArgs(ctx.runtime.name, ctx.runtime.version, ctx.runtime.nriVersion) ? 'args' : 'overlay';
  // overlay mode: the mountpoint the hook keeps the original entrypoint at, so that thaw-pause can fall back by
  // itself (its deadline) while no agent is left to remove the overlay. Made now, before any pod process runs.
  let originalEntrypoint: string | undefined;
  if (placeholder === 'overlay') {
    try {
      await writeFile(join(controlDir, ORIGINAL_ENTRYPOINT_FILE), '', { flag: 'wx', mode: 0o600 });
      originalEntrypoint = join(CONTROL_DIR_MOUNT_PATH, ORIGINAL_ENTRYPOINT_FILE);
    } catch (err) {
      ctx.logger.warn('thaw: cannot make the original entrypoint\'s mountpoint; thaw-pause cannot fall back without the agent', { containerId, error: errorMessage(err) });
    }
  }
  const entry: ManagedContainer = {
    ...identityOf(pod, container),
    // The local name: for a registry checkpoint, the one derived from its digest.
    checkpointName: checkpoint.name,
    controlDir,
    imageRef,
    role: 'restore-target',
    placeholder,
    ...(checkpoint.manifest.weights !== undefined ? { mounts: bindMountsOf(container) } : {}),
  };
  const existingEnv = new Set((container.env ?? []).map((kv) => kv.slice(0, Math.max(0, kv.indexOf('=')))));
  const pauseDir = dirname(r.thawPausePath);
  const hookTimeout = r.hookTimeoutSeconds ?? DEFAULT_RESTORE_HOOK_TIMEOUT_SECONDS;
  const budgetMs = Math.max(1, hookTimeout * 1000 - HOOK_TIMEOUT_MARGIN_MS);
  const diffSha256 = diffDigests(checkpoint.manifest);
  // The hook's work: the same for both hooks (runCreateRuntime), whether the Node hook's argv or the agent runs it.
  const work: HookWork = {
    mode: placeholder,
    controlDir,
    checkpointDir: checkpoint.paths.dir,
    thawPausePath: r.thawPausePath,
    // The hook's whole budget: runc kills it at timeoutSeconds, and a killed hook fails the pod.
    budgetMs,
    // Being pulled: the hook waits for it to be published (the rootfs diff is in it).
    ...(incoming !== undefined ? { waitCheckpointMs: Math.max(1, hookTimeout - HOOK_WAIT_RESERVE_SECONDS) * 1000 } : {}),
    // The diff's digests from the manifest checked here (and verified by the restore flow): the hook applies
    // nothing else.
    ...(diffSha256 !== undefined ? { diffSha256 } : {}),
    // The diff's undo journal, in the agent's own directory: a restore that fails later undoes from it.
    undoJournalFile: undoJournalFor(r.workRoot, containerId),
    // overlay mode: where the hook bind-mounts the original entrypoint, for thaw-pause's own fallback.
    ...(originalEntrypoint !== undefined ? { originalEntrypointPath: originalEntrypoint } : {}),
  };
  const createRuntimeHook =
    r.nativeHook !== undefined
      ? {
          path: r.nativeHook.path,
          // The answer is awaited past the budget by the grace (the records, the overlay's removal), still before runc's kill.
          args: [r.nativeHook.path, '--socket', r.nativeHook.server.socketPath, '--control-dir', controlDir, '--budget-ms', String(budgetMs), '--wait-ms', String(budgetMs + HOOK_ANSWER_GRACE_MS)],
          env: [],
          timeoutSeconds: hookTimeout,
        }
      : { path: r.hookArgv[0] as string, args: [...r.hookArgv, 'create-runtime', ...hookWorkArgs(work)], env: [], timeoutSeconds: hookTimeout };
  const builder = new AdjustmentBuilder()
    .addMount({ destination: r.toolkitDir, source: r.toolkitDir, type: 'bind', options: ['rbind', 'ro'] })
    .addMount({ destination: CONTROL_DIR_MOUNT_PATH, source: controlDir, type: 'bind', options: ['rbind', 'rw'] })
    .addEnv(CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH)
    .addEnv(LEGACY_CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH)
    // thaw-pause removes it from its environment before it execs the original command.
    .addEnv(THAW_PAUSE_DEADLINE_ENV, String(r.thawPauseDeadlineMs ?? DEFAULT_THAW_PAUSE_DEADLINE_MS))
    .addHook('createRuntime', createRuntimeHook)
    .addHook('poststop', {
      path: r.hookArgv[0] as string,
      args: [...r.hookArgv, 'poststop', '--control-dir', controlDir, '--work-dir', join(r.workRoot, containerId), '--undo-journal', undoJournalFor(r.workRoot, containerId)],
      env: [],
      timeoutSeconds: hookTimeout,
    });
  // thaw-pause removes it from its environment before it execs the original command.
  if (originalEntrypoint !== undefined) builder.addEnv(THAW_PAUSE_ORIGINAL_ENV, originalEntrypoint);
  builder.addEnv(THAW_PAUSE_DIFF_MARKER_ENV, join(CONTROL_DIR_MOUNT_PATH, DIFF_APPLIED_FILE));
  // thaw-pause's directory, unless the toolkit mount already shows it at the same path.
  if (!pauseDir.startsWith(`${r.toolkitDir}/`)) builder.addMount({ destination: pauseDir, source: pauseDir, type: 'bind', options: ['rbind', 'ro'] });
  // The same environment as a source: a cold-started fallback then runs as the checkpointed worker did.
  for (const [key, value] of CHECKPOINT_ENV) if (!existingEnv.has(key)) builder.addEnv(key, value);
  for (const [key, value] of Object.entries(managedAnnotations(scope.annotationPrefix, 'restore-target', entry))) builder.addAnnotation(key, value);
  if (placeholder === 'args') builder.setArgs([r.thawPausePath, '--', ...args]);
  // Its start begins the restore.
  addStartHook(scope, builder);
  scope.managed.set(containerId, entry);
  r.nativeHook?.server.expect(containerId, work);
  if (scope.coordinator?.restoreTargetCreated !== undefined) scope.coordinator.restoreTargetCreated(entry, checkpoint, incoming?.ready, lease);
  else await lease?.().catch(() => undefined);
  ctx.logger.info('thaw: restore target', { ...describeContainer(pod, container), checkpoint: checkpoint.name, controlDir, placeholder, ...(incoming ? { incoming: incoming.from, source: incoming.source } : {}) });
  return builder;
}
