/**
 * thaw's CRIU client: check, version, feature check, dump and restore over CRIU's RPC.
 *
 * Configuration flows in three stages (like runc): the caller's plain `DumpOptions` / `RestoreOptions`
 * (options.ts) → one builder per operation that makes the protobuf `criu_opts` → `CriuSwrk`, which
 * runs one swrk process per operation. Nothing here is global: the libc binding, the codec, the
 * logger, the criu binary and its environment all come in through `CriuClientOptions`.
 */
import { closeSync, constants as fsConstants, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { Logger } from '../../log.js';
import type { Limiter } from '../../sys/concurrency.js';
import { CriuError, CriuErrorCode } from './errors.js';
import type { CriuNotifyHandlers } from './notify.js';
import {
  buildDumpRequestOpts,
  buildRestoreRequestOpts,
  CRIU_PLUGIN_DIR,
  DEFAULT_CHECK_LOG_FILE,
  DEFAULT_CRIU_LOG_LEVEL,
  DEFAULT_DUMP_LOG_FILE,
  DEFAULT_RESTORE_LOG_FILE,
  planChildFds,
  workDirConfigText,
  type DumpOptions,
  type RestoreOptions,
} from './options.js';
import { CriuCodec, CriuReqType, type CriuOptsMessage, type CriuReqMessage, type CriuRespMessage } from './rpc.js';
import { Libc } from './seqpacket.js';
import { CriuSwrk, HOST_SYSTEM_PATH, type SwrkSpawnOptions } from './swrk.js';
import { DEFAULT_CRIU_DUMP_ABORT_GRACE_MS, DEFAULT_CRIU_RPC_DUMP_TIMEOUT_MS, DEFAULT_CRIU_RPC_RESTORE_TIMEOUT_MS, DEFAULT_NSENTER_PATH, DEFAULT_UNSHARE_PATH } from '../../defaults.js';

export { HOST_SYSTEM_PATH } from './swrk.js';

/** The RPC config file the client writes into the work dir. */
export const CRIU_RPC_CONFIG_FILE = '.thaw-criu-rpc.conf';

/** Defaults, named with their units. */
export const DEFAULT_CRIU_CHECK_TIMEOUT_MS = 30_000;
export const DEFAULT_CRIU_VERSION_TIMEOUT_MS = 10_000;

export interface CriuClientOptions {
  /** Absolute path of criu (e.g. /opt/thaw/stack/1.7/bin/criu). */
  criuPath: string;
  logger: Logger;
  /**
   * The swrk process's whole environment. CRIU runs `tar` and `gzip` from PATH (tmpfs contents on dump and
   * restore), so PATH must reach GNU tar: pass `criuEnvironment(<toolkit bin dir>)`. Default: PATH the host's
   * system dirs and nothing else (never our own environment: LD_* or CRIU_LIBS_DIR would reach CRIU).
   */
  env?: NodeJS.ProcessEnv;
  /** A libc binding to share (one per process is enough); default: loaded on construction. */
  libc?: Libc;
  /** A codec to share; default: loaded on construction. */
  codec?: CriuCodec;
  /** Grace for CRIU to exit after its final answer. */
  exitGraceMs?: number;
  /**
   * An argv prefix put before every swrk (and before a call's `wrapper`) that makes it die with this process:
   * `parentDeathWrapper()`. Without it a CRIU whose agent was killed runs on, tracing the worker, until it
   * next talks to the socket (a dump blocked inside a task never does).
   */
  parentDeathWrapper?: readonly string[];
  /**
   * The bound on CRIU processes at once (dumps, restores, checks), shared by everything the caller hands it
   * to; a call waits for its turn before its swrk starts (its timeout runs from then). Default: unbounded.
   */
  limiter?: Limiter;
}

/** Per-call settings common to every operation. */
export interface CriuCallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
  /**
   * Run swrk through this argv prefix, e.g. `nsenterWrapper(pid)`, to restore into another process's
   * namespaces (see `nsenterWrapper`).
   */
  wrapper?: readonly string[];
}

/** A dump's call settings: the common ones and how long an abort waits for CRIU to undo the dump itself. */
export interface DumpCallOptions extends CriuCallOptions {
  /** Default DEFAULT_CRIU_DUMP_ABORT_GRACE_MS; see `CriuClient.dump`. */
  abortGraceMs?: number;
}

export interface CriuVersion {
  major: number;
  minor: number;
  sublevel: number;
  gitid?: string;
}

export interface CriuFeatures {
  memTrack: boolean;
  lazyPages: boolean;
  pidfdStore: boolean;
}

export interface DumpResult {
  logPath: string;
}

export interface RestoreResult {
  /** The restored root's pid, as the swrk process sees it (inside the target's PID namespace under nsenter -p). */
  pid: number;
  logPath: string;
}

/**
 * The argv prefix that runs swrk inside the PID, IPC and UTS namespaces of `pid` (net too when `net` is set; a
 * restore joins the target's net through `inheritFds` instead) and NOT inside its mount namespace: swrk runs in
 * a private copy of OUR mount namespace, so its loader, its plugins and its PATH lookups see only the host's
 * files (setns() into a PID namespace changes neither root nor mounts). The restore reaches the target's
 * filesystem through host paths (host-mounts.ts), as `runc restore` does.
 *
 * Why nsenter and not CRIU's own join_ns: CRIU refuses to join a PID namespace ("join-ns pid
 * namespace not supported", criu/namespaces.c join_ns_add) and an RPC restore runs in the swrk
 * process's PID namespace. nsenter forks after setns() for -p, so its child is in the target's PID namespace,
 * and fds (our socket at 3, the images dir) pass through unchanged. The pid CRIU answers is the one inside the
 * target's PID namespace.
 * Why `unshare --mount --mount-proc` after it: CRIU names processes by the pids of its own PID namespace in
 * /proc (its kerndat vDSO probe reads its helper child's maps: with the host's /proc it read another process and
 * failed, "vdso: Can't find rt vDSO"), so it needs a procfs of the target's PID namespace at /proc. unshare (the
 * host's, forked into the target's PID namespace by nsenter) makes a private copy of our mount namespace (every
 * mount a host mount, propagation private: nothing leaks back) and mounts a new procfs there, whose pids are
 * those of its PID namespace, then execs swrk.
 * Every path must be absolute: nothing here is looked up on a PATH.
 * Killing on timeout kills nsenter's whole tree (nsenter does not forward SIGKILL to its child).
 */
export function nsenterWrapper(pid: number, options: { net?: boolean; nsenterPath?: string; unsharePath?: string } = {}): string[] {
  const flags = ['-p', '-i', '-u', ...(options.net ? ['-n'] : [])];
  return [
    options.nsenterPath ?? DEFAULT_NSENTER_PATH, '-t', String(pid), ...flags, '--',
    options.unsharePath ?? DEFAULT_UNSHARE_PATH, '--mount', '--propagation', 'private', '--mount-proc', '--',
  ];
}

/**
 * The only environment CRIU and its wrappers get: a fixed PATH (the toolkit's bin dir first, for the GNU tar and
 * gzip CRIU runs for tmpfs contents; then the host's system dirs) and nothing else, so no LD_*, no
 * CRIU_LIBS_DIR, no CRIU_CONFIG_FILE, no HOME reaches them from whoever started the agent.
 */
export function criuEnvironment(toolkitBinDir: string): NodeJS.ProcessEnv {
  return { PATH: `${toolkitBinDir}:${HOST_SYSTEM_PATH}` };
}

/** util-linux's setpriv, which the host has beside nsenter (docs/operations.md, "Install on a node": what the host needs). */
export const DEFAULT_SETPRIV_PATH = '/usr/bin/setpriv';

/**
 * `setpriv --pdeathsig KILL`: the kernel kills swrk when the thread that started it exits (Node spawns from
 * its main thread, so: when the agent exits). The setting survives exec, so it holds for CRIU itself, or for
 * the first program of a call's wrapper (nsenter forks CRIU as its child: a restore's CRIU outlives the agent
 * and finishes or fails on its own). Undefined when setpriv is missing.
 */
export function parentDeathWrapper(setprivPath: string = DEFAULT_SETPRIV_PATH): string[] | undefined {
  return existsSync(setprivPath) ? [setprivPath, '--pdeathsig', 'KILL'] : undefined;
}

/** What one operation adds to a CRIU run beyond the request. */
interface RunExtras {
  extraFds?: readonly number[];
  logPath?: string;
  notify?: CriuNotifyHandlers;
  abortGraceMs?: number;
}

export class CriuClient {
  private readonly libc: Libc;
  private readonly codec: CriuCodec;
  private readonly logger: Logger;

  constructor(private readonly options: CriuClientOptions) {
    this.libc = options.libc ?? Libc.load();
    this.codec = options.codec ?? CriuCodec.load();
    this.logger = options.logger.child({ component: 'criu' });
  }

  /**
   * `criu check` over RPC: resolves when CRIU says this kernel can checkpoint; CRIU_FAILED (with the
   * log's Error lines) otherwise. CRIU 4.1.1 needs options with a directory for CHECK (without them its
   * check child dereferences a null request and dies: success=false, cr_errno 0, no log), so the log
   * goes to `workDir` (default: a temporary directory, removed afterwards unless the check failed).
   */
  async check(options: { workDir?: string; logFile?: string } = {}, call: CriuCallOptions = {}): Promise<void> {
    const step = 'criu check';
    const dir = options.workDir ?? mkdtempSync(join(tmpdir(), 'thaw-criu-check-'));
    const logFile = options.logFile ?? DEFAULT_CHECK_LOG_FILE;
    let ok = false;
    try {
      await this.withDirs(dir, undefined, [], step, async (fds) => {
        const opts: CriuOptsMessage = {
          imagesDirFd: -1,
          imagesDir: `/proc/self/fd/${fds.criu.imagesDirChildFd}`,
          logFile,
          logLevel: DEFAULT_CRIU_LOG_LEVEL,
        };
        await this.run({ type: CriuReqType.CHECK, opts }, step, call, DEFAULT_CRIU_CHECK_TIMEOUT_MS, {
          extraFds: fds.extraFds,
          logPath: join(dir, logFile),
        });
      });
      ok = true;
    } finally {
      if (ok && options.workDir === undefined) rmSync(dir, { recursive: true, force: true });
    }
  }

  async version(call: CriuCallOptions = {}): Promise<CriuVersion> {
    const resp = await this.oneShot({ type: CriuReqType.VERSION }, 'criu version', call, DEFAULT_CRIU_VERSION_TIMEOUT_MS);
    const v = resp.version;
    if (v === undefined) {
      throw new CriuError(CriuErrorCode.PROTOCOL, 'VERSION response without a version', { step: 'criu version' });
    }
    const out: CriuVersion = { major: v.majorNumber, minor: v.minorNumber, sublevel: v.sublevel ?? 0 };
    if (v.gitid !== undefined) out.gitid = v.gitid;
    return out;
  }

  /** Asks CRIU whether memory tracking, lazy pages and the pidfd store work here. */
  async featureCheck(call: CriuCallOptions = {}): Promise<CriuFeatures> {
    const resp = await this.oneShot(
      { type: CriuReqType.FEATURE_CHECK, features: { memTrack: true, lazyPages: true, pidfdStore: true } },
      'criu feature check',
      call,
      DEFAULT_CRIU_CHECK_TIMEOUT_MS,
    );
    const f = resp.features ?? {};
    return { memTrack: f.memTrack === true, lazyPages: f.lazyPages === true, pidfdStore: f.pidfdStore === true };
  }

  /**
   * Dumps the tree rooted at `opts.pid` into `opts.imagesDir`. An abort (`call.signal`) does not kill CRIU at once: its next pre-dump, network-lock or post-dump
   * notification is refused, so CRIU undoes the dump and the tree runs on (a kill could land while CRIU runs an
   * injected syscall in a task, which then dies of SIGTRAP); CRIU is killed only if none comes within
   * `call.abortGraceMs` (default DEFAULT_CRIU_DUMP_ABORT_GRACE_MS). Notifications are therefore always on.
   */
  async dump(opts: DumpOptions, notify?: CriuNotifyHandlers, call: DumpCallOptions = {}): Promise<DumpResult> {
    const step = 'criu dump';
    const logFile = opts.logFile ?? DEFAULT_DUMP_LOG_FILE;
    const logPath = join(opts.workDir ?? opts.imagesDir, logFile);
    await this.withDirs(opts.imagesDir, opts.workDir, [], step, async (fds) => {
      const criuOpts = buildDumpRequestOpts(opts, { fds: fds.criu, notify: true });
      await this.run({ type: CriuReqType.DUMP, opts: criuOpts }, step, call, DEFAULT_CRIU_RPC_DUMP_TIMEOUT_MS, {
        extraFds: fds.extraFds,
        logPath,
        notify: notify ?? {},
        abortGraceMs: call.abortGraceMs ?? DEFAULT_CRIU_DUMP_ABORT_GRACE_MS,
      });
    });
    return { logPath };
  }

  /** Restores the tree from `opts.imagesDir` (always detached: CRIU's RPC restore forces it). */
  async restore(opts: RestoreOptions, notify?: CriuNotifyHandlers, call: CriuCallOptions = {}): Promise<RestoreResult> {
    const step = 'criu restore';
    const logFile = opts.logFile ?? DEFAULT_RESTORE_LOG_FILE;
    const logPath = join(opts.workDir ?? opts.imagesDir, logFile);
    let pid = -1;
    await this.withDirs(opts.imagesDir, opts.workDir, opts.inheritFds ?? [], step, async (fds) => {
      const criuOpts = buildRestoreRequestOpts(opts, { fds: fds.criu, notify: notify !== undefined });
      const resp = await this.run({ type: CriuReqType.RESTORE, opts: criuOpts }, step, call, DEFAULT_CRIU_RPC_RESTORE_TIMEOUT_MS, {
        extraFds: fds.extraFds,
        logPath,
        ...(notify ? { notify } : {}),
      });
      if (resp.restore === undefined) {
        throw new CriuError(CriuErrorCode.PROTOCOL, 'RESTORE response without a pid', { step });
      }
      pid = resp.restore.pid;
    });
    return { pid, logPath };
  }

  /**
   * Opens the images and work dirs (O_DIRECTORY, so a wrong path fails here, not inside CRIU), plans
   * the child's fd numbers, runs `fn`, and closes what it opened.
   */
  private async withDirs<T>(
    imagesDir: string,
    workDir: string | undefined,
    inheritFds: ReadonlyArray<{ fd: number; key: string }>,
    step: string,
    fn: (fds: ReturnType<typeof planChildFds>) => Promise<T>,
  ): Promise<T> {
    const opened: number[] = [];
    try {
      const openDir = (path: string, what: string): number => {
        try {
          const fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
          opened.push(fd);
          return fd;
        } catch (cause) {
          throw new CriuError(CriuErrorCode.INVALID_OPTIONS, `cannot open ${what} ${path}`, { step, cause });
        }
      };
      const imagesFd = openDir(imagesDir, 'images dir');
      let workFd: number | undefined;
      let configFd: number | undefined;
      if (workDir !== undefined) {
        workFd = openDir(workDir, 'work dir');
        // The work dir reaches CRIU only through an RPC config file (see options.ts); it lives in the
        // work dir itself, which is ours and writable.
        const configPath = join(workDir, CRIU_RPC_CONFIG_FILE);
        try {
          const pluginDir = join(workDir, CRIU_PLUGIN_DIR);
          rmSync(pluginDir, { recursive: true, force: true });
          mkdirSync(pluginDir, { mode: 0o700 });
          writeFileSync(configPath, workDirConfigText(), { mode: 0o600 });
          configFd = openSync(configPath, fsConstants.O_RDONLY);
          opened.push(configFd);
        } catch (cause) {
          throw new CriuError(CriuErrorCode.INVALID_OPTIONS, `cannot write ${configPath}`, { step, cause });
        }
      }
      return await fn(planChildFds(imagesFd, workFd, configFd, inheritFds));
    } finally {
      for (const fd of opened) closeSync(fd);
    }
  }

  private oneShot(req: CriuReqMessage, step: string, call: CriuCallOptions, defaultTimeoutMs: number): Promise<CriuRespMessage> {
    return this.run(req, step, call, defaultTimeoutMs, {});
  }

  private async run(
    req: CriuReqMessage,
    step: string,
    call: CriuCallOptions,
    defaultTimeoutMs: number,
    extra: RunExtras,
  ): Promise<CriuRespMessage> {
    const limiter = this.options.limiter;
    if (limiter === undefined) return this.runNow(req, step, call, defaultTimeoutMs, extra);
    return limiter.run(() => this.runNow(req, step, call, defaultTimeoutMs, extra), {
      ...(call.signal ? { signal: call.signal } : {}),
      step,
      aborted: (cause) => new CriuError(CriuErrorCode.ABORTED, `${step}: aborted while waiting for a CRIU slot`, { step, cause }),
    });
  }

  private async runNow(
    req: CriuReqMessage,
    step: string,
    call: CriuCallOptions,
    defaultTimeoutMs: number,
    extra: RunExtras,
  ): Promise<CriuRespMessage> {
    const spawnOptions: SwrkSpawnOptions = { criuPath: this.options.criuPath };
    if (this.options.env !== undefined) spawnOptions.env = this.options.env;
    const wrapper = [...(this.options.parentDeathWrapper ?? []), ...(call.wrapper ?? [])];
    if (wrapper.length > 0) spawnOptions.wrapper = wrapper;
    if (extra.extraFds !== undefined) spawnOptions.extraFds = extra.extraFds;
    if (this.options.exitGraceMs !== undefined) spawnOptions.exitGraceMs = this.options.exitGraceMs;
    const swrk = CriuSwrk.start({ libc: this.libc, codec: this.codec, logger: this.logger }, spawnOptions);
    const started = Date.now();
    this.logger.debug('criu swrk started', { step, swrkPid: swrk.pid, wrapper: spawnOptions.wrapper });
    try {
      const resp = await swrk.request(req, {
        step,
        timeoutMs: call.timeoutMs ?? defaultTimeoutMs,
        ...(call.signal ? { signal: call.signal } : {}),
        ...(extra.notify ? { notify: extra.notify } : {}),
        ...(extra.logPath !== undefined ? { logPath: extra.logPath } : {}),
        ...(extra.abortGraceMs !== undefined ? { abortGraceMs: extra.abortGraceMs } : {}),
      });
      this.logger.info(`${step} done`, { durationMs: Date.now() - started });
      return resp;
    } finally {
      await swrk.close();
    }
  }
}
