import { execFileSync } from 'node:child_process';
import { mkdtemp, mkdir, readdir, rm, symlink, writeFile, chmod, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { runCreateRuntime } from '../../src/oci-hooks/create-runtime.js';
import { runPoststop } from '../../src/oci-hooks/poststop.js';
import { resolveEntrypoint, resolveInRoot } from '../../src/oci-hooks/entrypoint.js';
import { HOOK_DONE_FILE, HOOK_FAILED_FILE, readHookOutcome, writeHookDone } from '../../src/oci-hooks/records.js';
import { envValue, parseOciConfig, parseOciState } from '../../src/oci-hooks/state.js';
import { DELETED_FILES_FILE_NAME, ROOTFS_DIFF_FILE_NAME } from '../../src/store/manifest.js';
import { snapshotTree, ustar } from '../helpers/rootfs-tree.js';

describe('OCI state parser', () => {
  it('reads what runc writes on a createRuntime hook stdin', () => {
    const s = parseOciState('{"ociVersion":"1.0.2","id":"abc","status":"creating","pid":4422,"bundle":"/run/b","annotations":{"k":"v"}}');
    expect(s).toEqual({ ociVersion: '1.0.2', id: 'abc', status: 'creating', pid: 4422, bundle: '/run/b', annotations: { k: 'v' } });
  });

  it('accepts a stopped state without pid and without annotations', () => {
    expect(parseOciState('{"ociVersion":"1.0.2","id":"abc","status":"stopped","bundle":"/b"}')).toEqual({
      ociVersion: '1.0.2', id: 'abc', status: 'stopped', bundle: '/b', annotations: {},
    });
  });

  const bad: Record<string, string> = {
    'not JSON': '{',
    'an array': '[]',
    'no id': '{"ociVersion":"1","status":"creating","bundle":"/b"}',
    'an unknown status': '{"ociVersion":"1","id":"x","status":"paused","bundle":"/b"}',
    'a relative bundle': '{"ociVersion":"1","id":"x","status":"creating","bundle":"b"}',
    'a negative pid': '{"ociVersion":"1","id":"x","status":"creating","bundle":"/b","pid":-3}',
    'a non-string annotation': '{"ociVersion":"1","id":"x","status":"creating","bundle":"/b","annotations":{"a":1}}',
  };
  for (const [what, text] of Object.entries(bad)) {
    it(`refuses ${what} with HOOK_STATE_INVALID`, () => {
      expect(() => parseOciState(text)).toThrow(expect.objectContaining({ code: 'HOOK_STATE_INVALID' }));
    });
  }

  it('reads root.path (relative to the bundle), args, env and cwd from config.json', () => {
    const c = parseOciConfig(JSON.stringify({ root: { path: 'rootfs' }, process: { args: ['node', 'x.js'], env: ['PATH=/bin', 'PATH=/usr/bin'] } }), '/run/b');
    expect(c).toEqual({ rootfs: '/run/b/rootfs', args: ['node', 'x.js'], env: ['PATH=/bin', 'PATH=/usr/bin'], cwd: '/', annotations: {} });
    expect(envValue(c.env, 'PATH')).toBe('/usr/bin');
    expect(() => parseOciConfig('{"root":{"path":"r"},"process":{"args":[]}}', '/b')).toThrow(expect.objectContaining({ code: 'HOOK_CONFIG_INVALID' }));
  });
});

describe('entrypoint resolution inside a rootfs', () => {
  let root: string;
  let outside: string;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'thaw-hook-root-'));
    outside = await mkdtemp(join(tmpdir(), 'thaw-hook-outside-'));
    await mkdir(join(root, 'usr/bin'), { recursive: true });
    await mkdir(join(root, 'bin'), { recursive: true });
    await writeFile(join(root, 'usr/bin/python3.11'), '#!/bin/true\n');
    await chmod(join(root, 'usr/bin/python3.11'), 0o755);
    await symlink('python3.11', join(root, 'usr/bin/python3'));
    await writeFile(join(root, 'bin/busybox'), 'x');
    await chmod(join(root, 'bin/busybox'), 0o755);
    await symlink('/bin/busybox', join(root, 'bin/sh'));
    // An absolute link that would leave the rootfs if resolved on the host.
    await writeFile(join(outside, 'evil'), 'x');
    await chmod(join(outside, 'evil'), 0o755);
    await symlink(join(outside, 'evil'), join(root, 'usr/bin/evil'));
    await symlink('../../../../../../..', join(root, 'usr/bin/up'));
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
    await rm(outside, { recursive: true, force: true });
  });

  it('follows relative and absolute links inside the rootfs', async () => {
    expect(await resolveEntrypoint(root, 'python3', '/usr/local/bin:/usr/bin')).toBe('/usr/bin/python3.11');
    expect(await resolveEntrypoint(root, '/bin/sh', undefined)).toBe('/bin/busybox');
    expect(await resolveEntrypoint(root, 'sh', undefined)).toBe('/bin/busybox');
  });

  it('never leaves the rootfs: an absolute link target is taken inside it, `..` stops at its root', async () => {
    // <outside>/evil does not exist under root, so the name does not resolve at all.
    await expect(resolveEntrypoint(root, 'evil', '/usr/bin')).rejects.toMatchObject({ code: 'HOOK_ENTRYPOINT_NOT_FOUND' });
    expect(await resolveInRoot(root, '/usr/bin/up/bin/busybox')).toBe('/bin/busybox');
  });

  it('refuses a name not found in PATH and a link loop', async () => {
    await expect(resolveEntrypoint(root, 'nope', '/usr/bin:/bin')).rejects.toMatchObject({ code: 'HOOK_ENTRYPOINT_NOT_FOUND' });
    await symlink('loop', join(root, 'bin/loop'));
    await expect(resolveInRoot(root, '/bin/loop')).rejects.toMatchObject({ code: 'HOOK_ENTRYPOINT_NOT_FOUND' });
  });

  it('create-runtime never throws: a failure is recorded in hook-failed and reported', async () => {
    const bundle = await mkdtemp(join(tmpdir(), 'thaw-hook-bundle-'));
    const control = await mkdtemp(join(tmpdir(), 'thaw-hook-ctl-'));
    try {
      await writeFile(join(bundle, 'config.json'), JSON.stringify({ root: { path: root }, process: { args: ['no-such-binary'], env: ['PATH=/bin'] } }));
      const r = await runCreateRuntime(
        { ociVersion: '1.0.2', id: 'c1', status: 'creating', pid: process.pid, bundle, annotations: {} },
        { mode: 'overlay', controlDir: control, checkpointDir: join(bundle, 'no-checkpoint'), thawPausePath: '/nonexistent/thaw-pause' },
      );
      expect(r).toMatchObject({ ok: false, code: 'HOOK_ENTRYPOINT_NOT_FOUND' });
      expect(JSON.parse(await readFile(join(control, HOOK_FAILED_FILE), 'utf8'))).toMatchObject({ code: 'HOOK_ENTRYPOINT_NOT_FOUND' });
      expect(await readHookOutcome(control)).toMatchObject({ kind: 'failed', record: { code: 'HOOK_ENTRYPOINT_NOT_FOUND' } });
    } finally {
      await rm(bundle, { recursive: true, force: true });
      await rm(control, { recursive: true, force: true });
    }
  });
});

describe('create-runtime undoes the rootfs diff when it fails after applying it', () => {
  it('the cold start sees the image files, not the diff (entrypoint missing after the diff)', async () => {
    const bundle = await mkdtemp(join(tmpdir(), 'thaw-hook-bundle-'));
    const control = await mkdtemp(join(tmpdir(), 'thaw-hook-ctl-'));
    try {
      const rootfs = join(bundle, 'rootfs');
      await mkdir(join(rootfs, 'etc'), { recursive: true });
      await writeFile(join(rootfs, 'etc/passwd'), 'image\n');
      await writeFile(join(rootfs, 'etc/gone'), 'deleted by the diff');
      const before = await snapshotTree(rootfs);
      const checkpointDir = join(bundle, 'checkpoint');
      await mkdir(checkpointDir);
      await writeFile(join(checkpointDir, ROOTFS_DIFF_FILE_NAME), ustar([{ name: 'etc/passwd', type: '0', data: 'diff\n' }, { name: 'etc/new', type: '0', data: 'new' }]));
      await writeFile(join(checkpointDir, DELETED_FILES_FILE_NAME), JSON.stringify(['etc/gone']));
      await writeFile(join(bundle, 'config.json'), JSON.stringify({ root: { path: rootfs }, process: { args: ['no-such-binary'], env: ['PATH=/bin'] } }));
      const r = await runCreateRuntime(
        { ociVersion: '1.0.2', id: 'c1', status: 'creating', pid: process.pid, bundle, annotations: {} },
        { mode: 'overlay', controlDir: control, checkpointDir, thawPausePath: '/nonexistent/thaw-pause' },
      );
      expect(r).toEqual({ ok: false, code: 'HOOK_ENTRYPOINT_NOT_FOUND', reason: expect.not.stringMatching(/undoing/) });
      expect(await snapshotTree(rootfs)).toEqual(before);
      expect(await readFile(join(rootfs, 'etc/passwd'), 'utf8')).toBe('image\n');
    } finally {
      await rm(bundle, { recursive: true, force: true });
      await rm(control, { recursive: true, force: true });
    }
  });

  it('a failure after the diff whose undo fails too: HOOK_UNDO_FAILED, and the container must not start', async () => {
    const bundle = await mkdtemp(join(tmpdir(), 'thaw-hook-bundle-'));
    const control = await mkdtemp(join(tmpdir(), 'thaw-hook-ctl-'));
    const rootfs = join(bundle, 'rootfs');
    try {
      await mkdir(join(rootfs, 'etc'), { recursive: true });
      const checkpointDir = join(bundle, 'checkpoint');
      await mkdir(checkpointDir);
      // The diff creates a file at the top of the rootfs; the rootfs directory is append-only (chattr +a), so the
      // apply may create it but the undo may not remove it.
      await writeFile(join(checkpointDir, ROOTFS_DIFF_FILE_NAME), ustar([{ name: 'new-at-root', type: '0', data: 'diff\n' }]));
      await writeFile(join(checkpointDir, DELETED_FILES_FILE_NAME), '[]');
      await writeFile(join(bundle, 'config.json'), JSON.stringify({ root: { path: rootfs }, process: { args: ['no-such-binary'], env: ['PATH=/bin'] } }));
      try {
        execFileSync('chattr', ['+a', rootfs], { stdio: 'ignore' });
      } catch {
        console.log('chattr +a is not supported on this file system: the undo cannot be made to fail here');
        return;
      }
      const r = await runCreateRuntime(
        { ociVersion: '1.0.2', id: 'c1', status: 'creating', pid: process.pid, bundle, annotations: {} },
        { mode: 'overlay', controlDir: control, checkpointDir, thawPausePath: '/nonexistent/thaw-pause' },
      );
      expect(r).toMatchObject({ ok: false, code: 'HOOK_UNDO_FAILED', mustNotStart: true });
      expect(r.ok ? '' : r.reason).toMatch(/^HOOK_ENTRYPOINT_NOT_FOUND: .*; undoing the rootfs diff failed too: /);
      expect(await readHookOutcome(control)).toMatchObject({ kind: 'failed', record: { code: 'HOOK_UNDO_FAILED' } });
    } finally {
      execFileSync('chattr', ['-a', rootfs], { stdio: 'ignore' });
      await rm(bundle, { recursive: true, force: true });
      await rm(control, { recursive: true, force: true });
    }
  });

  it('a hook that succeeds leaves the diff and no undo backup in the rootfs', async () => {
    const bundle = await mkdtemp(join(tmpdir(), 'thaw-hook-bundle-'));
    const control = await mkdtemp(join(tmpdir(), 'thaw-hook-ctl-'));
    try {
      const rootfs = join(bundle, 'rootfs');
      await mkdir(join(rootfs, 'etc'), { recursive: true });
      await writeFile(join(rootfs, 'etc/passwd'), 'image\n');
      const checkpointDir = join(bundle, 'checkpoint');
      await mkdir(checkpointDir);
      await writeFile(join(checkpointDir, ROOTFS_DIFF_FILE_NAME), ustar([{ name: 'etc/passwd', type: '0', data: 'diff\n' }]));
      await writeFile(join(checkpointDir, DELETED_FILES_FILE_NAME), '[]');
      await writeFile(join(bundle, 'config.json'), JSON.stringify({ root: { path: rootfs }, process: { args: ['/bin/app'], env: ['PATH=/bin'] } }));
      const r = await runCreateRuntime(
        { ociVersion: '1.0.2', id: 'c1', status: 'creating', pid: process.pid, bundle, annotations: {} },
        { mode: 'args', controlDir: control, checkpointDir, thawPausePath: '/nonexistent/thaw-pause' },
      );
      expect(r).toMatchObject({ ok: true, record: { rootfsDiff: { entries: 1 } } });
      expect(await readFile(join(rootfs, 'etc/passwd'), 'utf8')).toBe('diff\n');
      expect(await readdir(rootfs)).toEqual(['etc']);
    } finally {
      await rm(bundle, { recursive: true, force: true });
      await rm(control, { recursive: true, force: true });
    }
  });
});

describe('create-runtime budget (runc kills a hook at its timeout, which fails the pod)', () => {
  async function hookWithBudget(budgetLeftMs: number): Promise<Awaited<ReturnType<typeof runCreateRuntime>>> {
    const bundle = await mkdtemp(join(tmpdir(), 'thaw-hook-bundle-'));
    const control = await mkdtemp(join(tmpdir(), 'thaw-hook-ctl-'));
    try {
      await writeFile(join(bundle, 'config.json'), JSON.stringify({ root: { path: bundle }, process: { args: ['/bin/app'], env: ['PATH=/bin'] } }));
      // A checkpoint still being pulled that never arrives, and a wait far longer than any hook timeout.
      return await runCreateRuntime(
        { ociVersion: '1.0.2', id: 'c1', status: 'creating', pid: process.pid, bundle, annotations: {} },
        { mode: 'args', controlDir: control, checkpointDir: join(bundle, 'never-published'), thawPausePath: '/nonexistent/thaw-pause', waitCheckpointMs: 600_000, budgetMs: performance.now() + budgetLeftMs },
      );
    } finally {
      await rm(bundle, { recursive: true, force: true });
      await rm(control, { recursive: true, force: true });
    }
  }

  it('a wait for a pull ends with the budget, not with its own longer limit: cold start', async () => {
    expect(await hookWithBudget(300)).toMatchObject({ ok: false, code: 'HOOK_CHECKPOINT_UNAVAILABLE' });
  });

  it('a budget already spent gives up before any work with HOOK_BUDGET_EXCEEDED', async () => {
    expect(await hookWithBudget(-1)).toMatchObject({ ok: false, code: 'HOOK_BUDGET_EXCEEDED' });
  });
});

describe('hook records', () => {
  it('reads done, failed (which wins) and missing; refuses an overlay record without a path', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-hook-rec-'));
    try {
      expect(await readHookOutcome(dir)).toEqual({ kind: 'missing' });
      await writeHookDone(dir, { mode: 'overlay', overlayPath: '/usr/bin/node', ms: 3 });
      expect(await readHookOutcome(dir)).toEqual({ kind: 'done', record: { mode: 'overlay', overlayPath: '/usr/bin/node', ms: 3 } });
      await writeFile(join(dir, HOOK_DONE_FILE), '{"mode":"overlay"}');
      expect(await readHookOutcome(dir)).toMatchObject({ kind: 'failed', record: { code: 'HOOK_RECORD_INVALID' } });
      await writeFile(join(dir, HOOK_FAILED_FILE), '{"code":"HOOK_X","reason":"r"}');
      expect(await readHookOutcome(dir)).toEqual({ kind: 'failed', record: { code: 'HOOK_X', reason: 'r' } });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('poststop', () => {
  it('removes the control directory, the work directory and the undo journal; what is gone already is no problem', async () => {
    const top = await mkdtemp(join(tmpdir(), 'thaw-poststop-'));
    try {
      const controlDir = join(top, 'control', 'c1');
      const workDir = join(top, 'work', 'c1');
      const undoJournal = join(top, 'work', 'rootfs-undo', 'c1.json');
      const other = join(top, 'work', 'rootfs-undo', 'c2.json');
      for (const d of [controlDir, workDir, dirname(undoJournal)]) await mkdir(d, { recursive: true });
      await writeFile(join(workDir, 'restore.log'), 'x');
      await writeFile(undoJournal, '{}');
      await writeFile(other, '{}');
      expect(await runPoststop({ controlDir, workDir, undoJournal })).toEqual([]);
      expect(await readdir(join(top, 'work', 'rootfs-undo'))).toEqual(['c2.json']);
      expect(await readdir(join(top, 'work'))).toEqual(['rootfs-undo']);
      expect(await readdir(join(top, 'control'))).toEqual([]);
      expect(await runPoststop({ controlDir, workDir, undoJournal })).toEqual([]);
    } finally {
      await rm(top, { recursive: true, force: true });
    }
  });
});
