import { execFileSync } from 'node:child_process';
import { chmod, chown, copyFile, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { apiSocketOf, COMMANDS, parseCommandLine, parseTarget, UsageError } from '../../src/cli/args.js';
import { exitCodeOf } from '../../src/cli/client.js';
import { containerdVersionOf, hostBinaryProblem, hostHelperChecks, nativeHookCheck, renderDoctor, thpCheck } from '../../src/cli/doctor.js';
import { HOST_HELPERS } from '../../src/agent/index.js';
import { parseThpMode } from '../../src/sys/host-facts.js';
import { ExitCode } from '../../src/cli/exit-codes.js';
import { runCli, type CliIo } from '../../src/cli/main.js';
import { formatBytes, formatMs, renderCheckpointResult, renderGc, renderList } from '../../src/cli/render.js';
import { renderTable as table } from '../../src/table.js';

function capture(env: Record<string, string> = {}): CliIo & { out: () => string; err: () => string } {
  let out = '';
  let err = '';
  return { stdout: (t) => void (out += t), stderr: (t) => void (err += t), env, out: () => out, err: () => err };
}

describe('thaw command line', () => {
  it('parses a command, its positionals and options', () => {
    const l = parseCommandLine(['checkpoint', 'default/worker', '--name', 'w1', '--replace', '--json', '--socket', '/tmp/s.sock']);
    expect(l).toEqual({ command: 'checkpoint', positionals: ['default/worker'], values: { name: 'w1', replace: true, json: true, socket: '/tmp/s.sock' }, help: false });
    expect(parseCommandLine(['agent', '--metrics-listen', '', '--paths-store-root', '/s']).values).toEqual({ 'metrics-listen': '', 'paths-store-root': '/s' });
  });

  it.each([
    [['frobnicate'], /unknown command "frobnicate"/],
    [['list', '--bogus'], /Unknown option '--bogus'/],
    [['inspect'], /missing argument: thaw inspect <\[namespace\/\]checkpoint \| oci-<digest>>/],
    [['delete', 'a', 'b'], /unexpected argument "b"/],
    [['agent', '--metrics-listen'], /--metrics-listen/],
  ])('refuses %j as a usage error', (argv, message) => {
    expect(() => parseCommandLine(argv)).toThrow(UsageError);
    expect(() => parseCommandLine(argv)).toThrow(message);
  });

  it('has --help on every command, and top-level help', async () => {
    for (const command of Object.keys(COMMANDS)) {
      const io = capture();
      expect(await runCli([command, '--help'], io)).toBe(0);
      expect(io.out()).toMatch(new RegExp(`^usage: thaw ${command}`));
    }
    const io = capture();
    expect(await runCli([], io)).toBe(0);
    expect(io.out()).toMatch(/exit codes: 0 ok, 1 failed, 2 usage or configuration error, 3 agent unreachable, 4 not found, 5 refused/);
  });

  it('exits 2 with one line naming the problem on a usage error', async () => {
    const io = capture();
    expect(await runCli(['list', '--bogus'], io)).toBe(ExitCode.USAGE);
    expect(io.err().split('\n')[0]).toBe("thaw list: Unknown option '--bogus'");
  });

  it('tells a pod from a container id', () => {
    expect(parseTarget('default/worker')).toEqual({ pod: { namespace: 'default', name: 'worker' } });
    expect(parseTarget('abc123')).toEqual({ containerId: 'abc123' });
    expect(() => parseTarget('a/b/c')).toThrow(/neither a container id nor namespace\/pod/);
    expect(() => parseTarget('/b')).toThrow(UsageError);
  });

  it('finds the API socket: --socket, then THAW_API_SOCKET, then the default', () => {
    expect(apiSocketOf({ socket: '/x' }, { THAW_API_SOCKET: '/y' })).toBe('/x');
    expect(apiSocketOf({}, { THAW_API_SOCKET: '/y' })).toBe('/y');
    expect(apiSocketOf({}, {})).toBe('/run/thaw/agent.sock');
  });

  it('maps API statuses to the documented exit codes', () => {
    expect(exitCodeOf(grpc.status.UNAVAILABLE)).toBe(3);
    expect(exitCodeOf(grpc.status.NOT_FOUND)).toBe(4);
    expect(exitCodeOf(grpc.status.FAILED_PRECONDITION)).toBe(5);
    expect(exitCodeOf(grpc.status.INVALID_ARGUMENT)).toBe(2);
    expect(exitCodeOf(grpc.status.INTERNAL)).toBe(1);
  });

  it('exits 3 when no agent answers on the socket', async () => {
    const io = capture();
    expect(await runCli(['list', '--socket', '/nonexistent/thaw.sock'], io)).toBe(ExitCode.UNREACHABLE);
    expect(io.err()).toMatch(/^thaw list: the agent does not answer on \/nonexistent\/thaw.sock .*\(AGENT_UNREACHABLE\)\n$/);
  });
});

describe('thaw agent configuration errors', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-cli-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('exit 2 naming the key (file, flag, environment) before anything starts', async () => {
    const path = join(dir, 'agent.yaml');
    await writeFile(path, 'metrics:\n  listen: 127.0.0.1:9464\n  lisen: x\n');
    let io = capture();
    expect(await runCli(['agent', '--config', path], io)).toBe(ExitCode.USAGE);
    expect(io.err()).toBe(`thaw agent: load agent configuration: unknown key metrics.lisen (file ${path}): expected one of metrics.listen (AGENT_CONFIG_INVALID)\n`);
    io = capture({ THAW_LOG_LEVEL: 'chatty' });
    expect(await runCli(['agent', '--config', path.replace('agent.yaml', 'none.yaml')], io)).toBe(ExitCode.USAGE);
    expect(io.err()).toMatch(/cannot read .*none.yaml.*\(AGENT_CONFIG_UNREADABLE\)/);
    await writeFile(path, '');
    io = capture({ THAW_LOG_LEVEL: 'chatty' });
    expect(await runCli(['agent', '--config', path], io)).toBe(ExitCode.USAGE);
    expect(io.err()).toMatch(/log\.level \(environment THAW_LOG_LEVEL\): expected one of debug, info, warn, error, got "chatty"/);
    io = capture();
    expect(await runCli(['agent', '--config', path, '--cuda-lock-timeout-ms=-5'], io)).toBe(ExitCode.USAGE);
    expect(io.err()).toMatch(/cuda\.lockTimeoutMs \(flag --cuda-lock-timeout-ms\): expected a positive integer/);
  });
});

describe('human output', () => {
  it('formats sizes, durations and tables', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(134_217_728)).toBe('128 MiB');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatMs(250.4)).toBe('250 ms');
    expect(formatMs(1500)).toBe('1.50 s');
    expect(table(['A', 'BB'], [['xxx', 'y'], ['z', '']])).toBe('A    BB\nxxx  y\nz');
  });

  it('renders a collection: what went, least recently used first, the cache, an unmet bound', () => {
    const r = { collected: [{ name: 'team-a/old', namespace: 'team-a', bytes: 2048, last_used: '2026-01-02T03:04:05.678Z' }], bytes: 2048, cache_files: 1, cache_bytes: 1024, unmet: '', dry_run: true };
    expect(renderGc(r)).toBe(
      [
        'would collect 1 checkpoint (2.0 KiB), least recently used first:',
        'NAME        SIZE     LAST USED',
        'team-a/old  2.0 KiB  2026-01-02T03:04:05Z',
        'would collect 1 file cache entry no checkpoint links (1.0 KiB)',
      ].join('\n'),
    );
    expect(renderGc({ ...r, collected: [], bytes: 0, cache_files: 0, cache_bytes: 0, unmet: 'namespace x holds 5 bytes; its quota is 1', dry_run: false })).toBe(
      ['collected no checkpoint', 'collected 0 file cache entries no checkpoint links (0 B)', 'not within bounds: namespace x holds 5 bytes; its quota is 1'].join('\n'),
    );
    expect(parseCommandLine(['gc', '--dry-run', '--json']).values).toMatchObject({ 'dry-run': true, json: true });
  });

  it('lists checkpoints, broken ones with their problem, failed ones with their cause', () => {
    const base = { id: 'id1', created_at: '2026-01-02T03:04:05.678Z', bytes: 2048, files: 3, image: 'img:1', source_pod: 'ns/p', gpu: false, in_use: true, problem: '', snapshot: '', snapshot_key: '', restore_failure_json: '', namespace: 'ns' };
    const failed = JSON.stringify({ cause: 'RESTORE_CRIU', reason: 'boom', at: '2026-01-02T03:04:06Z', pod: 'ns/q', containerId: 'c1' });
    expect(renderList([{ ...base, name: 'good' }, { ...base, name: 'bad', problem: 'STORE_MANIFEST_INVALID: no manifest' }, { ...base, name: 'fail', in_use: false, restore_failure_json: failed }])).toBe(
      [
        'NAME  CREATED               SIZE     GPU  IN USE  RESTORE              IMAGE',
        'good  2026-01-02T03:04:05Z  2.0 KiB  no   yes     ok                   img:1',
        'bad   -                     -        -    yes     -                    BROKEN: STORE_MANIFEST_INVALID: no manifest',
        'fail  2026-01-02T03:04:05Z  2.0 KiB  no   no      FAILED RESTORE_CRIU  img:1',
      ].join('\n'),
    );
    expect(renderList([])).toBe('no checkpoints');
  });

  it('lists snapshot checkpoints with their name and short key, and how snapshot pods started', () => {
    const base = { id: 'id1', created_at: '2026-01-02T03:04:05.678Z', bytes: 2048, files: 3, image: 'img:1', source_pod: 'ns/p', gpu: false, in_use: false, problem: '', snapshot: '', snapshot_key: '', restore_failure_json: '', namespace: 'ns' };
    const out = renderList(
      [{ ...base, name: 'plain' }, { ...base, name: 'qwen-0123456789ab', snapshot: 'qwen', snapshot_key: 'f'.repeat(64) }],
      [
        { namespace: 'ns', snapshot: 'qwen', outcome: 'checkpointed', cause: '', count: 1 },
        { namespace: 'ns', snapshot: 'qwen', outcome: 'cold', cause: 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS', count: 2 },
        { namespace: 'ns', snapshot: 'qwen', outcome: 'restored', cause: '', count: 5 },
      ],
    );
    expect(out).toBe(
      [
        'NAME               SNAPSHOT                 CREATED               SIZE     GPU  IN USE  RESTORE  IMAGE',
        'plain              -                        2026-01-02T03:04:05Z  2.0 KiB  no   no      ok       img:1',
        'qwen-0123456789ab  qwen (key ffffffffffff)  2026-01-02T03:04:05Z  2.0 KiB  no   no      ok       img:1',
        '',
        'snapshot pods started on this node (since the agent started):',
        'NAMESPACE  SNAPSHOT  STARTED       CAUSE                                  PODS',
        'ns         qwen      checkpointed  -                                      1',
        'ns         qwen      cold          AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS  2',
        'ns         qwen      restored      -                                      5',
      ].join('\n'),
    );
  });

  it('renders a checkpoint result', () => {
    const p = { container_id: 'c'.repeat(64), name: 'w', pod: 'ns/p', container: 'worker', done: true, id: 'abc', bytes: 1048576, error_json: '' };
    expect(renderCheckpointResult({ ...p, state: 'succeeded', phases_json: JSON.stringify({ dumpMs: 800, totalMs: 1200 }) })).toBe('checkpoint w (abc): 1.0 MiB in 1.20 s (dump 800 ms)');
    expect(renderCheckpointResult({ ...p, state: 'failed', phases_json: '', error_json: JSON.stringify({ code: 'CHECKPOINT_FAILED', message: 'dump: boom' }) })).toBe('checkpoint w failed: CHECKPOINT_FAILED: dump: boom');
  });

  it('reads the transparent-huge-page mode and warns unless it is always', () => {
    expect(parseThpMode('always [madvise] never\n')).toBe('madvise');
    expect(parseThpMode('[always] madvise never\n')).toBe('always');
    expect(parseThpMode('always madvise [never]')).toBe('never');
    expect(parseThpMode('garbage')).toBeUndefined();
    expect(thpCheck('always').status).toBe('pass');
    for (const mode of ['madvise', 'never', undefined]) {
      const c = thpCheck(mode);
      expect([c.status, c.detail.startsWith(mode ?? 'no /sys/kernel/mm/transparent_hugepage/enabled')]).toEqual(['warn', true]);
      expect(c.fix).toMatch(/echo always > \/sys\/kernel\/mm\/transparent_hugepage\/enabled/);
    }
  });

  it('doctor knows the native createRuntime hook: static passes, dynamic or missing warns (the Node.js hook runs)', async () => {
    const built = new URL('../../native/build/thaw-hook', import.meta.url).pathname;
    expect(await nativeHookCheck(built)).toMatchObject({ id: 'thaw-hook', status: 'pass' });
    expect(await nativeHookCheck('/nonexistent/thaw-hook')).toMatchObject({ id: 'thaw-hook', status: 'warn', fix: expect.stringContaining('make -C native') });
    expect(await nativeHookCheck('/usr/bin/env')).toMatchObject({ id: 'thaw-hook', status: 'warn', detail: expect.stringContaining('not a static') });
  });

  it('checks that the host helpers thaw runs as root (nsenter, unshare, setpriv, sh, mount, umount) are host binaries only root can replace', async () => {
    expect(HOST_HELPERS.map((h) => h.path)).toEqual(['/usr/bin/nsenter', '/usr/bin/unshare', '/bin/sh', '/usr/bin/mount', '/usr/bin/umount', '/usr/bin/setpriv']);
    // This machine's own: util-linux's binaries in root-owned directories (/bin/sh a symlink to dash).
    for (const h of HOST_HELPERS) expect(await hostBinaryProblem(h.path), h.path).toBeUndefined();
    const checks = await hostHelperChecks();
    expect(checks.map((c) => [c.id, c.status])).toEqual(HOST_HELPERS.map((h) => [`host.${h.name}`, 'pass']));

    // Each way a path is not one: a temp tree whose root is a root-only directory (/tmp itself is 1777).
    const top = await mkdtemp(join(tmpdir(), 'thaw-doctor-bin-'));
    try {
      const elf = join(top, 'elf');
      await copyFile('/usr/bin/nsenter', elf);
      await chmod(elf, 0o755);
      const problems = async (setup: (p: string) => Promise<void>, name: string): Promise<string | undefined> => {
        const p = join(top, name);
        await setup(p);
        return hostBinaryProblem(p);
      };
      expect(await hostBinaryProblem(join(top, 'missing'))).toBe(`${join(top, 'missing')} does not exist`);
      expect(await problems(async (p) => { await copyFile(elf, p); await chmod(p, 0o757); }, 'world-writable')).toMatch(/is writable by group or others \(mode 0757\)$/);
      expect(await problems(async (p) => { await copyFile(elf, p); await chown(p, 1000, 0); }, 'foreign-owner')).toMatch(/is owned by uid 1000, not root$/);
      expect(await problems(async (p) => { await writeFile(p, '#!/bin/sh\necho shadow\n', { mode: 0o755 }); }, 'script')).toMatch(/is not an ELF binary/);
      expect(await problems(async (p) => { await copyFile(elf, p); await chmod(p, 0o644); }, 'not-exec')).toMatch(/is not executable$/);
      expect(await problems(async (p) => { execFileSync('mkfifo', [p]); }, 'fifo')).toMatch(/is not a regular file$/);
      expect(await problems(async (p) => { await mkdir(p); }, 'dir')).toMatch(/is not a regular file$/);
      // A symlink is followed as exec follows it (/bin/sh -> dash above passes): the file it names is judged, and
      // the directories of the link as well as of its target.
      expect(await problems(async (p) => symlink(join(top, 'script'), p), 'link-to-script')).toMatch(new RegExp(`link-to-script \\(${join(top, 'script')}\\) is not an ELF binary`));
      expect(await problems(async (p) => symlink('/usr/bin/nsenter', p), 'link-to-host')).toMatch(new RegExp(`link-to-host \\(/usr/bin/nsenter\\): its directory ${tmpdir()} is owned by uid 0 with mode 1777`));
      // A good file in a directory others may write to (here /tmp, 1777, above the tree).
      expect(await hostBinaryProblem(elf)).toMatch(new RegExp(`its directory ${tmpdir()} is owned by uid 0 with mode 1777`));
      // A required helper missing fails; setpriv missing only warns; present but unsafe fails either way.
      const custom = await hostHelperChecks([
        { name: 'nsenter', path: join(top, 'missing'), required: true, role: 'r' },
        { name: 'setpriv', path: join(top, 'missing'), required: false, role: 'r' },
        { name: 'unshare', path: join(top, 'script'), required: false, role: 'r' },
      ]);
      expect(custom.map((c) => [c.id, c.status])).toEqual([['host.nsenter', 'fail'], ['host.setpriv', 'warn'], ['host.unshare', 'fail']]);
      for (const c of custom) expect(c.fix).toBeTruthy();
      expect(custom[0]?.fix).toBe(`install nsenter at ${join(top, 'missing')} from the distribution (util-linux)`);
    } finally {
      await rm(top, { recursive: true, force: true });
    }
  });

  it('renders doctor lines with the fix under each problem', () => {
    expect(containerdVersionOf('containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n')).toBe('1.7.24~ds1');
    expect(containerdVersionOf('containerd github.com/containerd/containerd/v2 2.1.9+unknown\n')).toBe('2.1.9+unknown');
    expect(
      renderDoctor([
        { id: 'a', title: 'A', status: 'pass', detail: 'fine' },
        { id: 'b', title: 'B', status: 'fail', detail: 'broken', fix: 'mend it' },
        { id: 'c', title: 'C', status: 'warn', detail: 'meh', fix: 'maybe' },
      ]),
    ).toBe('PASS  A: fine\nFAIL  B: broken\n      fix: mend it\nWARN  C: meh\n      fix: maybe\n\n1 check failed, 1 warning');
  });
});
