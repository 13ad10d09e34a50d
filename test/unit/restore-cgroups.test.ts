import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cgroupJoinWrapper, cgroupProcsFiles, parseCgroupMounts, parseProcCgroup } from '../../src/restore-engine/restore-cgroups.js';

// This machine's layout: cgroup v1 hierarchies one per controller, plus cgroup2 at /sys/fs/cgroup/unified.
const MOUNTINFO = [
  '31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755',
  '32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct',
  '35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory',
  '39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,xattr,pids',
  '40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd',
  '41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate',
].join('\n');

const PROC_CGROUP = ['9:name=systemd:/k8s/pod1/c1', '8:pids:/k8s/pod1/c1', '4:memory:/k8s/pod1/c1', '2:cpu,cpuacct:/k8s/pod1/c1', '0::/k8s/pod1/c1', ''].join('\n');

describe('restore cgroups', () => {
  it('parses /proc/<pid>/cgroup and the cgroup mounts', () => {
    expect(parseProcCgroup(PROC_CGROUP)[3]).toEqual({ hierarchyId: 2, controllers: ['cpu', 'cpuacct'], path: '/k8s/pod1/c1' });
    const mounts = parseCgroupMounts(MOUNTINFO);
    expect(mounts).toHaveLength(5);
    expect(mounts.find((m) => m.version === 2)?.mountpoint).toBe('/sys/fs/cgroup/unified');
  });

  it("maps each of the target's cgroups to its cgroup.procs file, v1 and v2", () => {
    expect(cgroupProcsFiles(parseProcCgroup(PROC_CGROUP), parseCgroupMounts(MOUNTINFO))).toEqual([
      '/sys/fs/cgroup/systemd/k8s/pod1/c1/cgroup.procs',
      '/sys/fs/cgroup/pids/k8s/pod1/c1/cgroup.procs',
      '/sys/fs/cgroup/memory/k8s/pod1/c1/cgroup.procs',
      '/sys/fs/cgroup/cpu,cpuacct/k8s/pod1/c1/cgroup.procs',
      '/sys/fs/cgroup/unified/k8s/pod1/c1/cgroup.procs',
    ]);
  });

  it('refuses a hierarchy that is not mounted here (the tree would silently stay outside it)', () => {
    expect(() => cgroupProcsFiles(parseProcCgroup('5:devices:/x\n'), parseCgroupMounts(MOUNTINFO))).toThrow(expect.objectContaining({ code: 'RESTORE_CGROUP' }));
  });

  it('the join wrapper writes its own pid into each file and then execs the rest', () => {
    const w = cgroupJoinWrapper(['/a/cgroup.procs', '/b/cgroup.procs']);
    expect(w.slice(0, 2)).toEqual(['/bin/sh', '-c']);
    expect(w.slice(3)).toEqual(['thaw-cgroup-join', '/a/cgroup.procs', '/b/cgroup.procs', '--']);
    // Run for real with plain files standing in for cgroup.procs: the pid written is the exec'd process's.
    const dir = mkdtempSync(join(tmpdir(), 'thaw-cgjoin-'));
    try {
      const files = [join(dir, 'a'), join(dir, 'b')];
      const out = execFileSync(w[0] as string, [...cgroupJoinWrapper(files).slice(1), '/bin/sh', '-c', 'echo $$']).toString().trim();
      for (const f of files) expect(readFileSync(f, 'utf8').trim()).toBe(out);
      expect(() => execFileSync('/bin/sh', [...cgroupJoinWrapper([join(dir, 'no/such/file')]).slice(1), '/bin/true'], { stdio: 'pipe' })).toThrow();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
