import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

import {
  buildCheckpointDumpOptions,
  DEFAULT_CHECKPOINT_CRIU_SETTINGS,
  NETNS_EXTERNAL_KEY,
  recordedCriuOptions,
} from '../../src/restore-engine/checkpoint.js';
import {
  envKeysOf,
  inspectContainer,
  InspectErrorCode,
  parseMountInfo,
  parseMountInfoLine,
  parseNamespaceLink,
  parseStatusKb,
  planExternalMounts,
  splitNulList,
} from '../../src/restore-engine/container-inspect.js';

// A container of a host-network CRI pod on containerd 1.7 + runc 1.1 (cgroup v1), as its init sees it,
// plus a GPU node's nested driver mount and a masked /proc path.
const MOUNTINFO = [
  '1489 1300 0:120 / / rw,relatime master:613 - overlay overlay rw,lowerdir=/var/lib/l1:/var/lib/l2,upperdir=/var/lib/u,workdir=/var/lib/w',
  '1490 1489 0:125 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw',
  '1491 1489 0:126 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755',
  '1492 1491 0:127 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666',
  '1493 1491 0:119 / /dev/mqueue rw,nosuid,nodev,noexec,relatime - mqueue mqueue rw',
  '1494 1489 0:128 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro',
  '1495 1494 0:129 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755',
  '1496 1495 0:30 /kubepods/pod1/abc /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime master:14 - cgroup cgroup rw,memory',
  '1497 1489 254:1 /tmp/thaw-ctl/abc /snapshot-control rw,relatime - ext4 /dev/vda1 rw',
  '1498 1491 0:118 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k',
  '1499 1489 254:1 /var/lib/sandboxes/x/hosts /etc/hosts rw,relatime - ext4 /dev/vda1 rw',
  '1500 1489 254:1 /usr /usr ro,relatime - ext4 /dev/vda1 ro',
  '1501 1500 254:16 / /usr/local/nvidia ro,relatime - ext4 /dev/vdb ro',
  '1502 1490 0:6 /null /proc/kcore rw,nosuid - devtmpfs udev rw,size=10k',
  '1503 1489 254:1 /data/my\\040dir /mnt/with\\040space rw - ext4 /dev/vda1 rw',
  '1504 1489 254:1 /other /etc/hosts rw - ext4 /dev/vda1 rw',
].join('\n');

describe('mountinfo parsing', () => {
  it('parses every field of a line, optional fields and escapes included', () => {
    expect(parseMountInfoLine(MOUNTINFO.split('\n')[7]!)).toEqual({
      mountId: 1496,
      parentId: 1495,
      device: '0:30',
      root: '/kubepods/pod1/abc',
      mountPoint: '/sys/fs/cgroup/memory',
      mountOptions: 'ro,nosuid,nodev,noexec,relatime',
      optionalFields: ['master:14'],
      fsType: 'cgroup',
      source: 'cgroup',
      superOptions: 'rw,memory',
    });
    const spaced = parseMountInfoLine(MOUNTINFO.split('\n')[14]!);
    expect(spaced.mountPoint).toBe('/mnt/with space');
    expect(spaced.root).toBe('/data/my dir');
    expect(spaced.optionalFields).toEqual([]);
  });

  it('refuses lines that are not mountinfo', () => {
    for (const bad of ['', 'garbage', '1 2 3:4 / /x rw shared:1 overlay overlay rw', 'a b 0:1 / / rw - ext4 /dev/x rw', '1 2 x / / rw - ext4 /dev/x rw']) {
      expect(() => parseMountInfoLine(bad)).toThrow(expect.objectContaining({ code: InspectErrorCode.MOUNTINFO_INVALID }));
    }
  });

  it('parses a whole file, skipping blank lines, in order', () => {
    const mounts = parseMountInfo(`${MOUNTINFO}\n\n`);
    expect(mounts).toHaveLength(16);
    expect(mounts[0]!.mountPoint).toBe('/');
    expect(mounts[0]!.fsType).toBe('overlay');
  });
});

describe('the external-mount plan', () => {
  const plan = planExternalMounts(parseMountInfo(MOUNTINFO));
  const points = plan.map((m) => m.mountpoint);

  it('marks every mount but /, /proc, /dev, /dev/pts, /dev/mqueue and /sys, keyed by its mountpoint', () => {
    expect(points).toEqual([
      '/sys/fs/cgroup',
      '/sys/fs/cgroup/memory',
      '/snapshot-control',
      '/dev/shm',
      '/etc/hosts',
      '/usr',
      '/usr/local/nvidia', // nested with root "/": CRIU refuses it unless external (restore-recipe.md)
      '/proc/kcore',
      '/mnt/with space',
    ]);
    for (const m of plan) expect(m.key).toBe(m.mountpoint);
  });

  it('lists a mountpoint mounted over twice once', () => {
    expect(points.filter((p) => p === '/etc/hosts')).toHaveLength(1);
  });

  it('is empty for a container with only what CRIU owns', () => {
    expect(planExternalMounts(parseMountInfo(MOUNTINFO.split('\n').slice(0, 7).filter((l) => !l.includes('/sys/fs/cgroup')).join('\n')))).toEqual([]);
  });
});

describe('small /proc parsers', () => {
  it('reads namespace links', () => {
    expect(parseNamespaceLink('net:[4026531840]')).toBe(4026531840);
    expect(parseNamespaceLink('pid_for_children:[4026532001]')).toBe(4026532001);
    expect(parseNamespaceLink('/dev/null')).toBeUndefined();
    expect(parseNamespaceLink('net:[]')).toBeUndefined();
  });

  it('reads kB fields of status', () => {
    const status = 'Name:\tnode\nVmPeak:\t  999 kB\nVmRSS:\t  328512 kB\nRssAnon:\t  1 kB\n';
    expect(parseStatusKb(status, 'VmRSS')).toBe(328512);
    expect(parseStatusKb(status, 'VmSwap')).toBeUndefined();
    expect(parseStatusKb('Name:\tkthreadd\n', 'VmRSS')).toBeUndefined();
  });

  it('splits cmdline and keeps only env names, never values', () => {
    expect(splitNulList('/usr/bin/node\0/app/w.js\0')).toEqual(['/usr/bin/node', '/app/w.js']);
    expect(splitNulList('')).toEqual([]);
    expect(envKeysOf(['PATH=/bin', 'TOKEN=s3cr=t', 'PATH=/usr/bin', 'NOEQUALS', '=weird', 'EMPTY='])).toEqual(['EMPTY', 'PATH', 'TOKEN']);
  });
});

describe('inspectContainer over a fake /proc', () => {
  const root = mkdtempSync(join(tmpdir(), 'thaw-fake-proc-'));
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  function fakeProcess(pid: number, opts: { children?: number[]; rssKb?: number; net?: string }): void {
    const dir = join(root, String(pid));
    mkdirSync(join(dir, 'fd'), { recursive: true });
    mkdirSync(join(dir, 'ns'), { recursive: true });
    mkdirSync(join(dir, 'task', String(pid)), { recursive: true });
    writeFileSync(join(dir, 'mountinfo'), MOUNTINFO);
    writeFileSync(join(dir, 'cmdline'), '/usr/bin/node\0/app/w.js\0');
    writeFileSync(join(dir, 'environ'), 'B=1\0A=secret\0');
    writeFileSync(join(dir, 'status'), `Name:\tx\nVmRSS:\t${opts.rssKb ?? 0} kB\n`);
    writeFileSync(join(dir, 'task', String(pid), 'children'), (opts.children ?? []).join(' '));
    symlinkSync('/dev/null', join(dir, 'fd', '0'));
    symlinkSync('pipe:[111]', join(dir, 'fd', '1'));
    symlinkSync(opts.net ?? 'net:[4026532100]', join(dir, 'ns', 'net'));
  }
  fakeProcess(100, { children: [101], rssKb: 1000 });
  fakeProcess(101, { rssKb: 24 });
  mkdirSync(join(root, 'self', 'ns'), { recursive: true });
  symlinkSync('net:[4026531840]', join(root, 'self', 'ns', 'net'));

  it('reads mounts, the plan, stdio (a closed fd as ""), netns, the tree and its RSS', async () => {
    const got = await inspectContainer(100, { procRoot: root });
    expect(got.pids).toEqual([100, 101]);
    expect(got.rssBytes).toBe(1024 * 1024);
    expect(got.stdioFds).toEqual(['/dev/null', 'pipe:[111]', '']);
    expect(got.netns).toEqual({ inode: 4026532100, isHost: false });
    expect(got.cmdline).toEqual(['/usr/bin/node', '/app/w.js']);
    expect(got.envKeys).toEqual(['A', 'B']);
    expect(got.externalMounts).toHaveLength(9);
  });

  it('sees a host-network container (same netns as ours)', async () => {
    const got = await inspectContainer(100, { procRoot: root, hostNetNsPath: join(root, '100', 'ns', 'net') });
    expect(got.netns.isHost).toBe(true);
  });

  it('a gone process is CHECKPOINT_INSPECT_PROC_UNREADABLE', async () => {
    await expect(inspectContainer(999, { procRoot: root })).rejects.toMatchObject({ code: InspectErrorCode.PROC_UNREADABLE, evidence: { pid: 999, errno: 'ENOENT' } });
  });
});

describe('the dump request and what the manifest records', () => {
  const inspection = { pid: 42, externalMounts: [{ mountpoint: '/etc/hosts', key: '/etc/hosts' }], netns: { inode: 77, isHost: false } };

  it('always leaves the worker running and marks the pod netns external', () => {
    const dump = buildCheckpointDumpOptions(inspection, { imagesDir: '/s/criu', workDir: '/w' }, DEFAULT_CHECKPOINT_CRIU_SETTINGS);
    expect(dump).toMatchObject({
      pid: 42,
      imagesDir: '/s/criu',
      workDir: '/w',
      leaveRunning: true,
      tcpEstablished: false,
      fileLocks: true,
      manageCgroupsMode: 'soft',
      externalMounts: [{ mountpoint: '/etc/hosts', key: '/etc/hosts' }],
      externalNetNs: { inode: 77, key: NETNS_EXTERNAL_KEY },
    });
  });

  it('leaves the host netns alone', () => {
    const dump = buildCheckpointDumpOptions({ ...inspection, netns: { inode: 1, isHost: true } }, { imagesDir: '/i', workDir: '/w' }, DEFAULT_CHECKPOINT_CRIU_SETTINGS);
    expect(dump.externalNetNs).toBeUndefined();
  });

  it('records the options the restore must match, as scalars', () => {
    const rec = recordedCriuOptions(DEFAULT_CHECKPOINT_CRIU_SETTINGS, true);
    expect(rec).toEqual({
      leaveRunning: true,
      tcpEstablished: false,
      fileLocks: true,
      extUnixSk: true,
      shellJob: false,
      linkRemap: true,
      ghostLimitBytes: 512 * 1024 * 1024,
      manageCgroupsMode: 'soft',
      externalNetNs: true,
    });
    for (const v of Object.values(rec)) expect(['string', 'number', 'boolean']).toContain(typeof v);
  });
});
