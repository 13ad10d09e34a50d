import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { parseMountInfo } from '../../src/restore-engine/container-inspect.js';
import { hostPathOf, planHostRestorePaths, type MountTables } from '../../src/restore-engine/host-mounts.js';

// What a runc container on containerd and the host it runs on show (trimmed from the real stack's mountinfo).
const TARGET = parseMountInfo(`\
900 800 0:64 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
901 900 0:66 / /dev rw,nosuid - tmpfs tmpfs rw,mode=755
902 900 254:0 /tmp/ctl/abc /snapshot-control rw,relatime - ext4 /dev/vda rw
903 901 0:55 / /dev/shm rw,nosuid - tmpfs shm rw,size=65536k
904 900 0:69 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs rw,mode=755
905 904 0:29 /k8s.io/abc /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu
906 900 254:0 /tmp/gone/hosts//deleted /etc/hosts rw - ext4 /dev/vda rw
`);
const HOST = parseMountInfo(`\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 27 0:55 / /state/sandboxes/s1/shm rw - tmpfs shm rw
41 27 0:64 / /state/task/abc/rootfs rw - overlay overlay rw
42 27 254:0 /tmp/ctl /ctl-bind rw - ext4 /dev/vda rw
`);
const tables: MountTables = { target: TARGET, host: HOST };

describe('hostPathOf', () => {
  it('finds the rootfs overlay, a bind of a host directory, a sandbox tmpfs and a cgroup controller dir', () => {
    expect(hostPathOf(tables, '/')).toBe('/state/task/abc/rootfs');
    // The deepest host root that holds the target's root wins: /ctl-bind shows /tmp/ctl.
    expect(hostPathOf(tables, '/snapshot-control')).toBe('/ctl-bind/abc');
    expect(hostPathOf(tables, '/dev/shm')).toBe('/state/sandboxes/s1/shm');
    expect(hostPathOf(tables, '/sys/fs/cgroup/cpu')).toBe('/sys/fs/cgroup/cpu/k8s.io/abc');
  });

  it('has no answer for a mount only the target has, a deleted root, or a mountpoint the target lacks', () => {
    expect(hostPathOf(tables, '/sys/fs/cgroup')).toBeUndefined();
    expect(hostPathOf(tables, '/etc/hosts')).toBeUndefined();
    expect(hostPathOf(tables, '/etc/resolv.conf')).toBeUndefined();
  });

  it('a host mount whose root merely shares a prefix string is not a match', () => {
    const t = parseMountInfo('1 0 254:0 /tmp/ctlx/a /x rw - ext4 /dev/vda rw\n');
    const h = parseMountInfo('2 0 254:0 /tmp/ctl /ctl-bind rw - ext4 /dev/vda rw\n');
    expect(hostPathOf({ target: t, host: h }, '/x')).toBeUndefined();
  });
});

describe('planHostRestorePaths', () => {
  let dir: string | undefined;
  afterEach(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('maps every external mount to a host path or a fresh stand-in; never a path below the target root', () => {
    dir = mkdtempSync(join(tmpdir(), 'thaw-host-mounts-'));
    const standIns = join(dir, 'stand-ins');
    const plan = planHostRestorePaths(
      tables,
      [
        { key: '/snapshot-control', path: '/snapshot-control' },
        { key: '/sys/fs/cgroup', path: '/sys/fs/cgroup' },
        { key: '/sys/fs/cgroup/cpu', path: '/sys/fs/cgroup/cpu' },
        { key: '/etc/hosts', path: '/etc/hosts' },
      ],
      standIns,
      (p) => (p === '/etc/hosts' ? 'file' : 'dir'),
    );
    expect(plan.root).toBe('/state/task/abc/rootfs');
    expect(plan.externalMounts).toEqual([
      { key: '/snapshot-control', mountpoint: '/ctl-bind/abc', standIn: false },
      { key: '/sys/fs/cgroup', mountpoint: join(standIns, '1'), standIn: true },
      { key: '/sys/fs/cgroup/cpu', mountpoint: '/sys/fs/cgroup/cpu/k8s.io/abc', standIn: false },
      { key: '/etc/hosts', mountpoint: join(standIns, '3'), standIn: true },
    ]);
    // The cgroup stand-in holds the mountpoint of the controller CRIU binds over it; the file stand-in is empty.
    expect(readdirSync(join(standIns, '1'))).toEqual(['cpu']);
    expect(statSync(join(standIns, '3')).isFile()).toBe(true);
    expect(statSync(join(standIns, '3')).size).toBe(0);
  });

  it('a root with no host path is RESTORE_TARGET_MOUNTS, before any stand-in is made', () => {
    const base = mkdtempSync(join(tmpdir(), 'thaw-host-mounts-'));
    dir = base;
    const host = HOST.filter((m) => m.device !== '0:64');
    expect(() => planHostRestorePaths({ target: TARGET, host }, [{ key: '/sys/fs/cgroup', path: '/sys/fs/cgroup' }], join(base, 's'), () => 'dir')).toThrow(
      expect.objectContaining({ code: 'RESTORE_TARGET_MOUNTS' }),
    );
    expect(existsSync(join(base, 's'))).toBe(false);
  });
});
