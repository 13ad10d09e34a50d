import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import {
  CAPABILITY_NUMBERS,
  credentialExcesses,
  readRecordedCredentials,
  readTargetSpec,
  specCredentialsOf,
  wordsToMask,
  type ThreadCredentials,
} from '../../src/restore-engine/credentials.js';
import { CriuImageCodec, encodeImageFile, type RecordedCreds } from '../../src/restore-engine/criu/images.js';

// containerd's default capability list for a CRI container (what a root pod gets).
const DEFAULT_CAPS = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW', 'CAP_SETGID', 'CAP_SETUID',
  'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE', 'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE',
];
const words = (names: readonly string[]): number[] => {
  const w = [0, 0];
  for (const n of names) {
    const b = CAPABILITY_NUMBERS[n] as number;
    w[b >> 5] = ((w[b >> 5] as number) | (1 << (b & 31))) >>> 0;
  }
  return w;
};
const ALL_CAPS = Object.keys(CAPABILITY_NUMBERS);

function creds(over: Partial<RecordedCreds> = {}): RecordedCreds {
  const caps = words(DEFAULT_CAPS);
  return {
    uid: 0, gid: 0, euid: 0, egid: 0, suid: 0, sgid: 0, fsuid: 0, fsgid: 0,
    capInh: [0, 0], capPrm: caps, capEff: caps, capBnd: caps, capAmb: [0, 0],
    secbits: 0, groups: [], noNewPrivs: false, lsmProfile: 'cri-containerd.apparmor.d (enforce)', ...over,
  };
}
const thread = (over: Partial<RecordedCreds> = {}, seccompMode = 2, tid = 1): ThreadCredentials => ({ tid, seccompMode, creds: creds(over) });

const rootSpec = specCredentialsOf({
  root: { path: 'rootfs' },
  process: {
    user: { uid: 0, gid: 0 },
    capabilities: { bounding: DEFAULT_CAPS, effective: DEFAULT_CAPS, permitted: DEFAULT_CAPS },
    apparmorProfile: 'cri-containerd.apparmor.d',
  },
  linux: { seccomp: { defaultAction: 'SCMP_ACT_ERRNO' } },
});
/** A restricted pod: non-root, no capabilities, no new privileges. */
const restrictedSpec = specCredentialsOf({
  process: { user: { uid: 1000, gid: 1000, additionalGids: [2000] }, capabilities: {}, noNewPrivileges: true },
  linux: { seccomp: { defaultAction: 'SCMP_ACT_ERRNO' } },
});

describe('credentialExcesses', () => {
  it('a root worker with the default capabilities and a seccomp filter fits a default root pod', () => {
    expect(credentialExcesses([thread({ lsmProfile: 'cri-containerd.apparmor.d (enforce)' })], rootSpec)).toEqual([]);
  });

  it('a root process with every capability exceeds a non-root pod with none: ids, capabilities, no_new_privs', () => {
    const all = words(ALL_CAPS);
    const out = credentialExcesses([thread({ capEff: all, capPrm: all, capBnd: all })], restrictedSpec);
    expect(out).toContain('thread 1: uid 0, the spec runs as uid 1000 without CAP_SETUID');
    expect(out).toContain('thread 1: gid 0, the spec runs as gid 1000 without CAP_SETGID');
    expect(out.find((l) => l.startsWith('thread 1: effective capabilities beyond the spec: CAP_CHOWN,'))).toContain('CAP_SYS_ADMIN');
    expect(out.some((l) => l.startsWith('thread 1: bounding capabilities beyond the spec:'))).toBe(true);
    expect(out).toContain('thread 1: no_new_privs is clear, the spec sets noNewPrivileges');
  });

  it('the restricted pod\'s own kind of process fits it; one more group or one capability does not', () => {
    const ok = { uid: 1000, euid: 1000, suid: 1000, fsuid: 1000, gid: 1000, egid: 1000, sgid: 1000, fsgid: 1000, groups: [1000, 2000], capEff: [0, 0], capPrm: [0, 0], capBnd: [0, 0], noNewPrivs: true };
    expect(credentialExcesses([thread(ok)], restrictedSpec)).toEqual([]);
    expect(credentialExcesses([thread({ ...ok, groups: [1000, 0] })], restrictedSpec)).toEqual(['thread 1: supplementary groups 0 beyond the spec\'s']);
    expect(credentialExcesses([thread({ ...ok, capAmb: words(['CAP_NET_RAW']) })], restrictedSpec)).toEqual(['thread 1: ambient capabilities beyond the spec: CAP_NET_RAW']);
    expect(credentialExcesses([thread({ ...ok, suid: 0 })], restrictedSpec)).toEqual(['thread 1: suid 0, the spec runs as uid 1000 without CAP_SETUID']);
  });

  it('a capability above bit 31 counts (the second word)', () => {
    const out = credentialExcesses([thread({ capEff: words([...DEFAULT_CAPS, 'CAP_BPF']) })], rootSpec);
    expect(out).toEqual(['thread 1: effective capabilities beyond the spec: CAP_BPF']);
  });

  it('every thread is checked, and a thread without credentials is an excess', () => {
    const out = credentialExcesses([thread({}, 2, 1), { tid: 7, seccompMode: 2 }], rootSpec);
    expect(out).toEqual(['thread 7: no recorded credentials']);
  });

  it('a spec seccomp profile needs a filter in every thread; a spec LSM label needs that label', () => {
    expect(credentialExcesses([thread({}, 0)], rootSpec)).toEqual(['thread 1: no seccomp filter, the spec has a seccomp profile']);
    expect(credentialExcesses([thread({ lsmProfile: 'unconfined' })], rootSpec)).toEqual([
      'thread 1: AppArmor label "unconfined", the spec sets "cri-containerd.apparmor.d"',
    ]);
    const selinux = specCredentialsOf({ process: { user: { uid: 0, gid: 0 }, capabilities: { bounding: DEFAULT_CAPS, permitted: DEFAULT_CAPS }, selinuxLabel: 'system_u:system_r:container_t:s0:c1,c2' } });
    expect(credentialExcesses([thread({ lsmProfile: 'system_u:system_r:spc_t:s0' })], selinux)).toEqual([
      'thread 1: SELinux label "system_u:system_r:spc_t:s0", the spec sets "system_u:system_r:container_t:s0:c1,c2"',
    ]);
  });

  it('a root spec without CAP_SETUID still holds every recorded id to 0', () => {
    const spec = specCredentialsOf({ process: { user: { uid: 0, gid: 0 }, capabilities: { bounding: ['CAP_CHOWN'], permitted: ['CAP_CHOWN'], effective: ['CAP_CHOWN'] } } });
    expect(credentialExcesses([thread({ uid: 5, capEff: words(['CAP_CHOWN']), capPrm: words(['CAP_CHOWN']), capBnd: words(['CAP_CHOWN']) })], spec)).toEqual([
      'thread 1: uid 5, the spec runs as uid 0 without CAP_SETUID',
    ]);
  });
});

describe('wordsToMask', () => {
  it('puts word i at bits 32i..32i+31', () => {
    expect(wordsToMask([0xffffffff, 0x1ff])).toBe((1n << 41n) - 1n);
    expect(wordsToMask([])).toBe(0n);
  });
});

describe('reading the images and the spec', () => {
  let dir: string | undefined;
  afterEach(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });
  const header = Buffer.from([0x54, 0x50, 0x48, 0x00, 0x12, 0x34, 0x56, 0x78]);

  it('reads each thread\'s core image named by pstree.img, and refuses a missing one', async () => {
    const base = mkdtempSync(join(tmpdir(), 'thaw-creds-'));
    dir = base;
    const codec = CriuImageCodec.load();
    writeFileSync(join(base, 'pstree.img'), encodeImageFile({ header, entries: [codec.encodePstree({ pid: 1, ppid: 0, threads: [1, 4] })] }));
    writeFileSync(join(base, 'core-1.img'), encodeImageFile({ header, entries: [codec.encodeCore({ seccompMode: 2, creds: creds({ uid: 1000, lsmProfile: 'p' }) })] }));
    await expect(readRecordedCredentials(base, codec)).rejects.toMatchObject({ code: 'RESTORE_CREDENTIALS_EXCEED_SPEC' });
    writeFileSync(join(base, 'core-4.img'), encodeImageFile({ header, entries: [codec.encodeCore({ seccompMode: 0, creds: { ...creds({ capEff: words(ALL_CAPS) }), lsmProfile: undefined } as RecordedCreds })] }));
    const threads = await readRecordedCredentials(base, codec);
    expect(threads.map((t) => [t.tid, t.seccompMode, t.creds?.uid, t.creds?.lsmProfile])).toEqual([[1, 2, 1000, 'p'], [4, 0, 0, undefined]]);
    expect(wordsToMask(threads[1]?.creds?.capEff ?? [])).toBe((1n << 41n) - 1n);
  });

  it('reads many threads of several tasks in pstree order, and one undecodable core image among them refuses all', async () => {
    const base = mkdtempSync(join(tmpdir(), 'thaw-creds-'));
    dir = base;
    const codec = CriuImageCodec.load();
    const first = Array.from({ length: 40 }, (_, i) => 100 + i);
    const second = Array.from({ length: 25 }, (_, i) => 300 - i); // descending: the result follows pstree, not the tid
    writeFileSync(join(base, 'pstree.img'), encodeImageFile({
      header,
      entries: [codec.encodePstree({ pid: 100, ppid: 0, threads: first }), codec.encodePstree({ pid: 300, ppid: 100, threads: second })],
    }));
    for (const tid of [...first, ...second]) {
      writeFileSync(join(base, `core-${tid}.img`), encodeImageFile({ header, entries: [codec.encodeCore({ seccompMode: 2, creds: creds({ uid: tid }) })] }));
    }
    const threads = await readRecordedCredentials(base, codec);
    expect(threads.map((t) => t.tid)).toEqual([...first, ...second]);
    expect(threads.map((t) => t.creds?.uid)).toEqual([...first, ...second]);
    writeFileSync(join(base, 'core-290.img'), Buffer.from('not an image'));
    await expect(readRecordedCredentials(base, codec)).rejects.toMatchObject({ code: 'RESTORE_CREDENTIALS_EXCEED_SPEC', message: expect.stringContaining('core-290.img') });
  });

  it('takes config.json beside the rootfs only when its root.path names that rootfs', async () => {
    const base = mkdtempSync(join(tmpdir(), 'thaw-creds-'));
    dir = base;
    writeFileSync(join(base, 'config.json'), JSON.stringify({ root: { path: 'rootfs' }, process: { user: { uid: 7, gid: 7 } } }));
    expect(specCredentialsOf(await readTargetSpec(join(base, 'rootfs'))).uid).toBe(7);
    await expect(readTargetSpec(join(base, 'other'))).rejects.toMatchObject({ code: 'RESTORE_TARGET_SPEC' });
  });
});
