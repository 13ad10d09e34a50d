/**
 * Domain options → criu_opts: the one builder per operation, table-tested field by field, with the
 * exact message of each refusal.
 */
import { describe, expect, it } from 'vitest';

import { isThawError } from '../../src/errors.js';
import {
  buildDumpRequestOpts,
  buildRestoreRequestOpts,
  planChildFds,
  workDirConfigText,
  type BuildContext,
  type DumpOptions,
  type RestoreOptions,
} from '../../src/restore-engine/criu/options.js';
import type { CriuOptsMessage } from '../../src/restore-engine/criu/rpc.js';

const ctx: BuildContext = { fds: planChildFds(30, undefined, undefined, []).criu, notify: false };
const base = { imagesDirFd: -1, imagesDir: '/proc/self/fd/4', logLevel: 4 };

describe('buildDumpRequestOpts', () => {
  const cases: Record<string, { in: Partial<DumpOptions>; out: Partial<CriuOptsMessage> }> = {
    'the minimum: pid, images dir as /proc/self/fd/4, dump.log at debug level': { in: {}, out: {} },
    'leaveRunning → leave_running': { in: { leaveRunning: true }, out: { leaveRunning: true } },
    'tcpEstablished, shellJob, fileLocks, extUnixSk pass through': {
      in: { tcpEstablished: true, shellJob: true, fileLocks: true, extUnixSk: true },
      out: { tcpEstablished: true, shellJob: true, fileLocks: true, extUnixSk: true },
    },
    'externalMounts → external mnt[<mountpoint>]:<key>, in order': {
      in: { externalMounts: [{ mountpoint: '/etc/hosts', key: 'hosts' }, { mountpoint: '/dev/shm', key: 'shm' }] },
      out: { external: ['mnt[/etc/hosts]:hosts', 'mnt[/dev/shm]:shm'] },
    },
    'externalNetNs → external net[<inode>]:<key>, after the mounts': {
      in: { externalMounts: [{ mountpoint: '/m', key: 'm' }], externalNetNs: { inode: 4026531992, key: 'extnet' } },
      out: { external: ['mnt[/m]:m', 'net[4026531992]:extnet'] },
    },
    'manageCgroupsMode ignore → 0, strict → 5': { in: { manageCgroupsMode: 'strict' }, out: { manageCgroupsMode: 5 } },
    'networkLock skip → 3': { in: { networkLock: 'skip' }, out: { networkLock: 3 } },
    'ghostLimitBytes → ghost_limit': { in: { ghostLimitBytes: 8 << 20 }, out: { ghostLimit: 8 << 20 } },
    'freezeCgroup and skipMounts pass through': {
      in: { freezeCgroup: '/sys/fs/cgroup/x', skipMounts: ['/proc/acpi'] },
      out: { freezeCgroup: '/sys/fs/cgroup/x', skipMnt: ['/proc/acpi'] },
    },
    'logFile and logLevel override the defaults': { in: { logFile: 'd.log', logLevel: 2 }, out: { logFile: 'd.log', logLevel: 2 } },
  };
  for (const [name, c] of Object.entries(cases)) {
    it(name, () => {
      const got = buildDumpRequestOpts({ imagesDir: '/img', pid: 42, ...c.in }, ctx);
      expect(got).toEqual({ ...base, logFile: 'dump.log', pid: 42, ...c.out });
    });
  }

  it('asks for notifications only when the caller has handlers', () => {
    expect(buildDumpRequestOpts({ imagesDir: '/i', pid: 1 }, { ...ctx, notify: true }).notifyScripts).toBe(true);
    expect(buildDumpRequestOpts({ imagesDir: '/i', pid: 1 }, ctx).notifyScripts).toBeUndefined();
  });

  it('names the RPC config file (which carries the work dir) when there is one', () => {
    const fds = planChildFds(30, 31, 32, []).criu;
    expect(buildDumpRequestOpts({ imagesDir: '/i', workDir: '/w', pid: 1 }, { fds, notify: false }).configFile).toBe('/proc/self/fd/6');
  });

  const refusals: Record<string, [Partial<DumpOptions>, string]> = {
    'pid 0': [{ pid: 0 }, 'pid must be a positive integer, got 0'],
    'a log file in a subdirectory': [{ logFile: 'x/d.log' }, 'logFile must be a bare file name (CRIU refuses subdirectories), got "x/d.log"'],
    'log level 5': [{ logLevel: 5 }, 'logLevel must be an integer 0..4, got 5'],
    'a relative mountpoint': [{ externalMounts: [{ mountpoint: 'etc', key: 'k' }] }, 'externalMounts: mountpoint must be absolute, got etc'],
    'a key with a colon': [{ externalMounts: [{ mountpoint: '/e', key: 'a:b' }] }, "externalMounts: key must be non-empty without ':' or ']', got a:b"],
    'a negative ghost limit': [{ ghostLimitBytes: -1 }, 'ghostLimitBytes must be an integer 0..4294967295, got -1'],
    'an unknown cgroup mode': [{ manageCgroupsMode: 'loose' as never }, 'manageCgroupsMode must be one of ignore, none, props, soft, full, strict, default'],
  };
  for (const [name, [opts, message]] of Object.entries(refusals)) {
    it(`refuses ${name}`, () => {
      let caught: unknown;
      try {
        buildDumpRequestOpts({ imagesDir: '/i', pid: 1, ...opts }, ctx);
      } catch (err) {
        caught = err;
      }
      expect(isThawError(caught, 'CRIU_INVALID_OPTIONS')).toBe(true);
      expect((caught as Error).message).toBe(`build criu dump request: ${message}`);
    });
  }
});

describe('buildRestoreRequestOpts', () => {
  const cases: Record<string, { in: Partial<RestoreOptions>; fds?: BuildContext['fds']; out: Partial<CriuOptsMessage> }> = {
    'the minimum: restore.log, nothing else': { in: {}, out: {} },
    'rootPath → root': { in: { rootPath: '/run/rootfs' }, out: { root: '/run/rootfs' } },
    'externalMounts → external mnt[<key>]:<mountpoint>': {
      in: { externalMounts: [{ key: 'hosts', mountpoint: '/etc/hosts' }] },
      out: { external: ['mnt[hosts]:/etc/hosts'] },
    },
    'inherit fds → inherit_fd with the child fd numbers, in key order': {
      in: {},
      fds: planChildFds(30, 31, 32, [
        { fd: 50, key: 'pipe:[9]' },
        { fd: 51, key: 'extnet' },
      ]).criu,
      out: { configFile: '/proc/self/fd/6', inheritFd: [{ key: 'extnet', fd: 7 }, { key: 'pipe:[9]', fd: 8 }] },
    },
    'joinNamespaces → join_ns {ns, ns_file, extra_opt}': {
      in: { joinNamespaces: [{ ns: 'ipc', path: '/proc/1/ns/ipc' }, { ns: 'user', path: '/proc/1/ns/user', extraOpt: '0,0' }] },
      out: { joinNs: [{ ns: 'ipc', nsFile: '/proc/1/ns/ipc' }, { ns: 'user', nsFile: '/proc/1/ns/user', extraOpt: '0,0' }] },
    },
    'cgroupRoots → cg_root {ctrl, path}': {
      in: { cgroupRoots: [{ path: '/kubepods/pod1' }, { controller: 'memory', path: '/m' }] },
      out: { cgRoot: [{ path: '/kubepods/pod1' }, { ctrl: 'memory', path: '/m' }] },
    },
    'restoreSibling, orphanPtsMaster, networkLock skip, manageCgroupsMode ignore': {
      in: { restoreSibling: true, orphanPtsMaster: true, networkLock: 'skip', manageCgroupsMode: 'ignore' },
      out: { rstSibling: true, orphanPtsMaster: true, networkLock: 3, manageCgroupsMode: 0 },
    },
    'restoreDetached: true is what RPC does anyway, so it adds nothing': { in: { restoreDetached: true }, out: {} },
  };
  for (const [name, c] of Object.entries(cases)) {
    it(name, () => {
      const got = buildRestoreRequestOpts({ imagesDir: '/img', ...c.in }, { fds: c.fds ?? ctx.fds, notify: false });
      expect(got).toEqual({ ...base, logFile: 'restore.log', ...c.out });
    });
  }

  it('refuses restoreDetached: false, and joining a PID namespace, with what to do instead', () => {
    expect(() => buildRestoreRequestOpts({ imagesDir: '/i', restoreDetached: false }, ctx)).toThrow(
      'build criu restore request: restoreDetached: false is not possible over RPC (CRIU always detaches); use restoreSibling instead',
    );
    expect(() => buildRestoreRequestOpts({ imagesDir: '/i', joinNamespaces: [{ ns: 'pid' as never, path: '/p' }] }, ctx)).toThrow(
      'joinNamespaces: CRIU cannot join a PID namespace; run swrk through nsenterWrapper() instead',
    );
  });
});

describe('planChildFds', () => {
  it('puts images at 4, work at 5, config at 6, inherit fds from 7 sorted by key', () => {
    const plan = planChildFds(30, 31, 32, [
      { fd: 60, key: 'b' },
      { fd: 61, key: 'a' },
    ]);
    expect(plan.extraFds).toEqual([30, 31, 32, 61, 60]);
    expect(plan.criu).toEqual({
      imagesDirChildFd: 4,
      workDirChildFd: 5,
      configChildFd: 6,
      inheritFds: [
        { key: 'a', childFd: 7 },
        { key: 'b', childFd: 8 },
      ],
    });
  });

  it('fills the slots of a missing work dir and config with the images fd (stdio cannot have holes)', () => {
    expect(planChildFds(30, undefined, undefined, []).extraFds).toEqual([30, 30, 30]);
  });

  it('the config text points CRIU at the work dir fd, and its plugin dir at an empty dir inside it', () => {
    expect(workDirConfigText()).toBe('work-dir /proc/self/fd/5\nlibdir /proc/self/fd/5/criu-plugins\n');
  });
});
