import { execFileSync } from 'node:child_process';
import { chmod, lstat, mkdir, mkdtemp, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { applyRootfsDiff, discardUndo, undoRootfsDiff, UNDO_DIR_PREFIX, type UndoJournal } from '../../src/restore-engine/rootfs-diff/index.js';
import { rejection } from '../helpers/rejection.js';
import { setXattr, snapshotTree, ustar, xattrsOf } from '../helpers/rootfs-tree.js';

const sh = (cmd: string, args: string[]): string => execFileSync(cmd, args, { encoding: 'utf8' });

/** An image tree with files, a symlink, a directory with its own mode and xattr, and a deep tree to delete. */
async function fillImage(root: string): Promise<void> {
  await mkdir(join(root, 'etc/conf.d'), { recursive: true });
  await writeFile(join(root, 'etc/passwd'), 'root:x:0:0::/root:/bin/sh\n');
  await writeFile(join(root, 'etc/conf.d/a.conf'), 'a=1\n');
  await mkdir(join(root, 'bin'));
  await writeFile(join(root, 'bin/tool'), '#!/bin/sh\necho image\n', { mode: 0o755 });
  await mkdir(join(root, 'lib'));
  await chmod(join(root, 'lib'), 0o750);
  setXattr(join(root, 'lib'), 'user.image', 'yes');
  await mkdir(join(root, 'data/old/deep'), { recursive: true });
  await writeFile(join(root, 'data/old/deep/f'), 'old data');
  await symlink('etc/passwd', join(root, 'link'));
}

/** A diff that overwrites, deletes, replaces a symlink and a directory, changes a directory's mode, and creates. */
const DIFF = ustar([
  { name: 'etc/passwd', type: '0', data: 'evil:x:0:0::/:/bin/sh\n' },
  { name: 'etc/new', type: '0', data: 'created by the diff' },
  { name: 'etc/conf.d', type: '0', data: 'a file where a directory was' },
  { name: 'lib', type: '5' },
  { name: 'lib/libnew.so', type: '0', data: 'new library' },
  { name: 'link', type: '5' },
  { name: 'link/inside', type: '0', data: 'under a replaced symlink' },
  { name: 'newdir', type: '5' },
  { name: 'newdir/f', type: '0', data: 'f' },
  { name: 'newdir/h', type: '1', linkname: 'newdir/f' },
  { name: 'newdir/s', type: '2', linkname: '/etc/passwd' },
]);
const DELETED = JSON.stringify(['bin/tool', 'data/old']);

describe('the undo journal of a rootfs diff', () => {
  let dir: string;
  let rootfs: string;
  let tarFile: string;
  let deletedFilesFile: string;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-undo-'));
    rootfs = join(dir, 'rootfs');
    await mkdir(rootfs);
    await fillImage(rootfs);
    tarFile = join(dir, 'diff.tar');
    deletedFilesFile = join(dir, 'deleted.json');
    await writeFile(tarFile, DIFF);
    await writeFile(deletedFilesFile, DELETED);
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('undoes a diff that overwrote, deleted and created: the tree is byte-identical and the backup gone', async () => {
    const before = await snapshotTree(rootfs);
    const xattrsBefore = xattrsOf(rootfs);
    const r = await applyRootfsDiff({ rootfs, tarFile, deletedFilesFile, keepUndo: true });
    const journal = r.undo!;
    expect(journal.backupDir).toMatch(new RegExp(`^\\${UNDO_DIR_PREFIX}[0-9a-f]{32}$`));
    // The diff is in place, and the originals wait in the private backup (mode 0700, owned by root).
    expect(await readFile(join(rootfs, 'etc/passwd'), 'utf8')).toBe('evil:x:0:0::/:/bin/sh\n');
    expect((await lstat(join(rootfs, 'link'))).isDirectory()).toBe(true);
    await expect(lstat(join(rootfs, 'bin/tool'))).rejects.toThrow(/ENOENT/);
    const backup = await lstat(join(rootfs, journal.backupDir));
    expect([backup.isDirectory(), backup.mode & 0o7777, backup.uid]).toEqual([true, 0o700, 0]);
    expect((await lstat(join(rootfs, 'lib'))).mode & 0o7777).toBe(0o755);
    expect(journal.steps.filter((s) => s.op === 'moved').map((s) => s.path).sort()).toEqual(['bin/tool', 'data/old', 'etc/conf.d', 'etc/passwd', 'link']);
    expect(journal.steps.filter((s) => s.op === 'meta').map((s) => s.path)).toEqual(['lib']);

    undoRootfsDiff(rootfs, JSON.parse(JSON.stringify(journal)) as UndoJournal);
    expect(await snapshotTree(rootfs)).toEqual(before);
    expect(xattrsOf(rootfs)).toEqual(xattrsBefore);
    expect(await readdir(rootfs)).not.toContain(journal.backupDir);
  });

  it('skips the steps on a mount point of the container: a read-only bind mount over a directory the diff changed (runc\'s mount points are in a diff)', async () => {
    const r = await applyRootfsDiff({ rootfs, tarFile, deletedFilesFile, keepUndo: true });
    const journal = r.undo!;
    expect(journal.steps.filter((s) => s.op === 'meta').map((s) => s.path)).toEqual(['lib']);
    // The container's view: a read-only bind mount where the diff set a directory's metadata and created a tree.
    const outside = join(dir, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'model'), 'host bytes');
    sh('mount', ['--bind', outside, join(rootfs, 'lib')]);
    sh('mount', ['-o', 'remount,bind,ro', join(rootfs, 'lib')]);
    sh('mount', ['--bind', outside, join(rootfs, 'newdir')]);
    try {
      undoRootfsDiff(rootfs, journal);
      // Everything else is undone; the mounts are untouched, and so is what they show.
      expect(await readFile(join(rootfs, 'etc/passwd'), 'utf8')).toBe('root:x:0:0::/root:/bin/sh\n');
      expect(await readFile(join(rootfs, 'bin/tool'), 'utf8')).toBe('#!/bin/sh\necho image\n');
      expect(await readdir(join(rootfs, 'lib'))).toEqual(['model']);
      expect(await readFile(join(outside, 'model'), 'utf8')).toBe('host bytes');
      expect(await readdir(rootfs)).not.toContain(journal.backupDir);
    } finally {
      sh('umount', [join(rootfs, 'newdir')]);
      sh('umount', [join(rootfs, 'lib')]);
    }
  });

  it('leaves no backup behind without keepUndo, and discardUndo removes a kept one', async () => {
    await applyRootfsDiff({ rootfs, tarFile, deletedFilesFile });
    expect((await readdir(rootfs)).filter((n) => n.startsWith(UNDO_DIR_PREFIX))).toEqual([]);
    const again = join(dir, 'again');
    await mkdir(again);
    await fillImage(again);
    const r = await applyRootfsDiff({ rootfs: again, tarFile, deletedFilesFile, keepUndo: true });
    discardUndo(again, r.undo!);
    expect(await snapshotTree(again)).toEqual(await snapshotTree(rootfs));
  });

  it('undoes its own writes when one fails halfway, before the error leaves', async () => {
    const before = await snapshotTree(rootfs);
    // An immutable file late in the archive: even root cannot move it, so the apply fails after earlier writes.
    await writeFile(join(rootfs, 'etc/locked'), 'immutable');
    sh('chattr', ['+i', join(rootfs, 'etc/locked')]);
    const snapshot = await snapshotTree(rootfs);
    await writeFile(tarFile, ustar([{ name: 'etc/passwd', type: '0', data: 'changed' }, { name: 'newdir', type: '5' }, { name: 'etc/locked', type: '0', data: 'x' }]));
    const err = await rejection(applyRootfsDiff({ rootfs, tarFile, deletedFilesFile })).finally(() => sh('chattr', ['-i', join(rootfs, 'etc/locked')]));
    expect(err.code).toBe('ROOTFS_IO');
    expect(err.message).toMatch(/renameat2 "locked -> \d+": EPERM$/);
    expect(await snapshotTree(rootfs)).toEqual(snapshot);
    expect((await readdir(rootfs)).filter((n) => n.startsWith(UNDO_DIR_PREFIX))).toEqual([]);
    expect(before.length).toBeLessThan(snapshot.length);
  });

  it('refuses a symlink planted at the backup directory, moving nothing from where it points', async () => {
    const r = await applyRootfsDiff({ rootfs, tarFile, deletedFilesFile, keepUndo: true });
    const journal = r.undo!;
    const outside = join(dir, 'outside');
    await rename(join(rootfs, journal.backupDir), outside);
    await symlink(outside, join(rootfs, journal.backupDir));
    const outsideBefore = await snapshotTree(outside);
    const err = await rejection(Promise.resolve().then(() => undoRootfsDiff(rootfs, journal)));
    expect(err.code).toBe('ROOTFS_UNDO_FAILED');
    expect(err.message).toMatch(/openat2 "\.thaw-undo-[0-9a-f]{32}": (ELOOP|ENOTDIR)$/);
    expect(await snapshotTree(outside)).toEqual(outsideBefore);
    expect(await readFile(join(rootfs, 'etc/passwd'), 'utf8')).toBe('evil:x:0:0::/:/bin/sh\n');
  });

  it('refuses a symlink planted on the path of a step, and a journal with path games', async () => {
    const r = await applyRootfsDiff({ rootfs, tarFile, deletedFilesFile, keepUndo: true });
    const journal = r.undo!;
    const outside = join(dir, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'f'), 'precious');
    await rm(join(rootfs, 'newdir'), { recursive: true });
    await symlink(outside, join(rootfs, 'newdir'));
    const err = await rejection(Promise.resolve().then(() => undoRootfsDiff(rootfs, journal)));
    expect([err.code, err.message]).toEqual(['ROOTFS_UNDO_FAILED', expect.stringMatching(/at created "newdir\/s".*(ELOOP|ENOTDIR)/)]);
    expect(await readFile(join(outside, 'f'), 'utf8')).toBe('precious');

    for (const bad of [
      { ...journal, backupDir: '../x' },
      { ...journal, steps: [{ op: 'created' as const, path: '../outside/f' }] },
      { ...journal, steps: [{ op: 'moved' as const, path: 'etc/passwd', backup: '../../x' }] },
    ]) {
      const e = await rejection(Promise.resolve().then(() => undoRootfsDiff(rootfs, bad)));
      expect([e.code, e.message]).toEqual(['ROOTFS_UNDO_FAILED', expect.stringMatching(/the undo journal is invalid/)]);
    }
    expect(await readFile(join(outside, 'f'), 'utf8')).toBe('precious');
  });

  it('undoes on an overlay, where a directory of the lower layer cannot be renamed (rebuilt instead)', async () => {
    const [lower, upper, work, merged] = ['lower', 'upper', 'work', 'merged'].map((d) => join(dir, d)) as [string, string, string, string];
    for (const d of [lower, upper, work, merged]) await mkdir(d);
    await fillImage(lower);
    sh('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work},redirect_dir=off`, merged]);
    try {
      const before = await snapshotTree(merged);
      const r = await applyRootfsDiff({ rootfs: merged, tarFile, deletedFilesFile, keepUndo: true });
      const moved = r.undo!.steps.find((s) => s.op === 'moved' && s.path === 'data/old');
      expect(moved).toMatchObject({ rebuilt: { mode: 0o755, rebuilt: { deep: { mode: 0o755 } } } });
      await expect(lstat(join(merged, 'data/old'))).rejects.toThrow(/ENOENT/);
      undoRootfsDiff(merged, r.undo!);
      expect(await snapshotTree(merged)).toEqual(before);
    } finally {
      sh('umount', [merged]);
    }
  });
});
