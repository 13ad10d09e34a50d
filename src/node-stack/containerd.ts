import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { silentLogger, type Logger } from '../log.js';
import { destroyStackDir, processStartTicks, STACK_DIR_PREFIX, STACK_MARKER_FILE, type StackMarker } from './cleanup.js';
import { podSubnetFor, renderCniConflist, renderContainerdConfig } from './config.js';
import { CriClient } from './cri-client.js';
import { writeStrippedCriProto } from './cri-proto.js';
import { StackError, StackErrorCode } from './errors.js';
import { sleep, tail } from './exec.js';
import { buildBusyboxRootfs, importImageInto, type ImportImageOptions } from './images.js';
import { parseFlavor, stackPaths, DEFAULT_STACK_ROOT, type StackFlavor, type StackPaths } from './paths.js';
import { isProvisioned } from './provision.js';

/** Linux's sun_path is 108 bytes including the terminating NUL. */
export const UNIX_SOCKET_PATH_MAX_BYTES = 107;
export const DEFAULT_START_TIMEOUT_MS = 30_000;
export const DEFAULT_STOP_TIMEOUT_MS = 30_000;
export const DEFAULT_NRI_REQUEST_TIMEOUT_MS = 2_000;
export const DEFAULT_NRI_REGISTRATION_TIMEOUT_MS = 5_000;
/** How long containerd gets to exit on SIGTERM before SIGKILL. */
export const CONTAINERD_TERM_GRACE_MS = 5_000;

export const PAUSE_IMAGE_REF = 'docker.io/thaw/pause:1';
export const BUSYBOX_IMAGE_REF = 'docker.io/thaw/busybox:1';

/**
 * The pause (sandbox) process: stays up, reaps, and exits 0 on SIGTERM. As PID 1 of the sandbox's PID
 * namespace it would ignore SIGTERM without a handler; sh's trap installs one, and `wait` returns when
 * the trapped signal arrives.
 */
export const PAUSE_COMMAND = ['/bin/sh', '-c', "trap 'exit 0' TERM INT; sleep 2147483647 & wait"];

/** Throws STACK_INVALID_OPTION when a unix socket path is too long for sun_path. */
export function assertSocketPath(p: string): void {
  const bytes = Buffer.byteLength(p);
  if (bytes > UNIX_SOCKET_PATH_MAX_BYTES) {
    throw new StackError(StackErrorCode.INVALID_OPTION, `unix socket path is ${bytes} bytes (max ${UNIX_SOCKET_PATH_MAX_BYTES}): ${p}`, {
      step: 'check socket path', evidence: { path: p, bytes },
    });
  }
}

export interface LaunchedNriPlugin {
  /** `NN-name`: the index orders plugins (containerd requires the two-digit prefix). */
  name: string;
  /** The executable; linked into the stack's NRI plugin dir as `name`. */
  path: string;
  /** Written to the plugin config dir as `<name>.conf`. */
  config?: string;
}

export interface NodeStackOptions {
  /** Default: env THAW_CONTAINERD (first entry when a list), else 1.7. */
  flavor?: StackFlavor;
  logger?: Logger;
  /** Where provisioned stacks live (default /opt/thaw/stack). */
  stackRoot?: string;
  /** Parent of the stack dir (default os.tmpdir(), i.e. /tmp). */
  tmpDir?: string;
  nri?: {
    requestTimeoutMs?: number;
    registrationTimeoutMs?: number;
    launchedPlugins?: LaunchedNriPlugin[];
  };
  /** How long to wait for containerd's CRI to answer; default 30 s. */
  startTimeoutMs?: number;
  /** Default deadline of each CRI call of `stack.cri`. */
  criCallTimeoutMs?: number;
  /** containerd's log level; default info. */
  logLevel?: 'debug' | 'info' | 'warn';
  signal?: AbortSignal;
}

/** Where a stack's containerd keeps its sockets, plugins, logs and config (all under the stack dir). */
export interface StackLayout {
  /** containerd's gRPC socket (CRI is served there). */
  address: string;
  /** containerd's root directory (its `root` setting; the overlayfs snapshots lie under it). */
  rootDir: string;
  ttrpcAddress: string;
  nriSocketPath: string;
  /** NRI plugin dir: executables here are launched by containerd at start (`NN-name`). */
  pluginDir: string;
  pluginConfigDir: string;
  /** containerd's stdout+stderr. */
  logPath: string;
  /** Default parent of pod log directories (runPod puts each pod's log dir here). */
  podLogDir: string;
  configPath: string;
}

export interface NodeStack extends StackLayout {
  flavor: StackFlavor;
  /** e.g. "1.7.24~ds1" (CRI runtime_version). */
  containerdVersion: string;
  /** The stack dir (/tmp/thaw-XXXXXX). */
  dir: string;
  paths: StackPaths;
  cri: CriClient;
  images: { busybox: string; pause: string };
  /** pid of the running containerd (0 while it is stopped). */
  readonly containerdPid: number;
  /** SIGTERM containerd, wait for it to exit, start it again and wait for CRI (shims and pods stay). */
  restartContainerd(signal?: AbortSignal): Promise<void>;
  /** SIGKILL containerd and wait for it to be gone (shims and pods stay). */
  killContainerd(): Promise<void>;
  /** Start containerd (after killContainerd) and wait for CRI. */
  startContainerd(signal?: AbortSignal): Promise<void>;
  /** The last `maxChars` of containerd's log. */
  logTail(maxChars?: number): Promise<string>;
  /** Build an image from a rootfs dir and import it into this stack (namespace k8s.io). */
  importImage(o: ImportImageOptions): Promise<{ ref: string; manifestDigest: string }>;
  /**
   * Remove every pod through CRI, kill containerd, the shims and their containers, unmount what is
   * under dir and remove dir. Idempotent. Throws STACK_CLEANUP_FAILED when something is left.
   */
  stop(): Promise<void>;
}

/**
 * Starts a private containerd of a provisioned flavor: own root, state, sockets and NRI dirs under a
 * fresh `/tmp/thaw-XXXXXX`, NRI enabled, the busybox and pause images imported. Resolves when CRI
 * answers. On any failure everything started is torn down before the error is thrown
 * (STACK_NOT_PROVISIONED, STACK_START_TIMEOUT or STACK_CONTAINERD_EXITED with containerd's log tail).
 */
export async function startNodeStack(options: NodeStackOptions = {}): Promise<NodeStack> {
  const flavor = options.flavor ?? parseFlavor(process.env.THAW_CONTAINERD?.split(',')[0]?.trim());
  const log = (options.logger ?? silentLogger).child({ component: 'node-stack', flavor });
  const paths = stackPaths(flavor, options.stackRoot ?? DEFAULT_STACK_ROOT);
  if (!(await isProvisioned(flavor, paths.root))) {
    throw new StackError(StackErrorCode.NOT_PROVISIONED, `stack ${flavor} is not provisioned at ${paths.prefix}: run npm run setup (THAW_CONTAINERD=${flavor})`, {
      step: 'start node stack', evidence: { prefix: paths.prefix },
    });
  }
  const dir = await mkdtemp(path.join(options.tmpDir ?? os.tmpdir(), STACK_DIR_PREFIX));
  const ownerStartTicks = (await processStartTicks(process.pid)) ?? 0;
  const marker: StackMarker = { ownerPid: process.pid, ownerStartTicks, flavor, createdAt: new Date().toISOString() };
  await writeFile(path.join(dir, STACK_MARKER_FILE), JSON.stringify(marker));
  await chmod(dir, 0o755);

  const layout = {
    address: path.join(dir, 'c.sock'),
    rootDir: path.join(dir, 'root'),
    ttrpcAddress: path.join(dir, 'c.sock.ttrpc'),
    nriSocketPath: path.join(dir, 'nri.sock'),
    pluginDir: path.join(dir, 'nri', 'plugins'),
    pluginConfigDir: path.join(dir, 'nri', 'conf.d'),
    logPath: path.join(dir, 'containerd.log'),
    podLogDir: path.join(dir, 'pods'),
    configPath: path.join(dir, 'config.toml'),
  };
  let stack: NodeStackImpl | undefined;
  try {
    for (const p of [layout.address, layout.ttrpcAddress, layout.nriSocketPath]) assertSocketPath(p);
    for (const d of [layout.pluginDir, layout.pluginConfigDir, layout.podLogDir, path.join(dir, 'cni', 'conf.d')]) {
      await mkdir(d, { recursive: true, mode: 0o755 });
    }
    for (const plugin of options.nri?.launchedPlugins ?? []) {
      if (!/^\d\d-[A-Za-z0-9_.-]+$/.test(plugin.name)) {
        throw new StackError(StackErrorCode.INVALID_OPTION, `NRI plugin name "${plugin.name}" must be NN-name`, {
          step: 'install launched NRI plugins', evidence: { name: plugin.name },
        });
      }
      await symlink(path.resolve(plugin.path), path.join(layout.pluginDir, plugin.name));
      if (plugin.config !== undefined) {
        await writeFile(path.join(layout.pluginConfigDir, `${plugin.name}.conf`), plugin.config);
      }
    }
    const config = renderContainerdConfig({
      flavor,
      root: layout.rootDir,
      state: path.join(dir, 'state'),
      grpcAddress: layout.address,
      ttrpcAddress: layout.ttrpcAddress,
      optDir: path.join(dir, 'opt'),
      runcRoot: path.join(dir, 'runc'),
      runcBinary: paths.runc,
      nriSocketPath: layout.nriSocketPath,
      nriPluginDir: layout.pluginDir,
      nriPluginConfigDir: layout.pluginConfigDir,
      nriRequestTimeoutMs: options.nri?.requestTimeoutMs ?? DEFAULT_NRI_REQUEST_TIMEOUT_MS,
      nriRegistrationTimeoutMs: options.nri?.registrationTimeoutMs ?? DEFAULT_NRI_REGISTRATION_TIMEOUT_MS,
      sandboxImage: PAUSE_IMAGE_REF,
      cniBinDir: paths.cniBinDir,
      cniConfDir: path.join(dir, 'cni', 'conf.d'),
      ...(options.logLevel ? { logLevel: options.logLevel } : {}),
    });
    await writeFile(layout.configPath, config);
    // Pods with their own network namespace get a private bridge; the marker lists it so that
    // cleanup deletes it (it outlives the pods).
    const bridge = `th-${path.basename(dir).slice(STACK_DIR_PREFIX.length)}`.slice(0, 15);
    await writeFile(path.join(dir, 'cni', 'conf.d', '10-thaw.conflist'), renderCniConflist({
      name: `thaw-${path.basename(dir)}`, bridge, subnet: podSubnetFor(path.basename(dir)), ipamDataDir: path.join(dir, 'cni', 'ipam'),
    }));
    await writeFile(path.join(dir, STACK_MARKER_FILE), JSON.stringify({ ...marker, links: [bridge] }));
    // The CRI client loads the stripped proto; provisioning wrote it, this only repairs a missing copy.
    if (!(await stat(paths.criProtoStripped).then(() => true, () => false))) {
      await writeStrippedCriProto(paths.criProto, paths.criProtoStripped);
    }
    const cri = await CriClient.create({
      address: layout.address,
      protoPath: paths.criProtoStripped,
      logRoot: layout.podLogDir,
      ...(options.criCallTimeoutMs !== undefined ? { defaultTimeoutMs: options.criCallTimeoutMs } : {}),
    });
    stack = new NodeStackImpl(flavor, dir, layout, paths, cri, log, options.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS);
    const t0 = Date.now();
    await stack.startContainerd(options.signal);
    const t1 = Date.now();
    await stack.importDefaultImages(options.signal);
    log.info('node stack started', { dir, containerdVersion: stack.containerdVersion, containerdStartMs: t1 - t0, imagesMs: Date.now() - t1 });
    return stack;
  } catch (err) {
    if (stack) await stack.stop().catch((e: unknown) => log.warn('cleanup after failed start', { err: e }));
    else await destroyStackDir(dir).catch(() => undefined);
    throw err;
  }
}

class NodeStackImpl implements NodeStack {
  containerdVersion = '';
  readonly images = { busybox: BUSYBOX_IMAGE_REF, pause: PAUSE_IMAGE_REF };
  readonly address: string;
  readonly rootDir: string;
  readonly ttrpcAddress: string;
  readonly nriSocketPath: string;
  readonly pluginDir: string;
  readonly pluginConfigDir: string;
  readonly logPath: string;
  readonly podLogDir: string;
  readonly configPath: string;
  private child: ChildProcess | undefined;
  private exited: Promise<void> | undefined;
  private stopped = false;

  constructor(
    readonly flavor: StackFlavor,
    readonly dir: string,
    layout: StackLayout,
    readonly paths: StackPaths,
    readonly cri: CriClient,
    private readonly log: Logger,
    private readonly startTimeoutMs: number,
  ) {
    this.address = layout.address;
    this.rootDir = layout.rootDir;
    this.ttrpcAddress = layout.ttrpcAddress;
    this.nriSocketPath = layout.nriSocketPath;
    this.pluginDir = layout.pluginDir;
    this.pluginConfigDir = layout.pluginConfigDir;
    this.logPath = layout.logPath;
    this.podLogDir = layout.podLogDir;
    this.configPath = layout.configPath;
  }

  get containerdPid(): number {
    return this.child?.exitCode === null && this.child.signalCode === null ? this.child.pid ?? 0 : 0;
  }

  async logTail(maxChars = 4000): Promise<string> {
    return tail(await readFile(this.logPath, 'utf8').catch(() => ''), maxChars);
  }

  async startContainerd(signal?: AbortSignal): Promise<void> {
    if (this.stopped) throw new StackError(StackErrorCode.INVALID_OPTION, 'stack is stopped', { step: 'start containerd' });
    if (this.containerdPid !== 0) return;
    const fd = openSync(this.logPath, 'a');
    let child: ChildProcess;
    try {
      child = spawn(this.paths.containerd, ['--config', this.configPath], {
        // The flavor's bin dir first: containerd finds its shim there, the shim its runc, runc its CRIU,
        // CRIU its GNU tar and gzip.
        env: { ...process.env, PATH: `${this.paths.binDir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin` },
        stdio: ['ignore', fd, fd],
      });
    } finally {
      closeSync(fd);
    }
    this.child = child;
    this.exited = new Promise<void>((resolve) => {
      child.once('exit', () => resolve());
      child.once('error', () => resolve());
    });
    const deadline = Date.now() + this.startTimeoutMs;
    let lastError: unknown;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new StackError(StackErrorCode.CONTAINERD_EXITED, `containerd exited (${child.exitCode ?? child.signalCode}) while starting`, {
          step: 'start containerd', evidence: { config: this.configPath, logTail: await this.logTail() },
        });
      }
      if (signal?.aborted) {
        throw new StackError(StackErrorCode.ABORTED, 'aborted while waiting for containerd', { step: 'start containerd', cause: signal.reason });
      }
      if (Date.now() > deadline) {
        throw new StackError(StackErrorCode.START_TIMEOUT, `containerd's CRI did not answer within ${this.startTimeoutMs} ms`, {
          step: 'start containerd', cause: lastError, evidence: { config: this.configPath, logTail: await this.logTail() },
        });
      }
      try {
        const v = await this.cri.version({ timeoutMs: 1000, ...(signal ? { signal } : {}) });
        this.containerdVersion = v.runtime_version;
        return;
      } catch (err) {
        lastError = err;
        await sleep(100, signal, 'start containerd').catch(() => undefined);
      }
    }
  }

  async killContainerd(): Promise<void> {
    await this.signalContainerd('SIGKILL', 0);
  }

  async restartContainerd(signal?: AbortSignal): Promise<void> {
    await this.signalContainerd('SIGTERM', CONTAINERD_TERM_GRACE_MS);
    await this.startContainerd(signal);
  }

  private async signalContainerd(sig: NodeJS.Signals, graceMs: number): Promise<void> {
    const child = this.child;
    if (!child || this.containerdPid === 0) return;
    child.kill(sig);
    const exited = this.exited ?? Promise.resolve();
    if (graceMs > 0) {
      const cancel = new AbortController(); // so the grace timer does not hold the event loop after the exit
      const timer = sleep(graceMs, cancel.signal).then(() => 'timeout' as const, () => 'cancelled' as const);
      const first = await Promise.race([exited.then(() => 'exited' as const), timer]);
      cancel.abort();
      if (first === 'timeout') child.kill('SIGKILL');
    }
    await exited;
  }

  async importDefaultImages(signal?: AbortSignal): Promise<void> {
    const rootfs = path.join(this.dir, 'busybox-rootfs');
    await buildBusyboxRootfs(rootfs, {}, this.paths.busybox);
    await this.importImage({ ref: PAUSE_IMAGE_REF, rootfsDir: rootfs, entrypoint: PAUSE_COMMAND, ...(signal ? { signal } : {}) });
    await this.importImage({ ref: BUSYBOX_IMAGE_REF, rootfsDir: rootfs, cmd: ['/bin/sh'], ...(signal ? { signal } : {}) });
    await rm(rootfs, { recursive: true, force: true });
  }

  async importImage(o: ImportImageOptions): Promise<{ ref: string; manifestDigest: string }> {
    const r = await importImageInto({ address: this.address, ctrPath: this.paths.ctr, tarPath: this.paths.tar, imageCacheDir: this.paths.imageCacheDir }, o);
    return { ref: r.ref, manifestDigest: r.manifestDigest };
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    // Pods first, through CRI, while containerd runs: that is the clean path (shims exit, mounts go).
    if (this.containerdPid !== 0) {
      try {
        const pods = await this.cri.listPodSandbox({}, { timeoutMs: 5000 });
        await Promise.all(pods.map(async (p) => {
          await this.cri.stopPodSandbox(p.id, { timeoutMs: 15_000 }).catch(() => undefined);
          await this.cri.removePodSandbox(p.id, { timeoutMs: 15_000 }).catch(() => undefined);
        }));
      } catch (err) {
        this.log.warn('CRI teardown failed; killing instead', { err });
      }
      await this.signalContainerd('SIGTERM', CONTAINERD_TERM_GRACE_MS);
    }
    this.cri.close();
    // Whatever is left (shims of a killed containerd, pods CRI could not remove, mounts) goes the hard way.
    await destroyStackDir(this.dir, { logger: this.log });
  }
}

/**
 * Builds an image from `o.rootfsDir` (see buildBusyboxRootfs) and imports it into `stack` as `o.ref`
 * (a fully qualified name), ready for runPod. Throws STACK_IMAGE_FAILED with ctr's stderr.
 */
export function importImage(stack: Pick<NodeStack, 'importImage'>, o: ImportImageOptions): Promise<{ ref: string; manifestDigest: string }> {
  return stack.importImage(o);
}
