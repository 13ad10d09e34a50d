/**
 * The domain options of a dump and a restore, and the ONE function per operation that turns them into
 * CRIU's `criu_opts`. Pure: no fs, no sockets, so the mapping is table-tested without CRIU.
 *
 * How directories reach CRIU. runc passes `images_dir_fd` = its own fd number, and CRIU opens
 * /proc/<peer pid>/fd/<n>, the peer being the socket pair's creator (SO_PEERCRED; cr-service.c
 * resolve_images_dir_path). That breaks when swrk runs in another PID namespace (nsenter -p): our pid
 * is not visible there, so CRIU's getsockopt gives pid 0 (seen with CRIU 4.1.1: "Can't open dir
 * /proc/0/fd/19: No such file or directory", then "Can't open images directory"). thaw instead hands the directories to the
 * swrk process as inherited fds (4 = images, 5 = work) and names them /proc/self/fd/<n>, which
 * resolves in any namespace where /proc shows the swrk process. The work dir has no path field in
 * criu_opts (only work_dir_fd, resolved the same peer way), so it travels in an RPC config file
 * (`config_file`, "work-dir /proc/self/fd/5") that the client writes and passes as fd 6.
 */
import { CriuError, CriuErrorCode } from './errors.js';
import {
  CriuCgMode,
  CriuNetworkLockMethod,
  type CriuOptsMessage,
} from './rpc.js';

export const DEFAULT_CHECK_LOG_FILE = 'check.log';
export const DEFAULT_DUMP_LOG_FILE = 'dump.log';
export const DEFAULT_RESTORE_LOG_FILE = 'restore.log';
/** CRIU's log level 4 = debug: the log is the only evidence of a failure, and it is cheap. */
export const DEFAULT_CRIU_LOG_LEVEL = 4;

/** Where the swrk child finds what we pass it. */
export const CHILD_IMAGES_DIR_FD = 4;
export const CHILD_WORK_DIR_FD = 5;
export const CHILD_CONFIG_FD = 6;
/** Inherit-fds (restore) start here, in key order. */
export const CHILD_FIRST_INHERIT_FD = 7;

export type CgroupsMode = 'ignore' | 'none' | 'props' | 'soft' | 'full' | 'strict' | 'default';
export type NetworkLockMethod = 'iptables' | 'nftables' | 'skip';
export type JoinableNamespace = 'net' | 'uts' | 'ipc' | 'time' | 'user' | 'mnt';

interface CommonOptions {
  /** Where the images are (dump: written; restore: read). */
  imagesDir: string;
  /** Where CRIU writes its log (default: the images dir). Must be writable. */
  workDir?: string;
  /** Log file name inside the work dir (a bare name: CRIU refuses subdirectories). */
  logFile?: string;
  /** CRIU's -v level, 0..4; default DEFAULT_CRIU_LOG_LEVEL. */
  logLevel?: number;
  /** --tcp-established */
  tcpEstablished?: boolean;
  /** --shell-job: the tree is attached to a session/tty outside it. */
  shellJob?: boolean;
  /** --file-locks */
  fileLocks?: boolean;
  /** --ext-unix-sk */
  extUnixSk?: boolean;
  /** --manage-cgroups=MODE */
  manageCgroupsMode?: CgroupsMode;
  /** --network-lock METHOD */
  networkLock?: NetworkLockMethod;
  /** --skip-mnt, one per mountpoint. */
  skipMounts?: string[];
}

export interface DumpOptions extends CommonOptions {
  /** Root of the tree to dump (as the swrk process sees pids). Required: CRIU would dump its caller. */
  pid: number;
  /** --leave-running */
  leaveRunning?: boolean;
  /** Mounts whose content is outside the images; each becomes --external mnt[<mountpoint>]:<key>. */
  externalMounts?: Array<{ mountpoint: string; key: string }>;
  /** The tree's network namespace is external: --external net[<inode>]:<key>. */
  externalNetNs?: { inode: number; key: string };
  /** --freeze-cgroup PATH */
  freezeCgroup?: string;
  /** --ghost-limit, in bytes. */
  ghostLimitBytes?: number;
  /** --link-remap */
  linkRemap?: boolean;
}

export interface RestoreOptions extends CommonOptions {
  /** --root: the root filesystem the tree is restored into (as the swrk process sees it). */
  rootPath?: string;
  /**
   * CRIU's RPC always restores detached (cr-service.c restore_using_req forces it); `false` is refused
   * rather than silently ignored. Use `restoreSibling` for a sibling of swrk.
   */
  restoreDetached?: boolean;
  /** --restore-sibling */
  restoreSibling?: boolean;
  /** Mounts dumped as external: --external mnt[<key>]:<mountpoint> (mountpoint as the swrk process sees it). */
  externalMounts?: Array<{ key: string; mountpoint: string }>;
  /**
   * --inherit-fd fd[N]:<key>: `fd` is OUR fd (e.g. the target's /proc/<pid>/ns/net for an external
   * net namespace dumped with key "extnet", or its stdout pipe for key "pipe:[<ino>]"); the client
   * passes it to swrk, numbered in key order, so the same options always give the same request.
   */
  inheritFds?: Array<{ fd: number; key: string }>;
  /** --join-ns NS:PATH[,EXTRA]; "pid" is refused by CRIU, use the nsenter wrapper for it. */
  joinNamespaces?: Array<{ ns: JoinableNamespace; path: string; extraOpt?: string }>;
  /** --cgroup-root [controller:]path */
  cgroupRoots?: Array<{ controller?: string; path: string }>;
  /** --orphan-pts-master: the pty master arrives in the orphanPtsMaster notification. */
  orphanPtsMaster?: boolean;
  /**
   * --lazy-pages: private anonymous pages are left to a lazy-pages daemon listening on lazy-pages.socket in the
   * work dir (thaw-fill, memory-fill.ts), which must be listening before the request is sent.
   */
  lazyPages?: boolean;
}

/** The fds the swrk child gets and what CRIU must be told about them. */
export interface ChildFdPlan {
  /** Our fds, in child order from CHILD_IMAGES_DIR_FD on (holes filled with the images fd). */
  extraFds: number[];
  criu: {
    imagesDirChildFd: number;
    workDirChildFd?: number;
    configChildFd?: number;
    inheritFds: Array<{ key: string; childFd: number }>;
  };
}

/**
 * Numbers the child's fds: 4 images, 5 work dir, 6 config, 7.. inherit-fds sorted by key (then by
 * our fd), so the request is deterministic. A missing work dir/config leaves its slot filled with the
 * images fd (stdio slots cannot be empty), which nothing refers to.
 */
export function planChildFds(
  imagesFd: number,
  workFd: number | undefined,
  configFd: number | undefined,
  inheritFds: ReadonlyArray<{ fd: number; key: string }>,
): ChildFdPlan {
  const sorted = [...inheritFds].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.fd - b.fd));
  const extraFds = [imagesFd, workFd ?? imagesFd, configFd ?? imagesFd, ...sorted.map((f) => f.fd)];
  const criu: ChildFdPlan['criu'] = {
    imagesDirChildFd: CHILD_IMAGES_DIR_FD,
    inheritFds: sorted.map((f, i) => ({ key: f.key, childFd: CHILD_FIRST_INHERIT_FD + i })),
  };
  if (workFd !== undefined) criu.workDirChildFd = CHILD_WORK_DIR_FD;
  if (configFd !== undefined) criu.configChildFd = CHILD_CONFIG_FD;
  return { extraFds, criu };
}

/**
 * The empty directory, inside the work dir, that CRIU takes as its plugin dir (`libdir`): CRIU loads every `.so`
 * in its plugin dir as code, so it gets one that only thaw writes (the client makes it empty before each
 * operation). thaw needs no CRIU plugin (the CUDA state goes through thaw's own driver calls).
 */
export const CRIU_PLUGIN_DIR = 'criu-plugins';

/** The text of the RPC config file that carries the work dir and the plugin dir, both through the work dir's fd. */
export function workDirConfigText(workDirChildFd: number = CHILD_WORK_DIR_FD): string {
  return `work-dir /proc/self/fd/${workDirChildFd}\nlibdir /proc/self/fd/${workDirChildFd}/${CRIU_PLUGIN_DIR}\n`;
}

/** What the builders need besides the domain options. */
export interface BuildContext {
  fds: ChildFdPlan['criu'];
  /** Ask CRIU for notifications (set when the caller passed handlers). */
  notify: boolean;
}

const CG_MODES: Record<CgroupsMode, CriuCgMode> = {
  ignore: CriuCgMode.IGNORE,
  none: CriuCgMode.CG_NONE,
  props: CriuCgMode.PROPS,
  soft: CriuCgMode.SOFT,
  full: CriuCgMode.FULL,
  strict: CriuCgMode.STRICT,
  default: CriuCgMode.DEFAULT,
};

const LOCK_METHODS: Record<NetworkLockMethod, CriuNetworkLockMethod> = {
  iptables: CriuNetworkLockMethod.IPTABLES,
  nftables: CriuNetworkLockMethod.NFTABLES,
  skip: CriuNetworkLockMethod.SKIP,
};

function invalid(step: string, message: string): CriuError {
  return new CriuError(CriuErrorCode.INVALID_OPTIONS, message, { step });
}

/** The fields dump and restore share; validated with one exact message per field. */
function commonOpts(o: CommonOptions, ctx: BuildContext, step: string, defaultLog: string): CriuOptsMessage {
  const logFile = o.logFile ?? defaultLog;
  if (logFile === '' || logFile.includes('/')) {
    throw invalid(step, `logFile must be a bare file name (CRIU refuses subdirectories), got ${JSON.stringify(logFile)}`);
  }
  const logLevel = o.logLevel ?? DEFAULT_CRIU_LOG_LEVEL;
  if (!Number.isInteger(logLevel) || logLevel < 0 || logLevel > 4) {
    throw invalid(step, `logLevel must be an integer 0..4, got ${logLevel}`);
  }
  const m: CriuOptsMessage = {
    imagesDirFd: -1,
    imagesDir: `/proc/self/fd/${ctx.fds.imagesDirChildFd}`,
    logFile,
    logLevel,
  };
  if (ctx.fds.configChildFd !== undefined) m.configFile = `/proc/self/fd/${ctx.fds.configChildFd}`;
  if (ctx.notify) m.notifyScripts = true;
  if (o.tcpEstablished !== undefined) m.tcpEstablished = o.tcpEstablished;
  if (o.shellJob !== undefined) m.shellJob = o.shellJob;
  if (o.fileLocks !== undefined) m.fileLocks = o.fileLocks;
  if (o.extUnixSk !== undefined) m.extUnixSk = o.extUnixSk;
  if (o.manageCgroupsMode !== undefined) {
    const mode = CG_MODES[o.manageCgroupsMode];
    if (mode === undefined) throw invalid(step, `manageCgroupsMode must be one of ${Object.keys(CG_MODES).join(', ')}`);
    m.manageCgroupsMode = mode;
  }
  if (o.networkLock !== undefined) {
    const method = LOCK_METHODS[o.networkLock];
    if (method === undefined) throw invalid(step, `networkLock must be one of ${Object.keys(LOCK_METHODS).join(', ')}`);
    m.networkLock = method;
  }
  if (o.skipMounts !== undefined && o.skipMounts.length > 0) m.skipMnt = [...o.skipMounts];
  return m;
}

/** DumpOptions → criu_opts. The only place a dump request's options are made. */
export function buildDumpRequestOpts(o: DumpOptions, ctx: BuildContext): CriuOptsMessage {
  const step = 'build criu dump request';
  if (!Number.isInteger(o.pid) || o.pid <= 0) throw invalid(step, `pid must be a positive integer, got ${o.pid}`);
  const m = commonOpts(o, ctx, step, DEFAULT_DUMP_LOG_FILE);
  m.pid = o.pid;
  if (o.leaveRunning !== undefined) m.leaveRunning = o.leaveRunning;
  if (o.linkRemap !== undefined) m.linkRemap = o.linkRemap;
  if (o.freezeCgroup !== undefined) m.freezeCgroup = o.freezeCgroup;
  if (o.ghostLimitBytes !== undefined) {
    if (!Number.isInteger(o.ghostLimitBytes) || o.ghostLimitBytes < 0 || o.ghostLimitBytes > 0xffffffff) {
      throw invalid(step, `ghostLimitBytes must be an integer 0..4294967295, got ${o.ghostLimitBytes}`);
    }
    m.ghostLimit = o.ghostLimitBytes;
  }
  const external: string[] = [];
  for (const { mountpoint, key } of o.externalMounts ?? []) {
    if (!mountpoint.startsWith('/')) throw invalid(step, `externalMounts: mountpoint must be absolute, got ${mountpoint}`);
    if (key === '' || /[\]:]/.test(key)) throw invalid(step, `externalMounts: key must be non-empty without ':' or ']', got ${key}`);
    external.push(`mnt[${mountpoint}]:${key}`);
  }
  if (o.externalNetNs !== undefined) {
    const { inode, key } = o.externalNetNs;
    if (!Number.isInteger(inode) || inode <= 0) throw invalid(step, `externalNetNs.inode must be a positive integer, got ${inode}`);
    external.push(`net[${inode}]:${key}`);
  }
  if (external.length > 0) m.external = external;
  return m;
}

/** RestoreOptions → criu_opts. The only place a restore request's options are made. */
export function buildRestoreRequestOpts(o: RestoreOptions, ctx: BuildContext): CriuOptsMessage {
  const step = 'build criu restore request';
  if (o.restoreDetached === false) {
    throw invalid(step, 'restoreDetached: false is not possible over RPC (CRIU always detaches); use restoreSibling instead');
  }
  const m = commonOpts(o, ctx, step, DEFAULT_RESTORE_LOG_FILE);
  if (o.rootPath !== undefined) m.root = o.rootPath;
  if (o.restoreSibling !== undefined) m.rstSibling = o.restoreSibling;
  if (o.orphanPtsMaster !== undefined) m.orphanPtsMaster = o.orphanPtsMaster;
  if (o.lazyPages === true) {
    if (o.workDir === undefined) throw invalid(step, 'lazyPages needs a workDir: CRIU finds the lazy-pages socket there');
    m.lazyPages = true;
  }
  const external: string[] = [];
  for (const { key, mountpoint } of o.externalMounts ?? []) {
    if (!mountpoint.startsWith('/')) throw invalid(step, `externalMounts: mountpoint must be absolute, got ${mountpoint}`);
    if (key === '' || /[\]:]/.test(key)) throw invalid(step, `externalMounts: key must be non-empty without ':' or ']', got ${key}`);
    external.push(`mnt[${key}]:${mountpoint}`);
  }
  if (external.length > 0) m.external = external;
  if (ctx.fds.inheritFds.length > 0) m.inheritFd = ctx.fds.inheritFds.map(({ key, childFd }) => ({ key, fd: childFd }));
  if (o.joinNamespaces !== undefined && o.joinNamespaces.length > 0) {
    m.joinNs = o.joinNamespaces.map(({ ns, path, extraOpt }) => {
      if ((ns as string) === 'pid') {
        throw invalid(step, 'joinNamespaces: CRIU cannot join a PID namespace; run swrk through nsenterWrapper() instead');
      }
      return extraOpt === undefined ? { ns, nsFile: path } : { ns, nsFile: path, extraOpt };
    });
  }
  if (o.cgroupRoots !== undefined && o.cgroupRoots.length > 0) {
    m.cgRoot = o.cgroupRoots.map(({ controller, path }) => (controller === undefined ? { path } : { ctrl: controller, path }));
  }
  return m;
}
