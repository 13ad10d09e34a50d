/**
 * The engine behind thaw's NRI handlers, assembled from its parts: the local store, one CRIU client, the
 * checkpoint coordinator (sources) and the restore coordinator (targets). The agent (agent.ts) builds it once
 * per process.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage } from '../errors.js';
import { CHECKPOINT_COMPLETE } from '../sdk/index.js';
import type { Logger } from '../log.js';
import { CriuClient, criuEnvironment, parentDeathWrapper, readContainerdImageDigest } from '../restore-engine/index.js';
import { openLocalStore, pushCheckpoint, weightsCacheDir, type LocalStore } from '../store/index.js';
import { bindPageCache, readIntoPageCache } from '../sys/page-cache.js';
import { DEFAULT_MOUNT_PATH, DEFAULT_UMOUNT_PATH } from '../oci-hooks/index.js';
import { DEFAULT_SH_PATH, SourceDigests } from '../restore-engine/index.js';
import { restoreToolFiles } from './restore-tools.js';
import { CheckpointCoordinator, type CheckpointEvent } from './checkpoint-coordinator.js';
import { createCheckpointSources, type RegistrySourceOptions } from './checkpoint-sources.js';
import type { GcResult, SigningKey, StoreLimits, TrustedKey } from '../store/index.js';
import type { TenancyPolicy } from './tenancy.js';
import { checkpointHooksFactory, cudaRestoreStep, loadNodeCuda, recoverCudaProcesses, type NodeCuda } from './cuda-steps.js';
import type { ContainerdEndpoint, RestoreEvent } from '../restore-engine/index.js';
import type { ManagedContainer, ThawCoordinator } from './managed-container.js';
import { ThawNriStats } from './nri-stats.js';
import { createRestoreCoordinator, type RestoreCoordinator } from './restore-coordinator.js';
import { createThawNriHandlers } from './thaw-nri.js';
import { startHookServer } from './hook-server.js';
import { runningTaskPid } from './container-task.js';
import { AgentError, AgentErrorCode } from './errors.js';
import { DEFAULT_MAX_CONCURRENT_CRIU, DEFAULT_MAX_CONCURRENT_HASHING, DEFAULT_MEMORY_FILL_TIMEOUT_MS, DEFAULT_NSENTER_PATH, DEFAULT_SNAPSHOT_IMAGE_LOOKUP_TIMEOUT_MS, DEFAULT_UNSHARE_PATH, START_POLL_INTERVAL_MS, WEIGHTS_DIGESTS_FILE, type WeightsOrder } from '../defaults.js';
import { snapshotReference, SnapshotTracker } from './snapshot.js';
import { Limiter } from '../sys/concurrency.js';
import { PULLED_NAMESPACE_LABEL } from './agent-metrics.js';


export interface ThawEngineOptions {
  logger: Logger;
  annotationPrefix: string;
  controlRoot: string;
  storeRoot: string;
  /** The toolkit prefix: CRIU and the GNU tar and gzip it runs for tmpfs contents, under `<prefix>/bin` (e.g. /opt/thaw/stack/1.7). */
  toolkitDir: string;
  /** Host path of the static thaw-pause binary. */
  thawPausePath: string;
  /** argv that runs the OCI hook entry point (absolute paths: runc gives hooks no PATH). */
  hookArgv: string[];
  /**
   * The native createRuntime hook (native/build/thaw-hook) and where the engine serves it (a unix socket in a
   * root-only directory): absent, restores use the Node.js hook of hookArgv.
   */
  nativeHook?: { path: string; socketPath: string };
  /**
   * thaw-fill (native/build/thaw-fill) and its threads: restores fill memory through userfaultfd when CRIU and
   * the kernel offer lazy pages (asked once at start); absent, or when they do not, CRIU fills it.
   */
  memoryFill?: { binary: string; threads: number };
  /**
   * thaw-pack (native/build/thaw-pack), its threads and zstd level: checkpoints compress their lazy pages
   * (compressed-pages.ts). Only where memoryFill works here: such a checkpoint restores only through thaw-fill.
   */
  compressPages?: { binary: string; threads: number; level: number };
  /** CRIU work dirs: `<workRoot>/<container id>` for restores, `<workRoot>/thaw-ckpt-<name>-*` for checkpoints. */
  workRoot: string;
  /** containerd's gRPC socket and root: where a checkpoint learns its container's upperdir (config `containerd.*`). */
  containerd: ContainerdEndpoint;
  /** libcuda / NVML to load (default: the system's, found by the dynamic loader). Tests pass the fake's. */
  libcudaPath?: string;
  libnvmlPath?: string;
  /** The driver's lock timeout for a checkpoint (default DEFAULT_CUDA_LOCK_TIMEOUT_MS, src/defaults.ts). */
  cudaLockTimeoutMs?: number;
  /**
   * Host directories the weights service may read weights sources from, through a restore target's bind
   * mounts (absolute). Sources inside the container's rootfs need none.
   */
  weightsModelDirs?: string[];
  /** Parallel reads of a restore's weights (config weights.readers); default WEIGHTS_READERS_DEFAULT. */
  weightsReaders?: number;
  /** When a restore reads its weights (config weights.order); default WEIGHTS_ORDER_DEFAULT. */
  weightsOrder?: WeightsOrder;
  /** thaw-pause's deadline without a word from the agent (default DEFAULT_THAW_PAUSE_DEADLINE_MS). */
  thawPauseDeadlineMs?: number;
  /** A shared store (an RWX volume on every node), looked up after the local store; absent: none. */
  sharedStoreRoot?: string;
  /** uid owning the shared store (default 0). */
  sharedStoreOwnerUid?: number;
  /** Registries a restore annotation may name (`registry/repo:tag`); absent: references cold-start. */
  registry?: RegistrySourceOptions;
  /** Who may checkpoint and restore what (agent config `tenancy`); absent: defaultTenancyPolicy(). */
  tenancy?: TenancyPolicy;
  /** The policy's public keys by file path (loadTrustedKeys). */
  trustedKeys?: ReadonlyMap<string, TrustedKey>;
  /** The keys snapshot pushes are signed with, by namespace (loadSigningKeys); a namespace without one: unsigned. */
  signingKeys?: ReadonlyMap<string, SigningKey>;
  /** Files hashed at once in the whole agent (config limits.hashing; default DEFAULT_MAX_CONCURRENT_HASHING). */
  maxConcurrentHashing?: number;
  /** CRIU processes at once in the whole agent (config limits.criuRuns; default DEFAULT_MAX_CONCURRENT_CRIU). */
  maxConcurrentCriu?: number;
  /** The local store's bounds (storeLimitsOf); absent: the tenancy policy's namespace quotas only. */
  storeLimits?: StoreLimits;
  /** Told of every restore / checkpoint event after it is logged (the agent's metrics). */
  onRestoreEvent?: (event: RestoreEvent) => void;
  onCheckpointEvent?: (event: CheckpointEvent) => void;
}

export interface ThawEngine {
  handlers: ReturnType<typeof createThawNriHandlers>;
  store: LocalStore;
  checkpoints: CheckpointCoordinator;
  restores: RestoreCoordinator;
  stats: ThawNriStats;
  /** `thaw.dev/snapshot` claims and how each snapshot pod started (snapshot.ts). */
  snapshots: SnapshotTracker;
  /** The node's CUDA driver, when it has one (undefined: workers are checkpointed as CPU-only). */
  cuda: NodeCuda | undefined;
  /** CRIU's version (major.minor.sublevel). */
  criuVersion: string;
  /** Whether restores here place compressed pages (thaw-fill with CRIU's lazy pages): manifest.ts checkCompatibility. */
  placesCompressedPages: boolean;
  /** The local store's bounds. */
  storeLimits: StoreLimits;
  /** Collects least recently used checkpoints no restore uses until the bounds hold (`thaw gc`). */
  collectGarbage(options?: { dryRun?: boolean }): Promise<GcResult>;
  /** What collection removed since the agent started (for /metrics). */
  gcTotals: GcTotals;
  /** Tells the engine the runtime's version (from NRI Configure), for manifests. */
  setRuntimeVersion(version: string): void;
  /** Abandons work in flight (checkpoint waits, restores) and waits for it to settle. */
  close(): Promise<void>;
}

/** What the store's collection removed since the agent started, per owning namespace (pulled: PULLED_NAMESPACE_LABEL). */
export interface GcTotals {
  runs: number;
  checkpoints: Map<string, number>;
  bytes: Map<string, number>;
  cacheFiles: number;
  cacheBytes: number;
}

export async function createThawEngine(o: ThawEngineOptions): Promise<ThawEngine> {
  const logger = o.logger;
  const binDir = join(o.toolkitDir, 'bin');
  const gcTotals: GcTotals = { runs: 0, checkpoints: new Map(), bytes: new Map(), cacheFiles: 0, cacheBytes: 0 };
  const countCollected = (r: GcResult): void => {
    gcTotals.runs++;
    for (const c of r.collected) {
      const ns = c.namespace ?? PULLED_NAMESPACE_LABEL;
      gcTotals.checkpoints.set(ns, (gcTotals.checkpoints.get(ns) ?? 0) + 1);
      gcTotals.bytes.set(ns, (gcTotals.bytes.get(ns) ?? 0) + c.bytes);
    }
    gcTotals.cacheFiles += r.cacheFiles;
    gcTotals.cacheBytes += r.cacheBytes;
  };
  // One bound per kind of work for the whole agent: every checkpoint, restore and copy shares it.
  const hashLimiter = new Limiter(o.maxConcurrentHashing ?? DEFAULT_MAX_CONCURRENT_HASHING);
  const criuLimiter = new Limiter(o.maxConcurrentCriu ?? DEFAULT_MAX_CONCURRENT_CRIU);
  const store = await openLocalStore({ root: o.storeRoot, logger, onCollect: countCollected, hashLimiter });
  const storeLimits: StoreLimits = o.storeLimits ?? { namespaceQuotaBytes: (ns) => o.tenancy?.namespaces.get(ns)?.quotaBytes };
  const shared = o.sharedStoreRoot !== undefined ? await openLocalStore({ root: o.sharedStoreRoot, logger, hashLimiter, ...(o.sharedStoreOwnerUid !== undefined ? { ownerUid: o.sharedStoreOwnerUid } : {}) }) : undefined;
  const sources =
    shared !== undefined || o.registry !== undefined
      ? createCheckpointSources({
          local: store,
          logger,
          ...(shared ? { shared } : {}),
          ...(o.registry ? { registry: o.registry } : {}),
          ...(o.tenancy ? { policy: o.tenancy } : {}),
          ...(o.trustedKeys ? { trustedKeys: o.trustedKeys } : {}),
          limits: storeLimits,
        })
      : undefined;
  await mkdir(o.workRoot, { recursive: true, mode: 0o700 });
  // CRIU runs GNU tar and gzip from its PATH (tmpfs contents on restore): the toolkit's come first.
  const dieWithAgent = parentDeathWrapper();
  if (dieWithAgent === undefined) logger.warn('no /usr/bin/setpriv (util-linux): a CRIU started by this agent outlives it if the agent is killed');
  const criu = new CriuClient({
    criuPath: join(binDir, 'criu'),
    logger,
    env: criuEnvironment(binDir),
    limiter: criuLimiter,
    ...(dieWithAgent !== undefined ? { parentDeathWrapper: dieWithAgent } : {}),
  });
  const criuVersion = await criu.version();
  // Lazy pages need CRIU's support and the kernel's userfaultfd (CRIU's feature check asks both).
  const memoryFill = o.memoryFill === undefined
    ? undefined
    : await criu.featureCheck().then(
        (f) => (f.lazyPages ? { ...o.memoryFill!, timeoutMs: DEFAULT_MEMORY_FILL_TIMEOUT_MS } : undefined),
        (err: unknown) => (logger.warn('CRIU\'s feature check failed: CRIU fills restored memory', { error: errorMessage(err) }), undefined),
      );
  if (o.memoryFill !== undefined && memoryFill === undefined) logger.warn('thaw: no lazy pages here (CRIU or the kernel\'s userfaultfd): CRIU fills restored memory on one thread');
  // A checkpoint with compressed pages restores only through thaw-fill: none are made where it cannot run, and
  // restore targets of one are refused at CreateContainer (manifest.ts checkCompatibility, `pages`).
  const placesCompressedPages = memoryFill !== undefined;
  const compressPages = placesCompressedPages ? o.compressPages : undefined;
  if (o.compressPages !== undefined && compressPages === undefined) logger.warn('thaw: checkpoints keep their pages plain: compressed pages need thaw-fill, which cannot run here');
  const criuVersionText = `${criuVersion.major}.${criuVersion.minor}.${criuVersion.sublevel}`;
  let runtimeVersion = 'unknown';
  const stats = new ThawNriStats();
  const snapshots = new SnapshotTracker();
  const repositoryFor = (namespace: string): string | undefined => o.tenancy?.namespaces.get(namespace)?.snapshotRepository;
  // Pushes of snapshot checkpoints to their namespace's repository, in the background.
  const pushes = new Set<Promise<void>>();
  // Aborted at close(): the background work of the engine itself (pushes, start watches) stops.
  const stopping = new AbortController();
  let managedOf: (containerId: string) => ManagedContainer | undefined = () => undefined;
  const pushSnapshot = (e: CheckpointEvent): void => {
    const c = managedOf(e.containerId);
    const repository = c?.snapshot !== undefined ? repositoryFor(c.podNamespace) : undefined;
    if (c === undefined || repository === undefined) return;
    // The tag is the name within the namespace (the store key's '/' has no place in a tag).
    const reference = snapshotReference(repository, e.name.slice(e.name.indexOf('/') + 1));
    const host = repository.slice(0, repository.indexOf('/'));
    const access = o.registry?.access?.[host];
    const log = logger.child({ component: 'snapshot-push', reference, checkpoint: e.name });
    if (access === undefined) {
      log.warn('snapshot not pushed: its repository\'s registry is not in the registry access file (registry.config)', { event: 'snapshot-push', outcome: 'skipped', registry: host });
      return;
    }
    const started = performance.now();
    const withWeights = o.tenancy?.namespaces.get(c.podNamespace)?.snapshotWeightsLayers === true ? { withWeights: { dirs: o.weightsModelDirs ?? [] } } : {};
    const sign = o.signingKeys?.get(c.podNamespace);
    const p = pushCheckpoint({ store, name: e.name, reference, access, logger, signal: stopping.signal, ...withWeights, ...(sign ? { sign } : {}) }).then(
      (r) => log.info('snapshot pushed', {
        event: 'snapshot-push', outcome: 'succeeded', digest: r.digest, bytesUploaded: r.bytesUploaded, ms: Math.round(performance.now() - started),
        weightsLayers: r.weightsLayers,
        ...(r.signature ? { signedBy: sign!.source, signatureTag: r.signature.tag } : { signed: false }),
      }),
      (err: unknown) => log.warn('snapshot push failed; other nodes take their own checkpoint', { event: 'snapshot-push', outcome: 'failed', error: errorMessage(err) }),
    );
    pushes.add(p);
    void p.finally(() => pushes.delete(p));
  };
  // Once per process: every checkpoint and restore is a call on this one driver (no cuInit per action).
  const cuda = loadNodeCuda({
    logger,
    ...(o.libcudaPath !== undefined ? { libcudaPath: o.libcudaPath } : {}),
    ...(o.libnvmlPath !== undefined ? { libnvmlPath: o.libnvmlPath } : {}),
  });
  // The weights service (docs/weights.md): one digest cache per node, beside the restores' work dirs.
  const weightsDigests = new SourceDigests(join(o.workRoot, WEIGHTS_DIGESTS_FILE));
  const collectGarbage = (options: { dryRun?: boolean } = {}): Promise<GcResult> => store.collectGarbage(storeLimits, options);
  const checkpoints = new CheckpointCoordinator({
    weights: { digests: weightsDigests },
    store,
    criu,
    criuVersion: criuVersionText,
    storeLimits,
    onEvent: (e: CheckpointEvent) => {
      if (e.outcome === 'succeeded') pushSnapshot(e);
      snapshots.onCheckpointEvent(e);
      o.onCheckpointEvent?.(e);
      // A checkpoint published: the store's bounds are kept at once (the room was made before; a replace or a
      // concurrent pull may have used it up since).
      if (e.outcome === 'succeeded') void collectGarbage().catch((err: unknown) => logger.warn('store collection failed', { error: errorMessage(err) }));
    },
    containerdVersion: () => runtimeVersion,
    logger,
    onCheckpointOf: (c: ManagedContainer) => c.onCheckpoint ?? 'continue',
    // CRIU's work dirs (dump.log, kept after a failed dump) beside the restores', not in the node's /tmp.
    workRoot: o.workRoot,
    containerd: o.containerd,
    ...(compressPages !== undefined ? { compressPages } : {}),
    ...(cuda ? { cuda: checkpointHooksFactory({ node: cuda, logger, ...(o.cudaLockTimeoutMs !== undefined ? { lockTimeoutMs: o.cudaLockTimeoutMs } : {}) }) } : {}),
  });
  // What a restore runs besides the checkpoint, listed once (ld.so --list per executable) at the first prefetch.
  // tar stays in it: thaw no longer runs it (the rootfs diff is applied in-process), but CRIU's restore does, for
  // the tmpfs contents it dumped (a container's /dev).
  const pageCache = bindPageCache();
  let toolFiles: Promise<string[]> | undefined;
  const warmTools = async (signal: AbortSignal): Promise<void> => {
    toolFiles ??= restoreToolFiles({
      hookArgv: o.hookArgv,
      thawPausePath: o.thawPausePath,
      executables: [join(binDir, 'criu'), join(binDir, 'tar'), join(binDir, 'busybox'), DEFAULT_NSENTER_PATH, DEFAULT_UNSHARE_PATH, DEFAULT_MOUNT_PATH, DEFAULT_UMOUNT_PATH, DEFAULT_SH_PATH, ...(o.nativeHook !== undefined ? [o.nativeHook.path] : []), ...(memoryFill !== undefined ? [memoryFill.binary] : []), ...(dieWithAgent ?? []).slice(0, 1)],
    });
    const r = await readIntoPageCache(await toolFiles, pageCache, { signal });
    if (r.bytesRead > 0) logger.debug('restore tools read into the page cache', { files: r.files, bytesRead: r.bytesRead, skipped: r.skipped });
  };
  const restores = createRestoreCoordinator({
    warmTools,
    store,
    criu,
    logger,
    stats,
    workRoot: o.workRoot,
    toolkitBinDir: binDir,
    thawPausePath: o.thawPausePath,
    ...(o.thawPauseDeadlineMs !== undefined ? { thawPauseDeadlineMs: o.thawPauseDeadlineMs } : {}),
    onEvent: (e: RestoreEvent) => {
      snapshots.onRestoreEvent(e);
      o.onRestoreEvent?.(e);
    },
    ...(cuda ? { cudaRestore: cudaRestoreStep({ node: cuda, logger }) } : {}),
    ...(memoryFill !== undefined ? { memoryFill } : {}),
    ...(cuda?.vmm ? { weights: { vmm: cuda.vmm, digests: weightsDigests, modelDirs: o.weightsModelDirs ?? [], weightsCacheDir: weightsCacheDir(store.root), gpuCount: cuda.facts?.uuids.length ?? 0, ...(o.weightsReaders !== undefined ? { readers: o.weightsReaders } : {}), ...(o.weightsOrder !== undefined ? { order: o.weightsOrder } : {}) } } : {}),
  });
  // One coordinator for the handlers: sources go to the checkpoint side, targets to the restore side.
  const coordinator: ThawCoordinator = {
    checkpointSourceStarted: (c, pid) => checkpoints.checkpointSourceStarted(c, pid),
    restorePodCreated: (podId, name) => restores.restorePodCreated(podId, name),
    podGone: (podId) => restores.podGone(podId),
    restoreTargetCreated: (c, checkpoint, incoming, lease) => restores.restoreTargetCreated(c, checkpoint, incoming, lease),
    restoreTargetStarted: (c, pid) => restores.restoreTargetStarted(c, pid),
    containerGone: (id) => {
      snapshots.containerGone(id);
      checkpoints.containerGone(id);
      restores.containerGone(id);
    },
    containerStopped: (id) => {
      snapshots.containerGone(id);
      checkpoints.containerGone(id);
    },
    containerRecovered: (c, pid) => {
      if (c.role === 'restore-target') {
        void restores.recoverTarget(c, pid).catch((err: unknown) => logger.error('thaw: recovering a restore target failed', { containerId: c.containerId, error: errorMessage(err) }));
        return;
      }
      // A source: first give its CUDA processes back if a killed predecessor left them locked or checkpointed,
      // then, if its checkpoint was not finished, wait for (or act on) its ready marker again.
      void (async () => {
        if (cuda) await recoverCudaProcesses(cuda, pid, logger.child({ containerId: c.containerId }));
        if (existsSync(join(c.controlDir, CHECKPOINT_COMPLETE))) return;
        // A snapshot source the previous agent was waiting on holds the claim again (its worker waits on this
        // checkpoint, so it is taken whatever the claim says).
        if (c.snapshot !== undefined) {
          snapshots.claims.tryClaim({ namespace: c.podNamespace, name: c.snapshot.name, key: c.snapshot.key }, c.containerId);
          snapshots.expect(c.containerId, { namespace: c.podNamespace, snapshot: c.snapshot.name, via: 'checkpoint' });
        }
        checkpoints.checkpointSourceStarted(c, pid);
      })();
    },
  };
  // No hook server (its socket cannot be made): restores use the Node.js hook; the agent itself starts regardless.
  // The handlers are made with the server (their adjustments name its socket); a start reaches them through this.
  let containerStarted: ((containerId: string, pid: number) => void) | undefined;
  const hookServer =
    o.nativeHook !== undefined
      ? await startHookServer({ socketPath: o.nativeHook.socketPath, logger, onStarted: (id, pid) => containerStarted?.(id, pid) }).catch((err: unknown) => {
          logger.warn('thaw: the native createRuntime hook\'s socket cannot be served; restores use the Node.js hook', { socket: o.nativeHook?.socketPath, error: errorMessage(err) });
          return undefined;
        })
      : undefined;
  // Asks containerd until the container runs, is removed (no longer managed), or the agent stops.
  const watchStart = (containerId: string, started: (pid: number) => void): void => {
    void (async () => {
      let lastProblem = '';
      while (!stopping.signal.aborted && handlers.managed.has(containerId)) {
        try {
          started(await runningTaskPid(containerId, o.containerd));
          return;
        } catch (err) {
          const code = err instanceof AgentError ? err.code : 'INTERNAL';
          if (code !== AgentErrorCode.CONTAINER_NOT_RUNNING && code !== lastProblem) logger.warn('thaw: cannot ask containerd whether a container started; asking again', { containerId, error: errorMessage(err) });
          lastProblem = code;
        }
        await sleep(START_POLL_INTERVAL_MS, undefined, { signal: stopping.signal }).catch(() => undefined);
      }
    })();
  };
  const handlers = createThawNriHandlers({
    watchStart,
    annotationPrefix: o.annotationPrefix,
    controlRoot: o.controlRoot,
    coordinator,
    stats,
    snapshot: {
      tracker: snapshots,
      imageDigestOf: (name) => readContainerdImageDigest(name, { ...o.containerd, timeoutMs: o.containerd.timeoutMs ?? DEFAULT_SNAPSHOT_IMAGE_LOOKUP_TIMEOUT_MS }),
      repositoryFor,
      ...(cuda?.facts ? { gpuFacts: cuda.facts } : {}),
    },
    ...(o.tenancy ? { tenancy: o.tenancy } : {}),
    restore: {
      store,
      ...(sources ? { sources } : {}),
      toolkitDir: o.toolkitDir,
      thawPausePath: o.thawPausePath,
      hookArgv: o.hookArgv,
      ...(o.nativeHook !== undefined && hookServer !== undefined ? { nativeHook: { path: o.nativeHook.path, server: hookServer } } : {}),
      workRoot: o.workRoot,
      ...(o.thawPauseDeadlineMs !== undefined ? { thawPauseDeadlineMs: o.thawPauseDeadlineMs } : {}),
      ...(cuda?.facts ? { gpuFacts: cuda.facts } : {}),
      placesCompressedPages,
    },
  });
  containerStarted = handlers.containerStarted;
  managedOf = (id) => handlers.managed.get(id);
  return {
    handlers,
    store,
    checkpoints,
    restores,
    stats,
    snapshots,
    cuda,
    criuVersion: criuVersionText,
    placesCompressedPages,
    storeLimits,
    collectGarbage,
    gcTotals,
    setRuntimeVersion: (v) => {
      runtimeVersion = v;
    },
    close: async () => {
      stopping.abort(new Error('agent stopping'));
      await Promise.allSettled([checkpoints.close(), restores.close(), sources?.close(), hookServer?.close(), ...pushes]);
    },
  };
}
