/**
 * Putting a restored tree into the target container's cgroups. With manage-cgroups=ignore CRIU leaves the
 * tree where its own process is, which was the root cgroup in restore-recipe.md ("Not solved"). thaw moves
 * the restorer itself (the shell that execs nsenter, then CRIU) into every cgroup of the target's PID 1
 * before CRIU starts, so every restored process inherits them by fork; then it checks the result in
 * /proc/<restored pid>/cgroup. Works for cgroup v1 hierarchies, cgroup v2, and hybrids of both.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';

export interface ProcCgroupLine {
  hierarchyId: number;
  /** v1 controllers (and `name=...`), empty for the v2 line. */
  controllers: string[];
  path: string;
}

export interface CgroupMount {
  mountpoint: string;
  /** The mount's root inside its hierarchy (usually '/'). */
  root: string;
  version: 1 | 2;
  /** v1: the controllers from the super options (and `name=...`). */
  controllers: string[];
}

/** Parses /proc/<pid>/cgroup ("id:controllers:path" per line). Pure. */
export function parseProcCgroup(text: string): ProcCgroupLine[] {
  const out: ProcCgroupLine[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const first = line.indexOf(':');
    const second = line.indexOf(':', first + 1);
    if (first < 0 || second < 0) continue;
    out.push({
      hierarchyId: Number(line.slice(0, first)),
      controllers: line.slice(first + 1, second).split(',').filter((c) => c !== ''),
      path: line.slice(second + 1),
    });
  }
  return out;
}

/** The cgroup and cgroup2 mounts of a mountinfo text. Pure. */
export function parseCgroupMounts(mountinfo: string): CgroupMount[] {
  const out: CgroupMount[] = [];
  for (const line of mountinfo.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const [fstype, , superOptions = ''] = line.slice(sep + 3).split(' ');
    if (fstype !== 'cgroup' && fstype !== 'cgroup2') continue;
    const unescape = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    out.push({
      root: unescape(left[3] ?? '/'),
      mountpoint: unescape(left[4] ?? ''),
      version: fstype === 'cgroup2' ? 2 : 1,
      controllers: fstype === 'cgroup2' ? [] : superOptions.split(',').filter((o) => !['rw', 'ro'].includes(o) && !o.includes('=') || o.startsWith('name=')),
    });
  }
  return out;
}

/** Super options list controllers among flags (xattr, clone_children, ...): a subset test ignores the flags. */
const within = (want: readonly string[], have: readonly string[]): boolean => want.length > 0 && want.every((x) => have.includes(x));

/**
 * The cgroup.procs files (host paths) of every cgroup `lines` names, found through `mounts`. A hierarchy
 * with no mount here is an error: the tree would silently stay outside it.
 */
export function cgroupProcsFiles(lines: readonly ProcCgroupLine[], mounts: readonly CgroupMount[]): string[] {
  const step = 'find the target container cgroups';
  const files: string[] = [];
  for (const line of lines) {
    const isV2 = line.hierarchyId === 0 && line.controllers.length === 0;
    const mount = mounts.find((m) => (isV2 ? m.version === 2 : m.version === 1 && within(line.controllers, m.controllers)));
    if (mount === undefined) {
      throw new RestoreError(RestoreErrorCode.CGROUP, `no mount of the cgroup hierarchy ${line.hierarchyId}:${line.controllers.join(',')}`, {
        step,
        evidence: { line, mounts },
      });
    }
    let rel = line.path;
    if (mount.root !== '/' && rel.startsWith(mount.root)) rel = rel.slice(mount.root.length);
    files.push(join(mount.mountpoint, rel, 'cgroup.procs'));
  }
  return [...new Set(files)];
}

/** The cgroup.procs files of the target's PID 1, read from /proc and our own mountinfo. */
export async function targetCgroupProcsFiles(targetPid: number, procRoot = '/proc'): Promise<string[]> {
  const lines = parseProcCgroup(await readFile(join(procRoot, String(targetPid), 'cgroup'), 'utf8'));
  const mounts = parseCgroupMounts(await readFile(join(procRoot, 'self', 'mountinfo'), 'utf8'));
  return cgroupProcsFiles(lines, mounts);
}

/**
 * An argv prefix that writes its own pid into each cgroup.procs file and then execs the rest (the nsenter
 * wrapper and CRIU). Any write that fails stops it before CRIU runs (exit 125, the message on stderr).
 */
export function cgroupJoinWrapper(procsFiles: readonly string[], shPath = '/bin/sh'): string[] {
  const script = 'while [ "$1" != "--" ]; do echo $$ > "$1" || { echo "thaw: cannot join cgroup $1" >&2; exit 125; }; shift; done; shift; exec "$@"';
  return [shPath, '-c', script, 'thaw-cgroup-join', ...procsFiles, '--'];
}

/** True when `pid` is in the same cgroups as `targetPid` (compares the /proc/<pid>/cgroup texts). */
export async function sameCgroups(pid: number, targetPid: number, procRoot = '/proc'): Promise<{ same: boolean; restored: string; target: string }> {
  const [restored, target] = await Promise.all([
    readFile(join(procRoot, String(pid), 'cgroup'), 'utf8'),
    readFile(join(procRoot, String(targetPid), 'cgroup'), 'utf8'),
  ]);
  return { same: restored === target, restored, target };
}
