/**
 * What the checkpoint flow must know about a running container, read from the host through /proc (like
 * Dynamo's executor and runc's descriptors.json): its mounts and which of them CRIU must treat as external,
 * the targets of its stdio fds, its network namespace, the RSS of its process tree and its command line.
 *
 * The parsers are pure (tested with hand-made mountinfo lines); `inspectContainer` is the one reader.
 *
 * The external-mount plan (reference/restore-recipe.md): every mount of the container except `/`, `/proc`,
 * `/dev`, `/dev/pts`, `/dev/mqueue` and `/sys` is external, keyed by its own mountpoint. CRIU saves the
 * content of those six itself (or recreates them: proc, sysfs, devpts, mqueue; `/dev` is a tmpfs it tars);
 * every other mount is a bind of something outside the container (/etc/hosts, /dev/shm, the cgroup
 * controllers, /snapshot-control, the driver under /usr/local/nvidia on GPU nodes) whose content a restore
 * gets from the target pod, which has the same mountpoints. Without the mark CRIU stops at the first one
 * ("doesn't have a proper root mount"); nested mounts with root "/" count too. The key is the mountpoint
 * itself because the restore side looks mounts up by it (`mnt[<key>]:<same path in the target>`).
 */
import { readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';

import { ThawError } from '../errors.js';
import { InspectErrorCode } from './restore-errors.js';
export { InspectErrorCode } from './restore-errors.js';

/** Mounts CRIU dumps and restores itself; everything else is external. */
export const CRIU_OWNED_MOUNTPOINTS: readonly string[] = ['/', '/proc', '/dev', '/dev/pts', '/dev/mqueue', '/sys'];


export class InspectError extends ThawError {
  declare readonly code: InspectErrorCode;
  constructor(code: InspectErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'InspectError';
  }
}

/** One line of /proc/<pid>/mountinfo (proc(5)), with octal escapes undone. */
export interface MountInfo {
  mountId: number;
  parentId: number;
  /** "major:minor" */
  device: string;
  /** The root of the mount within its filesystem ("/" for a whole filesystem, a path for a bind mount). */
  root: string;
  /** As the process sees it (relative to its root: container paths for a container's process). */
  mountPoint: string;
  mountOptions: string;
  optionalFields: string[];
  fsType: string;
  source: string;
  superOptions: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo octal. */
function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Parses one mountinfo line. Pure; throws CHECKPOINT_INSPECT_MOUNTINFO_INVALID for anything else. */
export function parseMountInfoLine(line: string): MountInfo {
  const fields = line.trim().split(' ');
  const dash = fields.indexOf('-', 6);
  const bad = (): InspectError =>
    new InspectError(InspectErrorCode.MOUNTINFO_INVALID, `not a mountinfo line: ${JSON.stringify(line)}`, {
      step: 'parse mountinfo',
      evidence: { line },
    });
  if (dash < 0 || fields.length < dash + 3 || !/^\d+:\d+$/.test(fields[2] ?? '')) throw bad();
  const mountId = Number(fields[0]);
  const parentId = Number(fields[1]);
  if (!Number.isSafeInteger(mountId) || !Number.isSafeInteger(parentId)) throw bad();
  return {
    mountId,
    parentId,
    device: fields[2]!,
    root: unescapeMountinfo(fields[3]!),
    mountPoint: unescapeMountinfo(fields[4]!),
    mountOptions: fields[5]!,
    optionalFields: fields.slice(6, dash),
    fsType: fields[dash + 1]!,
    source: unescapeMountinfo(fields[dash + 2]!),
    superOptions: fields.slice(dash + 3).join(' '),
  };
}

/** Parses a whole mountinfo file (blank lines skipped), in the kernel's order (parents before children). */
export function parseMountInfo(text: string): MountInfo[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map(parseMountInfoLine);
}

export interface ExternalMount {
  mountpoint: string;
  /** The key CRIU records; the mountpoint itself (see the file comment). */
  key: string;
}

/**
 * The mounts CRIU must treat as external: every mountpoint but CRIU_OWNED_MOUNTPOINTS, once each (a path
 * mounted over twice is one `mnt[path]` for CRIU), in mountinfo order. Pure.
 */
export function planExternalMounts(mounts: readonly MountInfo[]): ExternalMount[] {
  const seen = new Set<string>();
  const plan: ExternalMount[] = [];
  for (const m of mounts) {
    if (CRIU_OWNED_MOUNTPOINTS.includes(m.mountPoint) || seen.has(m.mountPoint)) continue;
    seen.add(m.mountPoint);
    plan.push({ mountpoint: m.mountPoint, key: m.mountPoint });
  }
  return plan;
}

/** "net:[4026531840]" → 4026531840 (readlink of /proc/<pid>/ns/<ns>). Pure; undefined for anything else. */
export function parseNamespaceLink(link: string): number | undefined {
  const m = /^[a-z_]+:\[(\d+)\]$/.exec(link);
  return m ? Number(m[1]) : undefined;
}

/** The kB value of a `Name:   123 kB` line of /proc/<pid>/status (VmRSS, ...). Pure; undefined when absent. */
export function parseStatusKb(statusText: string, field: string): number | undefined {
  const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB$`, 'm').exec(statusText);
  return m ? Number(m[1]) : undefined;
}

/** The NUL-separated strings of /proc/<pid>/cmdline or environ. Pure. */
export function splitNulList(text: string): string[] {
  const parts = text.split('\0');
  if (parts.length > 0 && parts[parts.length - 1] === '') parts.pop();
  return parts;
}

/** Variable names of an environ list ("K=V" → "K"); entries without '=' are left out. Pure. */
export function envKeysOf(environ: readonly string[]): string[] {
  const keys = new Set<string>();
  for (const kv of environ) {
    const eq = kv.indexOf('=');
    if (eq > 0) keys.add(kv.slice(0, eq));
  }
  return [...keys].sort();
}

export interface ContainerInspection {
  pid: number;
  mounts: MountInfo[];
  externalMounts: ExternalMount[];
  /** readlink of /proc/<pid>/fd/0..2 ("pipe:[75511]", "/dev/null"); "" for a closed fd. */
  stdioFds: string[];
  netns: {
    inode: number;
    /** The container shares our (the host's) network namespace (a host-network pod): it is not external then. */
    isHost: boolean;
  };
  /** Every pid of the tree rooted at `pid` (host pids), root first. */
  pids: number[];
  /** Sum of VmRSS over the tree, in bytes (shared pages counted once per process). */
  rssBytes: number;
  cmdline: string[];
  envKeys: string[];
}

export interface InspectOptions {
  /** Where proc is mounted (tests); default /proc. */
  procRoot?: string;
  /**
   * The network namespace that counts as the host's; default <procRoot>/self/ns/net: ours. That is the one
   * that matters, because CRIU (our child) treats its own namespace as the root one and does not dump it; the
   * agent runs with hostNetwork, so ours is the host's. (/proc/1/ns/net is not even readable on every host:
   * EACCES as root on the project's VMs.)
   */
  hostNetNsPath?: string;
}

const STEP = 'inspect container';

function procError(path: string, err: unknown, pid: number): InspectError {
  return new InspectError(InspectErrorCode.PROC_UNREADABLE, `cannot read ${path}: ${(err as Error).message}`, {
    step: STEP,
    cause: err,
    evidence: { pid, path, errno: (err as NodeJS.ErrnoException).code },
  });
}

async function readProc(path: string, pid: number): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    throw procError(path, err, pid);
  }
}

/** The tree rooted at `pid` through /proc/<p>/task/<t>/children (CONFIG_PROC_CHILDREN; present on these kernels). */
export async function processTree(procRoot: string, pid: number): Promise<number[]> {
  const out: number[] = [];
  const queue = [pid];
  const seen = new Set<number>();
  while (queue.length > 0) {
    const p = queue.shift()!;
    if (seen.has(p)) continue;
    seen.add(p);
    out.push(p);
    let tasks: string[];
    try {
      tasks = await readdir(join(procRoot, String(p), 'task'));
    } catch (err) {
      if (p === pid) throw procError(join(procRoot, String(p), 'task'), err, pid);
      continue; // a child that exited meanwhile
    }
    for (const t of tasks) {
      const children = await readFile(join(procRoot, String(p), 'task', t, 'children'), 'utf8').catch(() => '');
      for (const c of children.trim().split(/\s+/)) if (c !== '') queue.push(Number(c));
    }
  }
  return out;
}

/**
 * Reads what the checkpoint needs about the container whose init is host pid `pid`. Throws
 * CHECKPOINT_INSPECT_PROC_UNREADABLE when the process is gone (or /proc is not readable).
 */
export async function inspectContainer(pid: number, options: InspectOptions = {}): Promise<ContainerInspection> {
  const procRoot = options.procRoot ?? '/proc';
  const base = join(procRoot, String(pid));
  const mounts = parseMountInfo(await readProc(join(base, 'mountinfo'), pid));
  const stdioFds: string[] = [];
  for (const fd of [0, 1, 2]) {
    try {
      stdioFds.push(await readlink(join(base, 'fd', String(fd))));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw procError(join(base, 'fd', String(fd)), err, pid);
      stdioFds.push('');
    }
  }
  const netLinkPath = join(base, 'ns', 'net');
  const hostLinkPath = options.hostNetNsPath ?? join(procRoot, 'self', 'ns', 'net');
  let netLink: string;
  let hostLink: string;
  try {
    netLink = await readlink(netLinkPath);
  } catch (err) {
    throw procError(netLinkPath, err, pid);
  }
  try {
    hostLink = await readlink(hostLinkPath);
  } catch (err) {
    throw procError(hostLinkPath, err, pid);
  }
  const inode = parseNamespaceLink(netLink);
  if (inode === undefined) throw procError(netLinkPath, new Error(`unexpected namespace link ${JSON.stringify(netLink)}`), pid);
  const cmdline = splitNulList(await readProc(join(base, 'cmdline'), pid));
  const envKeys = envKeysOf(splitNulList(await readProc(join(base, 'environ'), pid)));
  const pids = await processTree(procRoot, pid);
  let rssKb = 0;
  for (const p of pids) {
    const status = await readFile(join(procRoot, String(p), 'status'), 'utf8').catch(() => '');
    rssKb += parseStatusKb(status, 'VmRSS') ?? 0;
  }
  return {
    pid,
    mounts,
    externalMounts: planExternalMounts(mounts),
    stdioFds,
    netns: { inode, isHost: netLink === hostLink },
    pids,
    rssBytes: rssKb * 1024,
    cmdline,
    envKeys,
  };
}
