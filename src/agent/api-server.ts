/**
 * The control API's handlers (proto/thaw/agent/v1/agent.proto) over the engine, the store and the container
 * registry. Errors go back as a gRPC status with thaw's code in the `thaw-code` trailer (statusOf); nothing a
 * caller sends can stop the agent. While the agent stops, every new call gets UNAVAILABLE (AGENT_STOPPING).
 */
import * as grpc from '@grpc/grpc-js';
import { errorMessage, isThawError } from '../errors.js';
import type { Logger } from '../log.js';
import { createControlDir } from '../sdk/index.js';
import { StoreError, StoreErrorCode } from '../store/index.js';
import { checkNamespaceName, DEFAULT_NAMESPACE, namespaceOfKey, resolveStoreKey } from '../checkpoint-name.js';
import { readHostFacts } from '../sys/host-facts.js';
import type { ListedCheckpoint } from '../store/index.js';
import { checkCompatibility, isRestorable, type Manifest } from '../store/index.js';
import {
  THAW_CODE_METADATA_KEY,
  type CheckpointProgressMsg,
  type CheckpointRequestMsg,
  type CheckpointSummaryMsg,
  type CollectGarbageResponseMsg,
  type InspectCheckpointResponseMsg,
  type ListCheckpointsResponseMsg,
  type StatusResponseMsg,
  type VersionResponseMsg,
} from './api-proto.js';
import type { CheckpointJobStatus } from './checkpoint-coordinator.js';
import type { ContainerRegistry, ContainerRef } from './containers.js';
import type { ThawEngine } from './engine.js';
import { AgentError, AgentErrorCode } from './errors.js';
import type { ManagedContainer } from './managed-container.js';

/** How often a Checkpoint stream looks at its job for a state change. */
export const CHECKPOINT_PROGRESS_POLL_MS = 200;

export interface ApiContext {
  engine: ThawEngine;
  containers: ContainerRegistry;
  controlRoot: string;
  logger: Logger;
  version: string;
  startedAt: string;
  /** connected | disconnected | stopping */
  nriState(): string;
  runtime(): string;
  stopping(): boolean;
  /** Control dirs made for on-demand checkpoints of unmanaged containers (removed with their container). */
  onDemandControlDirs: Set<string>;
  /** The host pid of a running container's init, from the runtime (container-task.ts runningTaskPid). */
  taskPid(containerId: string): Promise<number>;
}

/** The gRPC status of an error: its code decides, the message is the error's. */
export function statusOf(err: unknown): grpc.StatusObject {
  const code = isThawError(err) ? err.code : 'INTERNAL';
  const map: Record<string, grpc.status> = {
    [StoreErrorCode.NOT_FOUND]: grpc.status.NOT_FOUND,
    [AgentErrorCode.CONTAINER_NOT_FOUND]: grpc.status.NOT_FOUND,
    [StoreErrorCode.IN_USE]: grpc.status.FAILED_PRECONDITION,
    [AgentErrorCode.CONTAINER_NOT_RUNNING]: grpc.status.FAILED_PRECONDITION,
    [StoreErrorCode.INVALID_NAME]: grpc.status.INVALID_ARGUMENT,
    [AgentErrorCode.BAD_REQUEST]: grpc.status.INVALID_ARGUMENT,
    [AgentErrorCode.AMBIGUOUS_TARGET]: grpc.status.INVALID_ARGUMENT,
    [StoreErrorCode.EXISTS]: grpc.status.ALREADY_EXISTS,
    [AgentErrorCode.STOPPING]: grpc.status.UNAVAILABLE,
  };
  const metadata = new grpc.Metadata();
  metadata.set(THAW_CODE_METADATA_KEY, code);
  return { code: map[code] ?? grpc.status.INTERNAL, details: errorMessage(err), metadata };
}

function progressOf(s: CheckpointJobStatus, done: boolean): CheckpointProgressMsg {
  return {
    container_id: s.containerId,
    name: s.name,
    pod: s.pod,
    container: s.container,
    state: s.state,
    done,
    id: s.id ?? '',
    bytes: s.bytes ?? 0,
    phases_json: s.phases ? JSON.stringify(s.phases) : '',
    error_json: s.error ? JSON.stringify(s.error) : '',
  };
}

function summaryOf(l: ListedCheckpoint, inUse: boolean): CheckpointSummaryMsg {
  const m: Manifest | undefined = l.manifest;
  return {
    name: l.name,
    id: m?.id ?? '',
    created_at: m?.createdAt ?? '',
    bytes: m?.totals.bytes ?? 0,
    files: m?.totals.fileCount ?? 0,
    image: m ? m.constraints.image.ref + (m.constraints.image.digest ? `@${m.constraints.image.digest}` : '') : '',
    source_pod: m?.source.pod ? `${m.source.pod.namespace}/${m.source.pod.name}` : '',
    gpu: m?.constraints.gpu !== undefined,
    in_use: inUse,
    problem: l.problem ? `${l.problem.code}: ${l.problem.message}` : '',
    snapshot: m?.snapshot?.name ?? '',
    snapshot_key: m?.snapshot?.key ?? '',
    restore_failure_json: l.restoreFailure ? JSON.stringify(l.restoreFailure) : '',
    namespace: l.namespace ?? '',
  };
}

/** The store key of a name the caller gives: namespace/name, a bare name (namespace "default"), or oci-<hex>. */
function keyOf(name: string): string {
  const resolved = resolveStoreKey(name, DEFAULT_NAMESPACE, { allowPulled: true });
  if ('reason' in resolved) throw new StoreError(StoreErrorCode.INVALID_NAME, resolved.reason, { step: 'checkpoint name', evidence: { name } });
  return resolved.key;
}

const badRequest = (message: string): AgentError => new AgentError(AgentErrorCode.BAD_REQUEST, message, { step: 'read the request' });

function refOf(req: CheckpointRequestMsg): ContainerRef {
  if (req.container_id) return { containerId: req.container_id };
  if (req.pod && req.pod.namespace && req.pod.name) {
    return { pod: { namespace: req.pod.namespace, name: req.pod.name, ...(req.pod.uid ? { uid: req.pod.uid } : {}) }, ...(req.container_name ? { containerName: req.container_name } : {}) };
  }
  throw badRequest('name a container id, or a pod (namespace and name)');
}

/** Unary handler: result or error status; refused while the agent stops. */
function unary<Req, Res>(ctx: ApiContext, method: string, fn: (req: Req) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    if (ctx.stopping()) {
      callback(statusOf(new AgentError(AgentErrorCode.STOPPING, 'the agent is stopping', { step: method })));
      return;
    }
    fn(call.request).then(
      (res) => callback(null, res),
      (err: unknown) => {
        ctx.logger.info('api call refused', { method, error: isThawError(err) ? err.toJSON() : errorMessage(err) });
        callback(statusOf(err));
      },
    );
  };
}

export function createApiHandlers(ctx: ApiContext): grpc.UntypedServiceImplementation {
  const { engine } = ctx;
  const store = engine.store;

  /** Starts (or joins) the checkpoint of the container the request names; returns its container id. */
  async function startCheckpoint(req: CheckpointRequestMsg): Promise<string> {
    const seen = ctx.containers.find(refOf(req));
    const managed = engine.handlers.managed.get(seen.id);
    // The store key: a bare name is the pod's own namespace's; a qualified one must name that namespace.
    let requested = '';
    if (req.name) {
      const resolved = resolveStoreKey(req.name, seen.podNamespace);
      if ('reason' in resolved) throw new StoreError(StoreErrorCode.INVALID_NAME, resolved.reason, { step: 'checkpoint name', evidence: { name: req.name } });
      if (namespaceOfKey(resolved.key) !== seen.podNamespace) {
        throw new StoreError(StoreErrorCode.INVALID_NAME, `checkpoint ${resolved.key} is not of namespace ${seen.podNamespace}: a checkpoint belongs to the namespace of the pod it is taken from`, {
          step: 'checkpoint name',
          evidence: { name: req.name, namespace: seen.podNamespace },
        });
      }
      requested = resolved.key;
    }
    if (engine.checkpoints.jobDone(seen.id) !== undefined) {
      const running = engine.checkpoints.status(seen.id);
      if (requested && running && requested !== running.name) {
        throw badRequest(`container ${seen.id} is already being checkpointed as ${running.name}, not ${requested}`);
      }
      return seen.id; // follow the job that runs (a source waiting for its worker, or an earlier request)
    }
    const name = requested || (managed?.role === 'checkpoint-source' ? managed.checkpointName : '');
    // A checkpoint source whose worker already had its checkpoint taken: report that one (unless --replace).
    const last = engine.checkpoints.status(seen.id);
    if (!req.replace && managed?.role === 'checkpoint-source' && last?.state === 'succeeded' && last.name === name) return seen.id;
    if (!name) throw badRequest('a checkpoint name is required (the container is not a checkpoint source whose annotation names one)');
    // AGENT_CONTAINER_NOT_RUNNING when it has no running process to checkpoint.
    const pid = await ctx.taskPid(seen.id);
    let container: ManagedContainer;
    if (managed !== undefined) {
      container = { ...managed, checkpointName: name };
    } else {
      const controlDir = await createControlDir(ctx.controlRoot, seen.id);
      ctx.onDemandControlDirs.add(seen.id);
      container = {
        containerId: seen.id,
        containerName: seen.name,
        podId: seen.podId,
        podName: seen.podName,
        podNamespace: seen.podNamespace,
        podUid: seen.podUid,
        checkpointName: name,
        controlDir,
        ...(seen.imageRef !== undefined ? { imageRef: seen.imageRef } : {}),
        ...(seen.args !== undefined ? { specArgs: seen.args } : {}),
        onCheckpoint: 'continue',
      };
    }
    engine.checkpoints.checkpointNow(container, pid, { replace: req.replace });
    ctx.logger.info('checkpoint requested through the API', { containerId: seen.id, pod: `${seen.podNamespace}/${seen.podName}`, namespace: seen.podNamespace, checkpoint: name });
    return seen.id;
  }

  const Checkpoint: grpc.handleServerStreamingCall<CheckpointRequestMsg, CheckpointProgressMsg> = (call) => {
    const fail = (err: unknown): void => {
      ctx.logger.info('api call refused', { method: 'Checkpoint', error: isThawError(err) ? err.toJSON() : errorMessage(err) });
      // grpc-js ends a server stream with a status through its 'error' event.
      call.emit('error', statusOf(err));
    };
    if (ctx.stopping()) return fail(new AgentError(AgentErrorCode.STOPPING, 'the agent is stopping', { step: 'Checkpoint' }));
    void (async () => {
      const id = await startCheckpoint(call.request);
      let last = '';
      const send = (done: boolean): void => {
        const s = engine.checkpoints.status(id);
        if (!s) return;
        const key = `${s.state}:${done}`;
        if (key === last) return;
        last = key;
        call.write(progressOf(s, done));
      };
      const finished = engine.checkpoints.jobDone(id) ?? Promise.resolve(); // none: it ended already
      let ended = false;
      void finished.then(() => (ended = true));
      while (!ended && !call.cancelled) {
        send(false);
        await Promise.race([finished, new Promise((r) => setTimeout(r, CHECKPOINT_PROGRESS_POLL_MS))]);
      }
      if (!call.cancelled) {
        send(true);
        call.end();
      }
    })().catch(fail);
  };

  return {
    Checkpoint,
    ListCheckpoints: unary(ctx, 'ListCheckpoints', async (req: { namespace?: string }): Promise<ListCheckpointsResponseMsg> => {
      if (req.namespace && checkNamespaceName(req.namespace) !== undefined) throw badRequest(checkNamespaceName(req.namespace)!);
      const listed = await store.list(req.namespace ? { namespace: req.namespace } : {});
      const checkpoints = await Promise.all(listed.map(async (l) => summaryOf(l, await store.isLeased(l.name).catch(() => false))));
      return { checkpoints, snapshot_pods: engine.snapshots.rows() };
    }),
    InspectCheckpoint: unary(ctx, 'InspectCheckpoint', async (req: { name: string }): Promise<InspectCheckpointResponseMsg> => {
      const key = keyOf(req.name);
      const opened = await store.open(key);
      const diskBytes = await store.sizeOf(key);
      const m = opened.manifest;
      const failure = await store.restoreFailure(opened.name, m).catch(() => undefined);
      const runtime = ctx.runtime();
      const mismatches = checkCompatibility(m, {
        ...readHostFacts(),
        criuVersion: engine.criuVersion,
        ...(runtime ? { containerdVersion: runtime.replace(/^\S+\s+/, '') } : {}),
        // The image a restore is compared with is the new pod's; here: the checkpoint's own (see the .proto).
        image: m.constraints.image,
        ...(engine.cuda?.facts ? { gpu: engine.cuda.facts } : {}),
        placesCompressedPages: engine.placesCompressedPages,
      });
      return {
        summary: summaryOf({ name: opened.name, ...(opened.namespace !== undefined ? { namespace: opened.namespace } : {}), manifest: m, ...(failure !== undefined ? { restoreFailure: failure } : {}) }, await store.isLeased(opened.name)),
        manifest_json: JSON.stringify(m),
        disk_bytes: diskBytes,
        restorable: isRestorable(mismatches),
        mismatches: mismatches.map((x) => ({ what: x.what, expected: x.expected, actual: x.actual, severity: x.severity })),
        directory: opened.paths.dir,
      };
    }),
    ClearRestoreFailure: unary(ctx, 'ClearRestoreFailure', async (req: { name: string }) => {
      const key = keyOf(req.name);
      await store.open(key); // NOT_FOUND (and the key rule) before anything else
      const cleared = await store.clearRestoreFailure(key);
      ctx.logger.info('restore-failure mark cleared through the API', { checkpoint: key, namespace: namespaceOfKey(key) ?? '', cleared });
      return { cleared };
    }),
    DeleteCheckpoint: unary(ctx, 'DeleteCheckpoint', async (req: { name: string }) => {
      const key = keyOf(req.name);
      await store.delete(key);
      ctx.logger.info('checkpoint deleted through the API', { checkpoint: key, namespace: namespaceOfKey(key) ?? '' });
      return {};
    }),
    CollectGarbage: unary(ctx, 'CollectGarbage', async (req: { dry_run?: boolean }): Promise<CollectGarbageResponseMsg> => {
      const dryRun = req.dry_run === true;
      const r = await engine.collectGarbage({ dryRun });
      ctx.logger.info('store collection through the API', { dryRun, checkpoints: r.collected.length, bytes: r.bytes, cacheFiles: r.cacheFiles, ...(r.unmet !== undefined ? { unmet: r.unmet } : {}) });
      return {
        collected: r.collected.map((c) => ({ name: c.name, namespace: c.namespace ?? '', bytes: c.bytes, last_used: new Date(c.lastUsedMs).toISOString() })),
        bytes: r.bytes,
        cache_files: r.cacheFiles,
        cache_bytes: r.cacheBytes,
        unmet: r.unmet ?? '',
        dry_run: dryRun,
      };
    }),
    Status: unary(ctx, 'Status', async (): Promise<StatusResponseMsg> => ({
      version: ctx.version,
      pid: process.pid,
      started_at: ctx.startedAt,
      nri: ctx.nriState(),
      runtime: ctx.runtime(),
      checkpoints: engine.checkpoints
        .status()
        .filter((s) => s.state === 'waiting-for-worker' || s.state === 'checkpointing')
        .map((s) => progressOf(s, false)),
      restores: engine.restores.inFlight().map((r) => ({ container_id: r.containerId, pod: r.pod, checkpoint: r.checkpoint, phase: r.phase, since: r.since })),
      managed_containers: engine.handlers.managed.size,
    })),
    Version: unary(ctx, 'Version', async (): Promise<VersionResponseMsg> => ({
      version: ctx.version,
      node_version: process.version,
      criu_version: engine.criuVersion,
      runtime: ctx.runtime(),
      gpu: engine.cuda?.facts !== undefined,
    })),
  };
}
