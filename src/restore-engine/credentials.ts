/**
 * A restored process never has more privilege than its target container's OCI spec grants (issue 12, item 4).
 *
 * CRIU gives every restored thread the credentials recorded in its core image (uid/gid sets, supplementary groups,
 * the five capability sets, no_new_privs, the seccomp mode with its filters, the LSM label). The checkpoint is
 * hostile input (a pod's process state, or a crafted image), and CRIU runs as root outside the target's
 * confinement, so it would set whatever the image says. Before CRIU runs, every thread's recorded credentials are
 * compared with what the target spec lets its own process reach; any excess → RESTORE_CREDENTIALS_EXCEED_SPEC, a
 * cold start.
 *
 * What "reach" means (capabilities(7), the kernel's execve rules, as runc applies the spec):
 * - capability ceiling C (effective and permitted): the spec's permitted ∪ ambient; for uid 0 also bounding ∪
 *   inheritable (execve as root fills permitted from bounding and inheritable). File capabilities of an image
 *   binary are not counted: a checkpoint of a process that gained them is refused (a cold start, never a wider
 *   grant).
 * - inheritable ⊆ the spec's inheritable, or its bounding set when C holds CAP_SETPCAP; bounding ⊆ the spec's
 *   bounding; ambient ⊆ C ∩ that inheritable ceiling (the kernel's own rule for raising ambient).
 * - uid, euid, suid, fsuid = the spec's uid unless C holds CAP_SETUID; likewise the gids and CAP_SETGID, and the
 *   supplementary groups ⊆ the spec's gid and additionalGids.
 * - spec noNewPrivileges → no_new_privs set in every thread.
 * - spec seccomp → every thread in seccomp filter or strict mode. The filters themselves are not compared with
 *   the spec's profile (a BPF program against a JSON profile): the restored filters are the source's.
 * - spec apparmorProfile P → the recorded label is P (or "P (enforce)"); spec selinuxLabel L → it is L. With
 *   neither, any recorded label passes (confinement only takes privilege away).
 *
 * Pure, apart from `readRecordedCredentials` (the images) and `readTargetSpec` (the bundle's config.json).
 */
import { readFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';

import { errorMessage, isThawError } from '../errors.js';
import { forEachLimit } from '../sys/concurrency.js';
import { CriuImageCodec, parseImageFile, type CoreCredentials } from './criu/images.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';

/** capabilities(7) numbers, as the OCI spec names them. */
export const CAPABILITY_NUMBERS: Readonly<Record<string, number>> = {
  CAP_CHOWN: 0, CAP_DAC_OVERRIDE: 1, CAP_DAC_READ_SEARCH: 2, CAP_FOWNER: 3, CAP_FSETID: 4, CAP_KILL: 5,
  CAP_SETGID: 6, CAP_SETUID: 7, CAP_SETPCAP: 8, CAP_LINUX_IMMUTABLE: 9, CAP_NET_BIND_SERVICE: 10,
  CAP_NET_BROADCAST: 11, CAP_NET_ADMIN: 12, CAP_NET_RAW: 13, CAP_IPC_LOCK: 14, CAP_IPC_OWNER: 15,
  CAP_SYS_MODULE: 16, CAP_SYS_RAWIO: 17, CAP_SYS_CHROOT: 18, CAP_SYS_PTRACE: 19, CAP_SYS_PACCT: 20,
  CAP_SYS_ADMIN: 21, CAP_SYS_BOOT: 22, CAP_SYS_NICE: 23, CAP_SYS_RESOURCE: 24, CAP_SYS_TIME: 25,
  CAP_SYS_TTY_CONFIG: 26, CAP_MKNOD: 27, CAP_LEASE: 28, CAP_AUDIT_WRITE: 29, CAP_AUDIT_CONTROL: 30,
  CAP_SETFCAP: 31, CAP_MAC_OVERRIDE: 32, CAP_MAC_ADMIN: 33, CAP_SYSLOG: 34, CAP_WAKE_ALARM: 35,
  CAP_BLOCK_SUSPEND: 36, CAP_AUDIT_READ: 37, CAP_PERFMON: 38, CAP_BPF: 39, CAP_CHECKPOINT_RESTORE: 40,
};
const CAP_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(CAPABILITY_NUMBERS).map(([n, v]) => [v, n]));
const bit = (name: string): bigint => 1n << BigInt(CAPABILITY_NUMBERS[name] as number);

const SECCOMP_DISABLED = 0;

/** The target's process credentials, from its OCI spec. Capability sets as bitmasks. */
export interface SpecCredentials {
  uid: number;
  gid: number;
  additionalGids: number[];
  caps: { effective: bigint; permitted: bigint; inheritable: bigint; bounding: bigint; ambient: bigint };
  noNewPrivileges: boolean;
  /** linux.seccomp is set. */
  seccomp: boolean;
  apparmorProfile?: string;
  selinuxLabel?: string;
}

/** One thread's recorded credentials. */
export interface ThreadCredentials extends CoreCredentials {
  tid: number;
}

function capMask(names: unknown): bigint {
  let m = 0n;
  // A name this table does not know grants nothing we could compare; it is not counted.
  if (Array.isArray(names)) for (const n of names) if (typeof n === 'string' && CAPABILITY_NUMBERS[n] !== undefined) m |= bit(n);
  return m;
}

/** The credentials part of an OCI config (config.json): process.user, process.capabilities, ... */
export function specCredentialsOf(config: unknown): SpecCredentials {
  const c = (config ?? {}) as Record<string, unknown>;
  const p = (c['process'] ?? {}) as Record<string, unknown>;
  const user = (p['user'] ?? {}) as Record<string, unknown>;
  const caps = (p['capabilities'] ?? {}) as Record<string, unknown>;
  const linux = (c['linux'] ?? {}) as Record<string, unknown>;
  const num = (v: unknown): number => (typeof v === 'number' && Number.isInteger(v) && v >= 0 ? v : 0);
  const out: SpecCredentials = {
    uid: num(user['uid']),
    gid: num(user['gid']),
    additionalGids: Array.isArray(user['additionalGids']) ? (user['additionalGids'] as unknown[]).map(num) : [],
    caps: {
      effective: capMask(caps['effective']),
      permitted: capMask(caps['permitted']),
      inheritable: capMask(caps['inheritable']),
      bounding: capMask(caps['bounding']),
      ambient: capMask(caps['ambient']),
    },
    noNewPrivileges: p['noNewPrivileges'] === true,
    seccomp: linux['seccomp'] !== undefined && linux['seccomp'] !== null,
  };
  if (typeof p['apparmorProfile'] === 'string' && p['apparmorProfile'] !== '') out.apparmorProfile = p['apparmorProfile'];
  if (typeof p['selinuxLabel'] === 'string' && p['selinuxLabel'] !== '') out.selinuxLabel = p['selinuxLabel'];
  return out;
}

/** A capability set of an image (32-bit words, lowest first) as a bitmask. */
export function wordsToMask(words: readonly number[]): bigint {
  let m = 0n;
  words.forEach((w, i) => {
    m |= BigInt(w >>> 0) << BigInt(32 * i);
  });
  return m;
}

function capNames(mask: bigint): string[] {
  const out: string[] = [];
  for (let i = 0; mask >> BigInt(i) !== 0n; i++) if ((mask >> BigInt(i)) & 1n) out.push(CAP_NAMES.get(i) ?? `CAP_${i}`);
  return out;
}

/**
 * Every way the recorded threads exceed the spec, one sentence each (empty: the restore may go on). A thread
 * without recorded credentials is an excess too: CRIU would leave them as its own (root, every capability).
 */
export function credentialExcesses(threads: readonly ThreadCredentials[], spec: SpecCredentials): string[] {
  const out: string[] = [];
  const ceiling = spec.caps.permitted | spec.caps.ambient | (spec.uid === 0 ? spec.caps.bounding | spec.caps.inheritable : 0n);
  const inhCeiling = spec.caps.inheritable | (ceiling & bit('CAP_SETPCAP') ? spec.caps.bounding : 0n);
  const canSetUid = (ceiling & bit('CAP_SETUID')) !== 0n;
  const canSetGid = (ceiling & bit('CAP_SETGID')) !== 0n;
  const groups = new Set([spec.gid, ...spec.additionalGids]);
  for (const t of threads) {
    const who = `thread ${t.tid}`;
    const c = t.creds;
    if (c === undefined) {
      out.push(`${who}: no recorded credentials`);
      continue;
    }
    const sets: Array<[string, number[], bigint]> = [
      ['effective', c.capEff, ceiling],
      ['permitted', c.capPrm, ceiling],
      ['inheritable', c.capInh, inhCeiling],
      ['bounding', c.capBnd, spec.caps.bounding],
      ['ambient', c.capAmb, ceiling & inhCeiling],
    ];
    for (const [name, words, allowed] of sets) {
      const extra = wordsToMask(words) & ~allowed;
      if (extra !== 0n) out.push(`${who}: ${name} capabilities beyond the spec: ${capNames(extra).join(',')}`);
    }
    if (!canSetUid) {
      const ids = { uid: c.uid, euid: c.euid, suid: c.suid, fsuid: c.fsuid };
      for (const [k, v] of Object.entries(ids)) if (v !== spec.uid) out.push(`${who}: ${k} ${v}, the spec runs as uid ${spec.uid} without CAP_SETUID`);
    }
    if (!canSetGid) {
      const ids = { gid: c.gid, egid: c.egid, sgid: c.sgid, fsgid: c.fsgid };
      for (const [k, v] of Object.entries(ids)) if (v !== spec.gid) out.push(`${who}: ${k} ${v}, the spec runs as gid ${spec.gid} without CAP_SETGID`);
      const foreign = c.groups.filter((g) => !groups.has(g));
      if (foreign.length > 0) out.push(`${who}: supplementary groups ${foreign.join(',')} beyond the spec's`);
    }
    if (spec.noNewPrivileges && !c.noNewPrivs) out.push(`${who}: no_new_privs is clear, the spec sets noNewPrivileges`);
    if (spec.seccomp && t.seccompMode === SECCOMP_DISABLED) out.push(`${who}: no seccomp filter, the spec has a seccomp profile`);
    const label = c.lsmProfile;
    if (spec.apparmorProfile !== undefined && label !== spec.apparmorProfile && label !== `${spec.apparmorProfile} (enforce)`) {
      out.push(`${who}: AppArmor label ${JSON.stringify(label ?? '')}, the spec sets ${JSON.stringify(spec.apparmorProfile)}`);
    }
    if (spec.selinuxLabel !== undefined && label !== spec.selinuxLabel) {
      out.push(`${who}: SELinux label ${JSON.stringify(label ?? '')}, the spec sets ${JSON.stringify(spec.selinuxLabel)}`);
    }
  }
  return out;
}

/** Throws RESTORE_CREDENTIALS_EXCEED_SPEC (evidence: every excess) when `credentialExcesses` finds any. */
export function assertCredentialsWithinSpec(threads: readonly ThreadCredentials[], spec: SpecCredentials): void {
  const excesses = credentialExcesses(threads, spec);
  if (excesses.length === 0) return;
  throw new RestoreError(RestoreErrorCode.CREDENTIALS_EXCEED_SPEC, `the checkpoint's credentials exceed the target's spec: ${excesses.slice(0, 4).join('; ')}${excesses.length > 4 ? `; and ${excesses.length - 4} more` : ''}`, {
    step: 'compare the checkpoint\'s credentials with the target\'s spec',
    evidence: { excesses, threads: threads.length },
  });
}

/** How many core-<tid>.img reads readRecordedCredentials keeps in flight. */
const CORE_READ_CONCURRENCY = 16;

/**
 * Every thread's recorded credentials, from pstree.img and core-<tid>.img of `imagesDir` (verified checkpoint
 * files, decoded, never executed). A missing or undecodable image throws RESTORE_CREDENTIALS_EXCEED_SPEC: what
 * cannot be read cannot be shown to stay within the spec.
 */
export async function readRecordedCredentials(imagesDir: string, codec: CriuImageCodec): Promise<ThreadCredentials[]> {
  const step = 'read the checkpoint\'s recorded credentials';
  try {
    const pstree = parseImageFile(await readFile(join(imagesDir, 'pstree.img')), 'pstree.img');
    const tids: number[] = [];
    for (const entry of pstree.entries) {
      const task = codec.decodePstree(entry);
      for (const tid of task.threads !== undefined && task.threads.length > 0 ? task.threads : [task.pid]) {
        if (!Number.isSafeInteger(tid) || tid <= 0) throw new Error(`pstree.img names thread ${tid}`);
        tids.push(tid);
      }
    }
    if (tids.length === 0) throw new Error('pstree.img lists no task');
    // A worker has dozens of threads; with the page cache cold, one read after another queues each behind the
    // checkpoint's prefetch, so they are read CORE_READ_CONCURRENCY at a time (in pstree order in the result).
    const out: ThreadCredentials[] = new Array<ThreadCredentials>(tids.length);
    await forEachLimit(tids, CORE_READ_CONCURRENCY, async (tid, i) => {
      const name = `core-${tid}.img`;
      const core = parseImageFile(await readFile(join(imagesDir, name)), name);
      if (core.entries.length !== 1) throw new Error(`${name} has ${core.entries.length} entries, not 1`);
      out[i] = { tid, ...codec.decodeCore(core.entries[0] as Buffer) };
    }, { step });
    return out;
  } catch (err) {
    throw new RestoreError(RestoreErrorCode.CREDENTIALS_EXCEED_SPEC, `cannot read the checkpoint's credentials: ${errorMessage(err)}`, {
      step,
      cause: err,
      evidence: { imagesDir, ...(isThawError(err) ? { code: err.code } : {}) },
    });
  }
}

/**
 * The target's OCI spec, from the bundle that holds its root filesystem: containerd's bundle dir is the parent of
 * `rootfs` (the host path host-mounts.ts found for the target's root) and holds config.json, whose root.path must
 * name that same directory. Throws RESTORE_TARGET_SPEC otherwise.
 */
export async function readTargetSpec(hostRoot: string): Promise<unknown> {
  const step = 'read the target container\'s OCI spec';
  const bundle = dirname(hostRoot);
  const path = join(bundle, 'config.json');
  let config: unknown;
  try {
    config = JSON.parse(await readFile(path, 'utf8'));
  } catch (err) {
    throw new RestoreError(RestoreErrorCode.TARGET_SPEC, `cannot read ${path}: ${errorMessage(err)}`, { step, cause: err, evidence: { path } });
  }
  const rootPath = ((config as Record<string, unknown> | null)?.['root'] as Record<string, unknown> | undefined)?.['path'];
  if (typeof rootPath !== 'string' || resolve(bundle, rootPath) !== hostRoot) {
    throw new RestoreError(RestoreErrorCode.TARGET_SPEC, `${path} is not the spec of the container rooted at ${hostRoot}`, { step, evidence: { path, rootPath } });
  }
  return config;
}
