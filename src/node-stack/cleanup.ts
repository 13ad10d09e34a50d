import { readdir, readFile, readlink, rm, rmdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { silentLogger, type Logger } from '../log.js';
import { StackError, StackErrorCode } from './errors.js';
import { runCommand, sleep, throwIfAborted } from './exec.js';

/** A file in every stack dir: who owns it, so a crashed run's dir can be told from a live one. */
export const STACK_MARKER_FILE = '.thaw-node-stack.json';
/** Stack dirs are `mkdtemp('/tmp/thaw-')`: short, because unix socket paths must stay under 108 bytes. */
export const STACK_DIR_PREFIX = 'thaw-';

export interface StackMarker {
  /** pid of the Node process that started the stack, and its start time (clock ticks since boot, /proc/<pid>/stat field 22). */
  ownerPid: number;
  ownerStartTicks: number;
  flavor: string;
  createdAt: string;
  /** Network links this stack created (deleted at cleanup). */
  links?: string[];
}

export interface ProcInfo {
  pid: number;
  ppid: number;
  startTicks: number;
  cmdline: string[];
}

/** Parses /proc/<pid>/stat (the comm field may hold spaces and parens). Pure. */
export function parseProcStat(text: string): { ppid: number; startTicks: number } | undefined {
  const end = text.lastIndexOf(')');
  if (end < 0) return undefined;
  const rest = text.slice(end + 2).split(' ');
  // rest[0] is field 3 (state); ppid is field 4, starttime field 22.
  const ppid = Number(rest[1]);
  const startTicks = Number(rest[19]);
  return Number.isFinite(ppid) && Number.isFinite(startTicks) ? { ppid, startTicks } : undefined;
}

/** Every process we can read, with parent and command line. */
export async function listProcesses(): Promise<ProcInfo[]> {
  const out: ProcInfo[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const [stat, cmd] = await Promise.all([readFile(`/proc/${name}/stat`, 'utf8'), readFile(`/proc/${name}/cmdline`)]);
      const parsed = parseProcStat(stat);
      if (!parsed) continue;
      out.push({ pid: Number(name), ...parsed, cmdline: cmd.toString('utf8').split('\0').filter((a) => a !== '') });
    } catch {
      // exited while we looked
    }
  }
  return out;
}

export async function processStartTicks(pid: number): Promise<number | undefined> {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  return text === undefined ? undefined : parseProcStat(text)?.startTicks;
}

/**
 * Processes that belong to the stack in `dir`: containerd (its --config is under dir), every
 * containerd-shim whose `-address` socket is under dir (shims outlive containerd), and every
 * descendant of those (the pods' processes, reparented to the shim as subreaper). Pure over `procs`.
 */
export function stackProcesses(procs: readonly ProcInfo[], dir: string): ProcInfo[] {
  const inDir = (p: string | undefined): boolean => p !== undefined && (p === dir || p.startsWith(`${dir}/`));
  const roots = new Set<number>();
  for (const p of procs) {
    const exe = path.basename(p.cmdline[0] ?? '');
    const argAfter = (flag: string): string | undefined => {
      const i = p.cmdline.indexOf(flag);
      return i >= 0 ? p.cmdline[i + 1] : undefined;
    };
    if (exe.startsWith('containerd-shim') && (inDir(argAfter('-address')) || inDir(argAfter('--address')))) roots.add(p.pid);
    if (exe === 'containerd' && (inDir(argAfter('--config')) || inDir(argAfter('-c')))) roots.add(p.pid);
  }
  const children = new Map<number, number[]>();
  for (const p of procs) {
    const list = children.get(p.ppid) ?? [];
    list.push(p.pid);
    children.set(p.ppid, list);
  }
  const found = new Set<number>();
  const stack = [...roots];
  while (stack.length > 0) {
    const pid = stack.pop() as number;
    if (found.has(pid)) continue;
    found.add(pid);
    stack.push(...(children.get(pid) ?? []));
  }
  return procs.filter((p) => found.has(p.pid));
}

/** Unescapes a mountinfo path field (`\040` for space, ...). */
function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)));
}

/** Mount points at or under `dir` in a mountinfo text, deepest first. Pure. */
export function mountsUnder(mountinfo: string, dir: string): string[] {
  const points: string[] = [];
  for (const line of mountinfo.split('\n')) {
    const fields = line.split(' ');
    const mp = fields[4];
    if (mp === undefined) continue;
    const p = unescapeMountPath(mp);
    if (p === dir || p.startsWith(`${dir}/`)) points.push(p);
  }
  // Deepest first, and later mounts (stacked on the same point) first.
  return points.map((p, i) => ({ p, i })).sort((a, b) => (b.p.split('/').length - a.p.split('/').length) || (b.i - a.i)).map((x) => x.p);
}

export interface CleanupReport {
  dir: string;
  killed: number[];
  unmounted: string[];
  removed: boolean;
  leftovers: { processes: number[]; mounts: string[] };
}

/**
 * Kills every process of the stack in `dir` (descendants before the shims and containerd, SIGKILL:
 * the stack is being thrown away), unmounts everything under `dir` (deepest first; lazily when a
 * plain umount fails), deletes links the marker lists, and removes `dir`. Used by stop() after the
 * CRI teardown and by cleanupStaleStacks. Throws STACK_CLEANUP_FAILED listing what is left.
 */
export async function destroyStackDir(dir: string, opts: { logger?: Logger; signal?: AbortSignal } = {}): Promise<CleanupReport> {
  const log = opts.logger ?? silentLogger;
  const killed: number[] = [];
  // Learn, while they still run, what the stack's processes hold outside `dir`: the shims' sockets
  // in /run/containerd/s and the containers' cgroups. A killed shim removes neither.
  const initial = stackProcesses(await listProcesses(), dir);
  const shimSockets = await shimSocketPaths(initial.filter((p) => isShimOrContainerd(p)).map((p) => p.pid));
  const cgroups = await containerCgroups(initial.filter((p) => !isShimOrContainerd(p)).map((p) => p.pid));
  for (let round = 0; round < 10; round++) {
    const procs = stackProcesses(await listProcesses(), dir);
    if (procs.length === 0) break;
    for (const p of procs.reverse()) {
      try {
        process.kill(p.pid, 'SIGKILL');
        if (!killed.includes(p.pid)) killed.push(p.pid);
      } catch {
        // already gone
      }
    }
    await sleep(100 * (round + 1));
  }
  for (const sock of shimSockets) await rm(sock, { force: true });
  await removeCgroups(cgroups);
  const marker = await readMarker(dir);
  for (const link of marker?.links ?? []) {
    await runCommand('ip', ['link', 'del', link], { step: `ip link del ${link}`, allowFailure: true, timeoutMs: 10_000 }).catch(() => undefined);
  }
  const unmounted: string[] = [];
  for (let round = 0; round < 3; round++) {
    const mounts = mountsUnder(await readFile('/proc/self/mountinfo', 'utf8'), dir);
    if (mounts.length === 0) break;
    for (const mp of mounts) {
      const r = await runCommand('umount', [mp], { step: `umount ${mp}`, allowFailure: true, timeoutMs: 10_000 });
      if (r.exitCode !== 0) {
        // Last resort: detach it now; the kernel frees it when its last user goes.
        await runCommand('umount', ['-l', mp], { step: `umount -l ${mp}`, allowFailure: true, timeoutMs: 10_000 });
      }
      unmounted.push(mp);
    }
  }
  const leftMounts = mountsUnder(await readFile('/proc/self/mountinfo', 'utf8'), dir);
  const leftProcs = stackProcesses(await listProcesses(), dir).map((p) => p.pid);
  let removed = false;
  if (leftMounts.length === 0) {
    await rm(dir, { recursive: true, force: true, maxRetries: 3 });
    removed = true;
  }
  const report = { dir, killed, unmounted, removed, leftovers: { processes: leftProcs, mounts: leftMounts } };
  if (!removed || leftProcs.length > 0) {
    throw new StackError(StackErrorCode.CLEANUP_FAILED, `could not clean ${dir} completely`, { step: 'clean stack dir', evidence: report });
  }
  log.debug('stack dir cleaned', { dir, killed: killed.length, unmounted: unmounted.length });
  return report;
}

export async function readMarker(dir: string): Promise<StackMarker | undefined> {
  try {
    return JSON.parse(await readFile(path.join(dir, STACK_MARKER_FILE), 'utf8')) as StackMarker;
  } catch {
    return undefined;
  }
}

/** True when the process that wrote the marker is gone (dead, or its pid was reused by another process). */
export async function markerOwnerGone(marker: StackMarker): Promise<boolean> {
  const ticks = await processStartTicks(marker.ownerPid);
  return ticks === undefined || ticks !== marker.ownerStartTicks;
}

/**
 * Cleans every `/tmp/thaw-*` stack dir whose owner process is gone (a test run or demo that crashed
 * or was killed): its containerd, shims, containers, mounts and the dir itself. Stacks of live
 * processes (other test files running now) are left alone, as are dirs without a marker (not ours).
 * Tests and the demo call this before starting a stack. Returns the reports of cleaned dirs; a dir
 * that cannot be cleaned is logged and skipped.
 */
export async function cleanupStaleStacks(opts: { tmpDir?: string; logger?: Logger; signal?: AbortSignal } = {}): Promise<CleanupReport[]> {
  const log = opts.logger ?? silentLogger;
  const tmpDir = opts.tmpDir ?? os.tmpdir();
  const reports: CleanupReport[] = [];
  for (const name of await readdir(tmpDir)) {
    if (!name.startsWith(STACK_DIR_PREFIX)) continue;
    throwIfAborted(opts.signal, 'clean stale stacks');
    const dir = path.join(tmpDir, name);
    const marker = await readMarker(dir);
    if (!marker || !(await markerOwnerGone(marker))) continue;
    try {
      reports.push(await destroyStackDir(dir, opts));
      log.info('stale stack cleaned', { dir, flavor: marker.flavor, createdAt: marker.createdAt });
    } catch (err) {
      log.warn('stale stack not fully cleaned', { dir, err });
    }
  }
  return reports;
}


function isShimOrContainerd(p: ProcInfo): boolean {
  const exe = path.basename(p.cmdline[0] ?? '');
  return exe === 'containerd' || exe.startsWith('containerd-shim');
}

/** Paths of the unix sockets under /run/containerd/s that `pids` have open (their listening sockets). */
async function shimSocketPaths(pids: number[]): Promise<string[]> {
  const inodes = new Set<string>();
  for (const pid of pids) {
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      const m = /^socket:\[(\d+)\]$/.exec(target);
      if (m?.[1]) inodes.add(m[1]);
    }
  }
  return socketPathsByInode(await readFile('/proc/net/unix', 'utf8').catch(() => ''), inodes)
    .filter((p) => p.startsWith('/run/containerd/s/'));
}

/** Paths of the unix sockets in a /proc/net/unix text whose inode is in `inodes`. Pure. */
export function socketPathsByInode(netUnix: string, inodes: ReadonlySet<string>): string[] {
  const out = new Set<string>();
  for (const line of netUnix.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    const inode = f[6];
    const p = f[7];
    if (inode && p && p.startsWith('/') && inodes.has(inode)) out.add(p);
  }
  return [...out];
}

/** Cgroup paths (relative to each hierarchy's root) of `pids`, the root excluded. */
async function containerCgroups(pids: number[]): Promise<string[]> {
  const out = new Set<string>();
  for (const pid of pids) {
    const text = await readFile(`/proc/${pid}/cgroup`, 'utf8').catch(() => '');
    for (const line of text.split('\n')) {
      const rel = line.split(':').slice(2).join(':');
      if (rel && rel !== '/') out.add(rel);
    }
  }
  return [...out];
}

/** rmdir each cgroup path in every cgroup hierarchy mounted here (empty once its processes are dead). */
async function removeCgroups(rels: string[]): Promise<void> {
  if (rels.length === 0) return;
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  const roots = mountinfo.split('\n').filter((l) => / - cgroup2? /.test(l)).map((l) => l.split(' ')[4]).filter((p): p is string => !!p);
  for (let round = 0; round < 5; round++) {
    let busy = false;
    for (const root of roots) {
      for (const rel of rels) {
        try {
          await rmdir(path.join(root, rel));
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EBUSY') busy = true; // a dying process still in it
        }
      }
    }
    if (!busy) return;
    await sleep(100);
  }
}
