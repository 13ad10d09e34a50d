import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { StackError, STACK_ERROR_CODES } from './errors.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';

/** Default deadline of one CRI call. */
export const DEFAULT_CRI_CALL_TIMEOUT_MS = 30_000;

export type NamespaceMode = 'POD' | 'CONTAINER' | 'NODE' | 'TARGET';

export interface CallOptions {
  /** Deadline of this call; default the client's defaultTimeoutMs (30 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface KeyValue { key: string; value: string }

export interface Mount {
  container_path: string;
  host_path: string;
  readonly?: boolean;
  /** PROPAGATION_PRIVATE (default), PROPAGATION_HOST_TO_CONTAINER, PROPAGATION_BIDIRECTIONAL. */
  propagation?: 'PROPAGATION_PRIVATE' | 'PROPAGATION_HOST_TO_CONTAINER' | 'PROPAGATION_BIDIRECTIONAL';
}

/** runtime.v1.Device: a host device node made available in the container (e.g. /dev/nvidia0). */
export interface Device {
  container_path: string;
  host_path: string;
  /** cgroup device permissions: any of r, w, m (default "rwm"). */
  permissions?: string;
}

export interface NamespaceOptions { network?: NamespaceMode; pid?: NamespaceMode; ipc?: NamespaceMode; target_id?: string }

/** The parts of runtime.v1.PodSandboxConfig thaw uses (field names as in the proto). */
export interface PodSandboxConfig {
  metadata: { name: string; uid: string; namespace: string; attempt?: number };
  hostname?: string;
  log_directory?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  linux?: {
    cgroup_parent?: string;
    security_context?: { namespace_options?: NamespaceOptions; privileged?: boolean };
  };
  [field: string]: unknown;
}

/** The parts of runtime.v1.ContainerConfig thaw uses. */
export interface ContainerConfig {
  metadata: { name: string; attempt?: number };
  image: { image: string };
  command?: string[];
  args?: string[];
  working_dir?: string;
  envs?: KeyValue[];
  mounts?: Mount[];
  devices?: Device[];
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  log_path?: string;
  linux?: {
    security_context?: { namespace_options?: NamespaceOptions; privileged?: boolean };
    [field: string]: unknown;
  };
  [field: string]: unknown;
}

export interface PodSandboxSummary {
  id: string;
  metadata: { name: string; uid: string; namespace: string; attempt: number };
  state: 'SANDBOX_READY' | 'SANDBOX_NOTREADY';
  created_at: string;
  labels: Record<string, string>;
  annotations: Record<string, string>;
  runtime_handler: string;
}

export interface ContainerSummary {
  id: string;
  pod_sandbox_id: string;
  metadata: { name: string; attempt: number };
  image: { image: string };
  image_ref: string;
  state: ContainerState;
  created_at: string;
  labels: Record<string, string>;
  annotations: Record<string, string>;
}

export type ContainerState = 'CONTAINER_CREATED' | 'CONTAINER_RUNNING' | 'CONTAINER_EXITED' | 'CONTAINER_UNKNOWN';

export interface ContainerStatusResult {
  status: {
    id: string;
    metadata: { name: string; attempt: number };
    state: ContainerState;
    created_at: string;
    started_at: string;
    finished_at: string;
    exit_code: number;
    reason: string;
    message: string;
    log_path: string;
    image: { image: string };
    image_ref: string;
    labels: Record<string, string>;
    annotations: Record<string, string>;
    mounts: Mount[];
  };
  /** The raw verbose info map (containerd puts a JSON document under "info"). */
  info: Record<string, string>;
  /** From info.info when verbose: the container's init pid on the host (0 when not running). */
  pid?: number;
  /** From info.info when verbose: the OCI runtime spec containerd generated. */
  runtimeSpec?: Record<string, unknown>;
  /** The parsed info.info document. */
  verboseInfo?: Record<string, unknown>;
}

export interface ExecSyncResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

export interface RunPodOptions extends CallOptions {
  name: string;
  /**
   * The container's name (default: the pod's `name`). The pods of one Kubernetes workload share their container
   * names (`worker`) while the pod names differ; a restore compares it with the checkpoint's (manifest.ts).
   */
  containerName?: string;
  uid?: string;
  namespace?: string;
  annotations?: Record<string, string>;
  labels?: Record<string, string>;
  /** Container annotations (default: none; pod annotations go to the sandbox). */
  containerAnnotations?: Record<string, string>;
  image: string;
  command: string[];
  args?: string[];
  env?: Record<string, string>;
  mounts?: Mount[];
  /** Host device nodes for the container (GPU pods: /dev/nvidiactl, /dev/nvidia0, /dev/nvidia-uvm, ...). */
  devices?: Device[];
  workingDir?: string;
  /** true (default): the host's network namespace, no CNI. false: the pod's own (needs CNI). */
  hostNetwork?: boolean;
  /**
   * PID namespace of the container. CONTAINER (default, as the kubelet sets unless
   * shareProcessNamespace): the container's process is init of its own namespace, which a CRIU dump needs.
   */
  pidMode?: NamespaceMode;
  /** Where the container's log goes: `<logDirectory>/<name>_0.log` (default: the client's logRoot/<pod>). */
  logDirectory?: string;
  privileged?: boolean;
  /**
   * More of the container's CRI security context (run_as_user, capabilities, no_new_privs, ...), merged over the
   * namespace options and `privileged`.
   */
  securityContext?: Record<string, unknown>;
  cgroupParent?: string;
  runtimeHandler?: string;
  /** false: create the container but leave StartContainer to the caller (default true). */
  start?: boolean;
}

export interface RunPodResult {
  podId: string;
  containerId: string;
  /** The container log file (CRI log format). */
  logPath: string;
  sandboxConfig: PodSandboxConfig;
  timings: { runPodSandboxMs: number; createMs: number; startMs: number };
}

export interface CriClientOptions {
  /** containerd's gRPC socket path (CRI is served there). */
  address: string;
  /** The stripped CRI api.proto (stackPaths(...).criProtoStripped). */
  protoPath: string;
  defaultTimeoutMs?: number;
  /** Default parent dir of pod log directories for runPod. */
  logRoot?: string;
}

type Unary = (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: unknown) => void) => grpc.ClientUnaryCall;

/**
 * A CRI `runtime.v1` client (RuntimeService and ImageService) over containerd's gRPC unix socket.
 * Every call has a deadline and honours an AbortSignal (the call is cancelled); failures are
 * STACK_CRI_CALL_FAILED with the method, gRPC code and details. Uses proto field names (snake_case)
 * and enum names as strings; int64 fields arrive as strings.
 */
export class CriClient {
  readonly address: string;
  private readonly runtime: grpc.Client;
  private readonly image: grpc.Client;
  private readonly defaultTimeoutMs: number;
  private readonly logRoot: string | undefined;

  private constructor(options: CriClientOptions, runtime: grpc.Client, image: grpc.Client) {
    this.address = options.address;
    this.runtime = runtime;
    this.image = image;
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? DEFAULT_CRI_CALL_TIMEOUT_MS;
    this.logRoot = options.logRoot;
  }

  /** Loads the proto and creates the channel (it connects lazily, on the first call). */
  static async create(options: CriClientOptions): Promise<CriClient> {
    let def: protoLoader.PackageDefinition;
    try {
      def = await protoLoader.load(options.protoPath, { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
    } catch (cause) {
      throw new StackError(STACK_ERROR_CODES.NOT_PROVISIONED, `cannot load the CRI proto ${options.protoPath}`, {
        step: 'load CRI proto', cause, evidence: { protoPath: options.protoPath },
      });
    }
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      runtime: { v1: { RuntimeService: grpc.ServiceClientConstructor; ImageService: grpc.ServiceClientConstructor } };
    };
    const target = `unix://${options.address}`;
    const creds = grpc.credentials.createInsecure();
    // 16 MiB: ExecSync output is capped there by the runtime.
    const channelOptions = { 'grpc.max_receive_message_length': 16 * 1024 * 1024 + 4096 };
    const runtime = new pkg.runtime.v1.RuntimeService(target, creds, channelOptions);
    const image = new pkg.runtime.v1.ImageService(target, creds, channelOptions);
    return new CriClient(options, runtime, image);
  }

  close(): void {
    this.runtime.close();
    this.image.close();
  }

  /** One unary call with a deadline and cancellation on abort. */
  call<T>(service: 'runtime' | 'image', method: string, request: unknown, opts: CallOptions = {}): Promise<T> {
    const client = service === 'runtime' ? this.runtime : this.image;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    const fn = (client as unknown as Record<string, Unary>)[method];
    if (typeof fn !== 'function') {
      return Promise.reject(new StackError(STACK_ERROR_CODES.CRI_CALL_FAILED, `no CRI method ${method}`, { step: `CRI ${method}` }));
    }
    return new Promise<T>((resolve, reject) => {
      if (opts.signal?.aborted) {
        reject(new StackError(STACK_ERROR_CODES.ABORTED, 'aborted', { step: `CRI ${method}`, cause: opts.signal.reason }));
        return;
      }
      const deadline = new Date(Date.now() + Math.min(timeoutMs, MAX_TIMER_DELAY_MS));
      const onAbort = (): void => call.cancel();
      const call = fn.call(client, request, new grpc.Metadata(), { deadline }, (err, res) => {
        opts.signal?.removeEventListener('abort', onAbort);
        if (err) {
          const aborted = opts.signal?.aborted === true;
          reject(new StackError(aborted ? STACK_ERROR_CODES.ABORTED : STACK_ERROR_CODES.CRI_CALL_FAILED,
            `${method} failed: ${grpc.status[err.code] ?? err.code}: ${err.details}`, {
              step: `CRI ${method}`, cause: err,
              evidence: { method, grpcCode: err.code, grpcStatus: grpc.status[err.code], details: err.details, timeoutMs, address: this.address },
            }));
          return;
        }
        resolve(res as T);
      });
      opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  version(opts?: CallOptions): Promise<{ version: string; runtime_name: string; runtime_version: string; runtime_api_version: string }> {
    return this.call('runtime', 'Version', { version: 'v1' }, opts);
  }

  async runPodSandbox(config: PodSandboxConfig, runtimeHandler = '', opts?: CallOptions): Promise<string> {
    const r = await this.call<{ pod_sandbox_id: string }>('runtime', 'RunPodSandbox', { config, runtime_handler: runtimeHandler }, opts);
    return r.pod_sandbox_id;
  }

  async stopPodSandbox(podId: string, opts?: CallOptions): Promise<void> {
    await this.call('runtime', 'StopPodSandbox', { pod_sandbox_id: podId }, opts);
  }

  async removePodSandbox(podId: string, opts?: CallOptions): Promise<void> {
    await this.call('runtime', 'RemovePodSandbox', { pod_sandbox_id: podId }, opts);
  }

  async podSandboxStatus(podId: string, verbose = false, opts?: CallOptions): Promise<{ status: Record<string, unknown>; info: Record<string, string> }> {
    return this.call('runtime', 'PodSandboxStatus', { pod_sandbox_id: podId, verbose }, opts);
  }

  async listPodSandbox(filter: Record<string, unknown> = {}, opts?: CallOptions): Promise<PodSandboxSummary[]> {
    const r = await this.call<{ items: PodSandboxSummary[] }>('runtime', 'ListPodSandbox', { filter }, opts);
    return r.items ?? [];
  }

  async createContainer(podId: string, config: ContainerConfig, sandboxConfig: PodSandboxConfig, opts?: CallOptions): Promise<string> {
    const r = await this.call<{ container_id: string }>('runtime', 'CreateContainer',
      { pod_sandbox_id: podId, config, sandbox_config: sandboxConfig }, opts);
    return r.container_id;
  }

  async startContainer(containerId: string, opts?: CallOptions): Promise<void> {
    await this.call('runtime', 'StartContainer', { container_id: containerId }, opts);
  }

  /** Stops with SIGTERM, then SIGKILL after `timeoutSeconds` (CRI's unit). The call's deadline is extended by it. */
  async stopContainer(containerId: string, timeoutSeconds = 10, opts?: CallOptions): Promise<void> {
    const timeoutMs = (opts?.timeoutMs ?? this.defaultTimeoutMs) + timeoutSeconds * 1000;
    await this.call('runtime', 'StopContainer', { container_id: containerId, timeout: timeoutSeconds }, { ...opts, timeoutMs });
  }

  async removeContainer(containerId: string, opts?: CallOptions): Promise<void> {
    await this.call('runtime', 'RemoveContainer', { container_id: containerId }, opts);
  }

  /** With `verbose`, containerd's info JSON is parsed: `pid` (host pid of the container's init) and `runtimeSpec`. */
  async containerStatus(containerId: string, verbose = false, opts?: CallOptions): Promise<ContainerStatusResult> {
    const r = await this.call<{ status: ContainerStatusResult['status']; info: Record<string, string> }>('runtime', 'ContainerStatus',
      { container_id: containerId, verbose }, opts);
    const result: ContainerStatusResult = { status: r.status, info: r.info ?? {} };
    const raw = result.info.info;
    if (raw) {
      const parsed = JSON.parse(raw) as Record<string, unknown>;
      result.verboseInfo = parsed;
      if (typeof parsed.pid === 'number') result.pid = parsed.pid;
      if (parsed.runtimeSpec && typeof parsed.runtimeSpec === 'object') result.runtimeSpec = parsed.runtimeSpec as Record<string, unknown>;
    }
    return result;
  }

  async listContainers(filter: Record<string, unknown> = {}, opts?: CallOptions): Promise<ContainerSummary[]> {
    const r = await this.call<{ containers: ContainerSummary[] }>('runtime', 'ListContainers', { filter }, opts);
    return r.containers ?? [];
  }

  /**
   * Runs `cmd` in the container and waits for it. `timeoutSeconds` is CRI's own limit on the command
   * (0: none); the call's deadline is that plus the call timeout.
   */
  async execSync(containerId: string, cmd: string[], timeoutSeconds = 10, opts?: CallOptions): Promise<ExecSyncResult> {
    const timeoutMs = (opts?.timeoutMs ?? this.defaultTimeoutMs) + timeoutSeconds * 1000;
    const r = await this.call<{ stdout: Buffer; stderr: Buffer; exit_code: number }>('runtime', 'ExecSync',
      { container_id: containerId, cmd, timeout: timeoutSeconds }, { ...opts, timeoutMs });
    return { stdout: Buffer.from(r.stdout ?? []).toString('utf8'), stderr: Buffer.from(r.stderr ?? []).toString('utf8'), exitCode: r.exit_code };
  }

  async listImages(opts?: CallOptions): Promise<Array<{ id: string; repo_tags: string[]; repo_digests: string[]; size: string }>> {
    const r = await this.call<{ images: Array<{ id: string; repo_tags: string[]; repo_digests: string[]; size: string }> }>('image', 'ListImages', { filter: {} }, opts);
    return r.images ?? [];
  }

  /**
   * Creates a sandbox and one container in it and starts the container: what the kubelet does for a
   * one-container pod. On a failure after the sandbox exists, the sandbox is removed again and the
   * error is rethrown. The container log is `<logDirectory>/<name>_0.log`.
   */
  async runPod(o: RunPodOptions): Promise<RunPodResult> {
    const callOpts: CallOptions = { ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}), ...(o.signal ? { signal: o.signal } : {}) };
    const uid = o.uid ?? `${o.name}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    const namespace = o.namespace ?? 'default';
    const logDirectory = o.logDirectory ?? (this.logRoot ? path.join(this.logRoot, `${namespace}_${o.name}_${uid}`) : undefined);
    if (logDirectory) await mkdir(logDirectory, { recursive: true, mode: 0o755 });
    const hostNetwork = o.hostNetwork ?? true;
    const pidMode = o.pidMode ?? 'CONTAINER';
    const sandboxConfig: PodSandboxConfig = {
      metadata: { name: o.name, uid, namespace, attempt: 0 },
      hostname: hostNetwork ? '' : o.name,
      ...(logDirectory ? { log_directory: logDirectory } : {}),
      labels: o.labels ?? {},
      annotations: o.annotations ?? {},
      linux: {
        ...(o.cgroupParent ? { cgroup_parent: o.cgroupParent } : {}),
        security_context: {
          namespace_options: { network: hostNetwork ? 'NODE' : 'POD', pid: pidMode, ipc: 'POD' },
          ...(o.privileged ? { privileged: true } : {}),
        },
      },
    };
    const t0 = Date.now();
    const podId = await this.runPodSandbox(sandboxConfig, o.runtimeHandler ?? '', callOpts);
    const t1 = Date.now();
    try {
      const containerName = o.containerName ?? o.name;
      const logPath = `${containerName}_0.log`;
      const containerConfig: ContainerConfig = {
        metadata: { name: containerName, attempt: 0 },
        image: { image: o.image },
        command: o.command,
        args: o.args ?? [],
        ...(o.workingDir ? { working_dir: o.workingDir } : {}),
        envs: Object.entries(o.env ?? {}).map(([key, value]) => ({ key, value })),
        mounts: o.mounts ?? [],
        devices: (o.devices ?? []).map((d) => ({ permissions: 'rwm', ...d })),
        labels: o.labels ?? {},
        annotations: o.containerAnnotations ?? {},
        log_path: logPath,
        linux: {
          security_context: {
            namespace_options: { network: hostNetwork ? 'NODE' : 'POD', pid: pidMode, ipc: 'POD' },
            ...(o.privileged ? { privileged: true } : {}),
            ...(o.securityContext ?? {}),
          },
        },
      };
      const containerId = await this.createContainer(podId, containerConfig, sandboxConfig, callOpts);
      const t2 = Date.now();
      if (o.start !== false) await this.startContainer(containerId, callOpts);
      const t3 = Date.now();
      return {
        podId,
        containerId,
        logPath: logDirectory ? path.join(logDirectory, logPath) : '',
        sandboxConfig,
        timings: { runPodSandboxMs: t1 - t0, createMs: t2 - t1, startMs: t3 - t2 },
      };
    } catch (err) {
      await this.removePod(podId).catch(() => undefined);
      throw err;
    }
  }

  /** Stops and removes a sandbox with all its containers (RemovePodSandbox removes the containers). */
  async removePod(podId: string, opts?: CallOptions): Promise<void> {
    await this.stopPodSandbox(podId, opts);
    await this.removePodSandbox(podId, opts);
  }
}

/** Parses CRI container log lines (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`) into stream + text. Pure. */
export function parseCriLog(text: string): Array<{ time: string; stream: 'stdout' | 'stderr'; partial: boolean; text: string }> {
  const out: Array<{ time: string; stream: 'stdout' | 'stderr'; partial: boolean; text: string }> = [];
  for (const line of text.split('\n')) {
    const m = /^(\S+) (stdout|stderr) ([FP]) ?(.*)$/.exec(line);
    if (m?.[1] && m[2] && m[3]) out.push({ time: m[1], stream: m[2] as 'stdout' | 'stderr', partial: m[3] === 'P', text: m[4] ?? '' });
  }
  return out;
}
