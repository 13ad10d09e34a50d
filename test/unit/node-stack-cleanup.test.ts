import { describe, expect, it } from 'vitest';
import { mountsUnder, parseProcStat, socketPathsByInode, stackProcesses, type ProcInfo } from '../../src/node-stack/cleanup.js';
import { parseCriLog } from '../../src/node-stack/cri-client.js';
import { programHeadersHaveInterp } from '../../src/elf.js';

describe('parseProcStat', () => {
  it('reads ppid and start time past a comm with spaces and parens', () => {
    const fields = ['S', '42', ...Array.from({ length: 17 }, (_, i) => String(i)), '987654'];
    expect(parseProcStat(`123 (weird) name) ${fields.join(' ')} 0 0`)).toEqual({ ppid: 42, startTicks: 987654 });
    expect(parseProcStat('garbage')).toBeUndefined();
  });
});

describe('stackProcesses', () => {
  const dir = '/tmp/thaw-AAA';
  const p = (pid: number, ppid: number, ...cmdline: string[]): ProcInfo => ({ pid, ppid, startTicks: 0, cmdline });
  const procs = [
    p(1, 0, '/sbin/init'),
    p(10, 1, '/opt/thaw/stack/1.7/bin/containerd', '--config', `${dir}/config.toml`),
    p(11, 1, '/opt/thaw/stack/1.7/usr/bin/containerd-shim-runc-v2', '-namespace', 'k8s.io', '-id', 'x', '-address', `${dir}/c.sock`),
    p(12, 11, '/bin/sh', '-c', 'pause'),
    p(13, 12, 'sleep', '1000'),
    p(20, 1, '/opt/thaw/stack/1.7/usr/bin/containerd-shim-runc-v2', '-namespace', 'k8s.io', '-id', 'y', '-address', '/tmp/thaw-BBB/c.sock'),
    p(21, 20, 'sleep', '1000'),
    p(30, 1, '/usr/bin/containerd', '--config', '/tmp/thaw-AAAB/config.toml'),
  ];
  it('finds containerd, the shims of this stack and their descendants, and nothing of other stacks', () => {
    expect(stackProcesses(procs, dir).map((x) => x.pid).sort((a, b) => a - b)).toEqual([10, 11, 12, 13]);
    expect(stackProcesses(procs, '/tmp/thaw-BBB').map((x) => x.pid)).toEqual([20, 21]);
  });
});

describe('mountsUnder', () => {
  const mountinfo = [
    '22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw',
    '300 22 0:50 / /tmp/thaw-AAA/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw shared:2 - overlay overlay rw',
    '301 22 0:51 / /tmp/thaw-AAA/state/io.containerd.grpc.v1.cri/sandboxes/abc/shm rw shared:3 - tmpfs shm rw',
    '302 300 0:52 / /tmp/thaw-AAA/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs/proc rw - proc proc rw',
    '303 22 0:53 / /tmp/thaw-AAAB/x rw - tmpfs tmpfs rw',
    '304 22 0:54 / /tmp/thaw-AAA/with\\040space rw - tmpfs tmpfs rw',
  ].join('\n');
  it('lists mounts under the dir only, deepest first, unescaping paths', () => {
    const got = mountsUnder(mountinfo, '/tmp/thaw-AAA');
    expect([...got].sort()).toEqual([
      '/tmp/thaw-AAA/state/io.containerd.grpc.v1.cri/sandboxes/abc/shm',
      '/tmp/thaw-AAA/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs',
      '/tmp/thaw-AAA/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs/proc',
      '/tmp/thaw-AAA/with space',
    ]);
    // A mount nested in another is unmounted first.
    expect(got.indexOf('/tmp/thaw-AAA/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs/proc'))
      .toBeLessThan(got.indexOf('/tmp/thaw-AAA/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs'));
  });
});

describe('socketPathsByInode', () => {
  it('maps socket inodes to their bound paths', () => {
    const text = 'Num       RefCount Protocol Flags    Type St Inode Path\n'
      + '0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/containerd/s/abc\n'
      + '0000000000000000: 00000002 00000000 00010000 0001 01 4343 /run/other\n'
      + '0000000000000000: 00000003 00000000 00000000 0001 03 4444\n';
    expect(socketPathsByInode(text, new Set(['4242', '4444']))).toEqual(['/run/containerd/s/abc']);
  });
});

describe('parseCriLog', () => {
  it('splits CRI log lines into time, stream, partial flag and text', () => {
    const text = '2026-01-01T00:00:00.1Z stdout F hello world\n2026-01-01T00:00:00.2Z stderr P part\n2026-01-01T00:00:00.3Z stdout F \n';
    expect(parseCriLog(text)).toEqual([
      { time: '2026-01-01T00:00:00.1Z', stream: 'stdout', partial: false, text: 'hello world' },
      { time: '2026-01-01T00:00:00.2Z', stream: 'stderr', partial: true, text: 'part' },
      { time: '2026-01-01T00:00:00.3Z', stream: 'stdout', partial: false, text: '' },
    ]);
  });
});

describe('ELF program headers', () => {
  it('finds PT_INTERP (3) by scanning entries of phentsize bytes', () => {
    const table = Buffer.alloc(56 * 3);
    table.writeUInt32LE(6, 0); // PT_PHDR
    table.writeUInt32LE(1, 56); // PT_LOAD
    expect(programHeadersHaveInterp(table, 56)).toBe(false);
    table.writeUInt32LE(3, 112);
    expect(programHeadersHaveInterp(table, 56)).toBe(true);
  });
});
