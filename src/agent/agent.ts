/**
 * `thaw agent`: the one long-running thaw process of a node (design.md, "Processes on a node"). It holds the
 * NRI connection (pre-launched on nri.socket, or runtime-launched: containerd starts it with
 * NRI_PLUGIN_SOCKET), the engine (checkpoints and restores), the local store, the control API (gRPC on a
 * root-only unix socket) and /metrics.
 *
 * Start: claim the API socket (refused while another agent answers on it; a stale socket is replaced), remove
 * what an earlier agent left (unfinished store publications and leases: LocalStore.recover; CRIU work dirs of
 * checkpoints; after the first NRI Synchronize, restore work dirs and control dirs of containers that no
 * longer exist), then
 * connect. Synchronize hands every managed container back to the engine, which falls back (cold start) any
 * restore target that a dead agent left in its placeholder.
 *
 * Stop (SIGTERM/SIGINT, or `stop` aborted): new API calls are refused, NRI is closed, work in flight is
 * abandoned cleanly (a restore running falls back to a cold start; a checkpoint is cancelled and nothing is
 * published; a worker waiting is told checkpoint-complete {ok:false}), the sockets are closed; exit code 0.
 */
import { createWriteStream, existsSync, type WriteStream } from 'node:fs';
import { chmod, lstat, mkdir, readdir, rm, unlink } from 'node:fs/promises';
import { createServer, type Server as HttpServer } from 'node:http';
import { createConnection } from 'node:net';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { errorMessage, isThawError } from '../errors.js';
import { createJsonLogger, type Logger } from '../log.js';
import { DEFAULT_MEMORY_FILL_MAX_THREADS, DEFAULT_PAGES_COMPRESSION_LEVEL, MEMORY_FILL_NAME, NATIVE_HOOK_NAME, PAGES_PACK_NAME } from '../defaults.js';
import { hookSocketFor, UNIX_PATH_MAX_BYTES } from './hook-server.js';
import { createNriPlugin, readLaunchEnv, type NriHandlers } from '../nri-plugin/index.js';
import { undoJournalFor } from '../restore-engine/index.js';
import { removeControlDir } from '../sdk/index.js';
import { createAgentMetrics, PULLED_NAMESPACE_LABEL } from './agent-metrics.js';
import { loadAgentService } from './api-proto.js';
import { createApiHandlers, type ApiContext } from './api-server.js';
import { runningTaskPid } from './container-task.js';
import { ConfigError, ConfigErrorCode, type AgentConfig } from './config.js';
import type { RegistrySourceOptions } from './checkpoint-sources.js';
import { loadRegistryConfig } from './registry-config.js';
import { loadSigningKeys, loadTrustedKeys, storeLimitsOf } from './tenancy.js';
import type { SigningKey, TrustedKey } from '../store/index.js';
import { ContainerRegistry } from './containers.js';
import { createThawEngine, type ThawEngine } from './engine.js';
import { AgentError, AgentErrorCode } from './errors.js';
import { METRICS_CONTENT_TYPE } from './metrics.js';

export const API_SOCKET_MODE = 0o600;
export const API_DIR_MODE = 0o700;
/** A probe of an existing API socket: a live agent answers the connect at once. */
export const SOCKET_PROBE_TIMEOUT_MS = 2_000;
/** Calls in flight (a Checkpoint stream) get this long to end at shutdown before they are cut. */
export const API_SHUTDOWN_GRACE_MS = 5_000;
/** A runtime-launched agent waits this long for the instance launched before it to release the API socket. */
export const LAUNCHED_SOCKET_WAIT_MS = 10_000;
/** Checkpoint work dirs (restore-engine/checkpoint.ts) under the work root. */
const CHECKPOINT_WORK_DIR_PREFIX = 'thaw-ckpt-';

export interface AgentRunOptions {
  config: AgentConfig;
  version: string;
  /** argv of the OCI hook entry point (absolute paths). */
  hookArgv: string[];
  /** Aborted to stop the agent (the CLI aborts it on SIGTERM/SIGINT). */
  stop: AbortSignal;
  /** The environment that says whether a runtime launched us (NRI_PLUGIN_SOCKET); default process.env. */
  env?: NodeJS.ProcessEnv;
}

/** Probes `path`: a live agent → AGENT_ALREADY_RUNNING; a stale socket is removed; makes its dir root-only. */
export async function claimApiSocket(path: string, logger: Logger, waitForReleaseMs = 0): Promise<void> {
  const step = 'claim the API socket';
  const dir = dirname(path);
  await mkdir(dir, { recursive: true, mode: API_DIR_MODE });
  const st = await lstat(dir);
  const uid = process.getuid?.() ?? 0;
  if (!st.isDirectory() || st.uid !== uid) {
    throw new AgentError(AgentErrorCode.SOCKET, `${dir} must be a directory owned by uid ${uid} (it is ${st.isDirectory() ? `owned by uid ${st.uid}` : 'not a directory'})`, { step, evidence: { dir, uid: st.uid } });
  }
  if ((st.mode & 0o077) !== 0) {
    await chmod(dir, API_DIR_MODE);
    logger.warn('the API socket directory was open to others; made it 0700', { dir, mode: (st.mode & 0o777).toString(8) });
  }
  const existing = await lstat(path).catch(() => undefined);
  if (existing === undefined) return;
  if (!existing.isSocket()) throw new AgentError(AgentErrorCode.SOCKET, `${path} exists and is not a socket; remove it or choose another api.socket`, { step, evidence: { path } });
  const live = await new Promise<boolean>((resolve) => {
    const s = createConnection(path);
    const timer = setTimeout(() => (s.destroy(), resolve(true)), SOCKET_PROBE_TIMEOUT_MS); // no answer, no refusal: someone holds it
    s.once('connect', () => (clearTimeout(timer), s.destroy(), resolve(true)));
    s.once('error', () => (clearTimeout(timer), resolve(false)));
  });
  if (live && waitForReleaseMs > 0) {
    // Runtime-launched: containerd may start us while the instance it launched before is still exiting.
    const deadline = Date.now() + waitForReleaseMs;
    while (Date.now() < deadline && (await lstat(path).catch(() => undefined)) !== undefined) await new Promise((r) => setTimeout(r, 100));
    if ((await lstat(path).catch(() => undefined)) === undefined) return;
  }
  if (live) throw new AgentError(AgentErrorCode.ALREADY_RUNNING, `another agent answers on ${path}; stop it first (two agents would both act on every container)`, { step, evidence: { path } });
  await unlink(path);
  logger.info('removed a stale API socket (its agent is gone)', { path });
}

/** CRIU work dirs of checkpoints an earlier agent ran: no checkpoint runs before this agent starts one. */
async function removeStaleCheckpointWorkDirs(workRoot: string, logger: Logger): Promise<void> {
  for (const entry of await readdir(workRoot).catch(() => [] as string[])) {
    if (!entry.startsWith(CHECKPOINT_WORK_DIR_PREFIX)) continue;
    await rm(join(workRoot, entry), { recursive: true, force: true });
    logger.info('removed the work dir of an earlier agent\'s checkpoint', { path: join(workRoot, entry) });
  }
}

/**
 * Restore work dirs (`<workRoot>/<container id>`) of containers the runtime no longer has, and their rootfs-diff
 * undo journals (`<workRoot>/rootfs-undo/<container id>.json`, undoJournalFor). The journal of a container the
 * runtime still has is kept: its restore did not finish under the agent that died, and the fallback this agent
 * runs for it (recoverTarget, or restoreTargetStarted without a job) undoes the diff from it before the original
 * command runs; the poststop hook or the container's removal drops it after that.
 */
async function removeOrphanRestoreWorkDirs(workRoot: string, known: (id: string) => boolean, logger: Logger): Promise<void> {
  const journals = dirname(undoJournalFor(workRoot, 'x'));
  for (const entry of await readdir(workRoot).catch(() => [] as string[])) {
    if (entry.startsWith(CHECKPOINT_WORK_DIR_PREFIX) || known(entry) || join(workRoot, entry) === journals) continue;
    await rm(join(workRoot, entry), { recursive: true, force: true });
    logger.info('removed the restore work dir of a container that is gone', { path: join(workRoot, entry) });
  }
  for (const entry of await readdir(journals).catch(() => [] as string[])) {
    const id = entry.endsWith('.json') ? entry.slice(0, -'.json'.length) : entry;
    if (known(id) && undoJournalFor(workRoot, id) === join(journals, entry)) continue;
    // Its container is gone, and its rootfs with it: nothing is left to undo.
    await rm(join(journals, entry), { recursive: true, force: true });
    logger.info('removed the rootfs-diff undo journal of a container that is gone', { path: join(journals, entry) });
  }
}

/**
 * Control directories (`<controlRoot>/<container id>`) of containers the runtime no longer has: those an
 * on-demand checkpoint made for an unmanaged container are removed with it only while the same agent runs.
 */
async function removeOrphanControlDirs(controlRoot: string, known: (id: string) => boolean, logger: Logger): Promise<void> {
  for (const entry of await readdir(controlRoot).catch(() => [] as string[])) {
    if (!/^[0-9a-f]{64}$/.test(entry) || known(entry)) continue;
    await removeControlDir(controlRoot, entry);
    logger.info('removed the control directory of a container that is gone', { containerId: entry });
  }
}

/** The engine's handlers, plus what the agent learns of every container for the API. Subscriptions unchanged. */
function withRegistry(engine: ThawEngine, containers: ContainerRegistry, api: Pick<ApiContext, 'onDemandControlDirs' | 'controlRoot'>, afterFirstSync: () => Promise<void>, logger: Logger): NriHandlers {
  const h = engine.handlers;
  let synced = false;
  return {
    ...h,
    async synchronize(pods, list, ctx) {
      const podsById = new Map(pods.map((p) => [p.id ?? '', p]));
      for (const c of list) containers.seen(podsById.get(c.podSandboxId ?? '') ?? {}, c);
      const result = await h.synchronize!(pods, list, ctx);
      if (!synced) {
        synced = true;
        // In the background: an NRI handler answers within its deadline, and nothing waits for this.
        void afterFirstSync().then(
          () => logger.info('work root reconciled with the runtime'),
          (err: unknown) => logger.warn('reconciling the work root failed', { error: errorMessage(err) }),
        );
      }
      return result;
    },
    // Every container is recorded here, from the request's head (all the registry keeps): the plugin asks this
    // before any createContainer, which goes to the engine's handler unchanged.
    createContainerWanted(pod, c) {
      containers.seen(pod, c);
      return h.createContainerWanted?.(pod, c) ?? true;
    },
    async removeContainer(pod, c, ctx) {
      const id = c.id ?? '';
      containers.removed(id);
      if (api.onDemandControlDirs.delete(id)) {
        engine.checkpoints.containerGone(id);
        await removeControlDir(api.controlRoot, id).catch((err: unknown) => logger.warn('cannot remove the control directory', { containerId: id, error: errorMessage(err) }));
      }
      return h.removeContainer!(pod, c, ctx);
    },
  };
}

function listenHttp(server: HttpServer, listen: string): Promise<string> {
  const i = listen.lastIndexOf(':');
  const host = listen.slice(0, i).replace(/^\[(.*)\]$/, '$1');
  const port = Number(listen.slice(i + 1));
  return new Promise((resolve, reject) => {
    server.once('error', (err) => reject(new AgentError(AgentErrorCode.METRICS_LISTEN, `cannot listen on ${listen}: ${errorMessage(err)}`, { step: 'start /metrics', cause: err })));
    server.listen(port, host, () => {
      const a = server.address();
      resolve(typeof a === 'object' && a ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : listen);
    });
  });
}

function bindGrpc(server: grpc.Server, path: string): Promise<void> {
  return new Promise((resolve, reject) =>
    server.bindAsync(`unix:${path}`, grpc.ServerCredentials.createInsecure(), (err) =>
      err ? reject(new AgentError(AgentErrorCode.SOCKET, `cannot listen on ${path}: ${err.message}`, { step: 'start the control API', cause: err })) : resolve(),
    ),
  );
}

/** How old the store totals /metrics reports may be (a checkpoint's end refreshes them at once). */
export const STORED_TOTALS_MAX_AGE_MS = 60_000;

/** One computation shared by every caller until it is `maxAgeMs` old or invalidated; a failure is not kept. */
export function cachedValue<T>(maxAgeMs: number, compute: () => Promise<T>, now: () => number = Date.now): { get(): Promise<T>; invalidate(): void } {
  let value: { at: number; p: Promise<T> } | undefined;
  return {
    get() {
      if (value === undefined || now() - value.at > maxAgeMs) {
        const p = compute();
        const entry = { at: now(), p };
        value = entry;
        p.catch(() => {
          if (value === entry) value = undefined;
        });
      }
      return value.p;
    },
    invalidate() {
      value = undefined;
    },
  };
}

/** Builds the agent's logger from its config (a file is opened 0600 for appending). */
export function agentLogger(config: AgentConfig): { logger: Logger; close: () => Promise<void> } {
  let stream: WriteStream | undefined;
  if (config.log.file) stream = createWriteStream(config.log.file, { flags: 'a', mode: 0o600 });
  const logger = createJsonLogger({ level: config.log.level, ...(stream ? { write: (line: string) => void stream!.write(line) } : {}), fields: { component: 'thaw-agent' } });
  return { logger, close: () => new Promise<void>((resolve) => (stream ? stream.end(resolve) : resolve())) };
}

/** Runs the agent until `stop` aborts (exit code 0) or NRI fails for good (1). Throws on a start failure. */
export async function runAgent(o: AgentRunOptions, logger: Logger): Promise<number> {
  const c = o.config;
  const env = o.env ?? process.env;
  const startedAt = new Date().toISOString();
  let registry: RegistrySourceOptions | undefined;
  if (c.registry.config) {
    try {
      registry = await loadRegistryConfig(c.registry.config);
    } catch (err) {
      throw new ConfigError(ConfigErrorCode.INVALID, `registry.config ${c.registry.config}: ${errorMessage(err)}`, { step: 'load agent configuration', cause: err });
    }
  }
  let trustedKeys: Map<string, TrustedKey>;
  let signingKeys: Map<string, SigningKey>;
  try {
    trustedKeys = await loadTrustedKeys(c.tenancy);
    signingKeys = await loadSigningKeys(c.tenancy, trustedKeys);
  } catch (err) {
    throw new ConfigError(ConfigErrorCode.INVALID, `tenancy: ${errorMessage(err)}`, { step: 'load agent configuration', cause: err });
  }
  const launched = env['NRI_PLUGIN_SOCKET'] !== undefined;
  await claimApiSocket(c.api.socket, logger, launched ? LAUNCHED_SOCKET_WAIT_MS : 0);
  await mkdir(c.paths.workRoot, { recursive: true, mode: 0o700 });
  await removeStaleCheckpointWorkDirs(c.paths.workRoot, logger);

  // The engine's events go to the metrics, which read the engine back at scrape: wire them through a holder.
  let metrics: ReturnType<typeof createAgentMetrics> | undefined;
  // What the store holds, for /metrics: listing opens every manifest, so a scrape (anyone who can reach the
  // port, as often as they like) reads a copy refreshed at most every STORED_TOTALS_MAX_AGE_MS, or after a
  // checkpoint ended.
  const storedTotals = cachedValue(STORED_TOTALS_MAX_AGE_MS, async () => {
    const listed = await engine.store.list();
    const snapshots = new Map<string, { namespace: string; snapshot: string; count: number }>();
    const byNamespace = new Map<string, { count: number; bytes: number }>();
    for (const l of listed) {
      const ns = l.namespace ?? PULLED_NAMESPACE_LABEL;
      const v = byNamespace.get(ns) ?? { count: 0, bytes: 0 };
      v.count++;
      v.bytes += l.manifest?.totals.bytes ?? 0;
      byNamespace.set(ns, v);
      const m = l.manifest;
      if (m?.snapshot === undefined) continue;
      const namespace = l.namespace ?? m.source.pod?.namespace ?? '';
      const k = `${namespace}\0${m.snapshot.name}`;
      const row = snapshots.get(k) ?? { namespace, snapshot: m.snapshot.name, count: 0 };
      row.count++;
      snapshots.set(k, row);
    }
    return { count: listed.length, bytes: listed.reduce((a, l) => a + (l.manifest?.totals.bytes ?? 0), 0), byNamespace, snapshots: [...snapshots.values()] };
  });
  // The native createRuntime hook is built beside thaw-pause; without it, restores run the Node.js hook.
  const nativeHookPath = join(dirname(c.paths.thawPause), NATIVE_HOOK_NAME);
  const hookSocket = hookSocketFor(c.api.socket);
  const nativeHook = c.restore.hook === 'native' && existsSync(nativeHookPath) && Buffer.byteLength(hookSocket) <= UNIX_PATH_MAX_BYTES ? { path: nativeHookPath, socketPath: hookSocket } : undefined;
  if (nativeHook === undefined && c.restore.hook === 'native') logger.warn('thaw: no native createRuntime hook (not built, or its socket path is too long); restores use the Node.js hook (a Node.js start per restore)', { nativeHook: nativeHookPath, socket: hookSocket });
  // thaw-fill is built beside thaw-pause too; without it (or with restore.memoryFill criu) CRIU fills the memory.
  const fillPath = join(dirname(c.paths.thawPause), MEMORY_FILL_NAME);
  const coreThreads = Math.min(DEFAULT_MEMORY_FILL_MAX_THREADS, availableParallelism());
  const memoryFill = c.restore.memoryFill === 'thaw-fill' && existsSync(fillPath)
    ? { binary: fillPath, threads: c.restore.fillThreads > 0 ? c.restore.fillThreads : coreThreads }
    : undefined;
  if (memoryFill === undefined && c.restore.memoryFill === 'thaw-fill') logger.warn('thaw: no thaw-fill (not built); CRIU fills restored memory on one thread', { fill: fillPath });
  // thaw-pack too; it compresses on one thread per core up to the fill's default count (the node's CPU is shared).
  const packPath = join(dirname(c.paths.thawPause), PAGES_PACK_NAME);
  const compressPages = c.checkpoint.compressPages === 'zstd' && existsSync(packPath)
    ? { binary: packPath, threads: coreThreads, level: DEFAULT_PAGES_COMPRESSION_LEVEL }
    : undefined;
  if (compressPages === undefined && c.checkpoint.compressPages === 'zstd') logger.warn('thaw: no thaw-pack (not built); checkpoints keep their pages plain', { pack: packPath });
  const engine = await createThawEngine({
    logger,
    annotationPrefix: c.annotationPrefix,
    controlRoot: c.paths.controlRoot,
    storeRoot: c.paths.storeRoot,
    toolkitDir: c.paths.toolkitDir,
    thawPausePath: c.paths.thawPause,
    hookArgv: o.hookArgv,
    ...(nativeHook !== undefined ? { nativeHook } : {}),
    ...(memoryFill !== undefined ? { memoryFill } : {}),
    ...(compressPages !== undefined ? { compressPages } : {}),
    workRoot: c.paths.workRoot,
    containerd: { socket: c.containerd.socket, root: c.containerd.root },
    ...(c.cuda.libcuda ? { libcudaPath: c.cuda.libcuda } : {}),
    ...(c.cuda.libnvml ? { libnvmlPath: c.cuda.libnvml } : {}),
    cudaLockTimeoutMs: c.cuda.lockTimeoutMs,
    weightsModelDirs: c.weights.modelDirs === '' ? [] : c.weights.modelDirs.split(':'),
    weightsReaders: c.weights.readers,
    weightsOrder: c.weights.order,
    thawPauseDeadlineMs: c.restore.pauseDeadlineMs,
    ...(c.paths.sharedStoreRoot ? { sharedStoreRoot: c.paths.sharedStoreRoot } : {}),
    ...(registry ? { registry } : {}),
    tenancy: c.tenancy,
    trustedKeys,
    signingKeys,
    storeLimits: storeLimitsOf(c.store, c.tenancy),
    maxConcurrentHashing: c.limits.hashing,
    maxConcurrentCriu: c.limits.criuRuns,
    onRestoreEvent: (e) => metrics?.onRestoreEvent(e),
    onCheckpointEvent: (e) => {
      storedTotals.invalidate();
      metrics?.onCheckpointEvent(e);
    },
  });
  metrics = createAgentMetrics({
    stats: engine.stats,
    version: o.version,
    restoresInFlight: () => engine.restores.inFlight().length,
    checkpointsInFlight: () => engine.checkpoints.status().filter((s) => s.state === 'waiting-for-worker' || s.state === 'checkpointing').length,
    stored: () => storedTotals.get(),
    snapshotPods: () => engine.snapshots.rows(),
    gc: () => engine.gcTotals,
  });

  const containers = new ContainerRegistry();
  let stopping = false;
  let nriState = 'disconnected';
  let runtime = '';
  const api: ApiContext = {
    engine,
    containers,
    controlRoot: c.paths.controlRoot,
    logger,
    version: o.version,
    startedAt,
    nriState: () => (stopping ? 'stopping' : nriState),
    runtime: () => runtime,
    stopping: () => stopping,
    onDemandControlDirs: new Set(),
    taskPid: (id) => runningTaskPid(id, c.containerd),
  };

  const identity = launched ? readLaunchEnv(env) : { name: c.nri.pluginName, idx: c.nri.pluginIndex, fd: undefined };
  const reconcile = async (): Promise<void> => {
    await removeOrphanRestoreWorkDirs(c.paths.workRoot, (id) => engine.handlers.managed.has(id), logger);
    await removeOrphanControlDirs(c.paths.controlRoot, (id) => containers.has(id), logger);
  };
  const handlers = withRegistry(engine, containers, api, reconcile, logger);
  const plugin = createNriPlugin({
    name: identity.name,
    idx: identity.idx,
    handlers,
    logger,
    onConfigure: (info) => {
      runtime = `${info.name} ${info.version}`;
      engine.setRuntimeVersion(info.version);
    },
    // Per-request service time at debug level: what bench:nri reads to separate the plugin's own cost from
    // the machine's noise.
    onRequestServed: (served) => logger.debug('nri request served', { method: served.method, durationMs: Number(served.durationMs.toFixed(3)), code: served.code }),
    ...(launched ? { fd: identity.fd as number } : { socketPath: c.nri.socket }),
  });
  plugin.onStateChange((state) => {
    nriState = state === 'synchronized' || state === 'configured' ? 'connected' : 'disconnected';
  });

  const { service } = loadAgentService();
  const grpcServer = new grpc.Server();
  grpcServer.addService(service, createApiHandlers(api));
  const httpServer = createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
      return;
    }
    metrics!.registry.render().then(
      (text) => res.writeHead(200, { 'content-type': METRICS_CONTENT_TYPE }).end(text),
      (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${errorMessage(err)}\n`),
    );
  });

  try {
    await bindGrpc(grpcServer, c.api.socket);
    await chmod(c.api.socket, API_SOCKET_MODE);
    const metricsAddress = c.metrics.listen ? await listenHttp(httpServer, c.metrics.listen) : '';
    logger.info('thaw agent started', {
      version: o.version,
      pid: process.pid,
      mode: launched ? 'runtime-launched' : 'pre-launched',
      apiSocket: c.api.socket,
      metrics: metricsAddress ? `http://${metricsAddress}/metrics` : 'disabled',
      storeRoot: c.paths.storeRoot,
    });
  } catch (err) {
    grpcServer.forceShutdown();
    httpServer.close();
    await engine.close();
    await unlink(c.api.socket).catch(() => undefined);
    throw err;
  }

  void plugin.start().catch(() => undefined); // failures surface through `stopped`
  const stopRequested = new Promise<'stop'>((resolve) => {
    if (o.stop.aborted) resolve('stop');
    else o.stop.addEventListener('abort', () => resolve('stop'), { once: true });
  });
  const first = await Promise.race([stopRequested, plugin.stopped]);
  stopping = true;
  logger.info('thaw agent stopping', { why: first === 'stop' ? 'signal' : `nri ${first.reason}`, restoresInFlight: engine.restores.inFlight().length });
  await plugin.close();
  const info = await plugin.stopped;
  // Abandon work in flight: restores fall back (cold start), checkpoints are cancelled; then let the API streams end.
  await engine.close();
  await new Promise<void>((resolve) => {
    const timer = setTimeout(() => grpcServer.forceShutdown(), API_SHUTDOWN_GRACE_MS);
    grpcServer.tryShutdown(() => (clearTimeout(timer), resolve()));
  });
  httpServer.closeAllConnections();
  await new Promise<void>((resolve) => httpServer.close(() => resolve()));
  await unlink(c.api.socket).catch(() => undefined);
  const code = first !== 'stop' && info.reason === 'error' ? 1 : 0;
  logger.info('thaw agent stopped', { reason: first === 'stop' ? 'signal' : info.reason, exitCode: code, ...(info.error ? { error: info.error } : {}) });
  return code;
}

/** A start failure as one log line: its code and evidence. */
export function describeStartFailure(err: unknown): Record<string, unknown> {
  return isThawError(err) ? err.toJSON() : { message: errorMessage(err) };
}
