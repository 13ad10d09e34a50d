import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, lstat, rm, symlink, writeFile, link, appendFile, chmod, chown, open, rename } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ThawError } from '../../src/errors.js';
import { createCollectingLogger } from '../../src/log.js';
import {
  applyRootfsDiff,
  captureRootfsDiff,
  compileExcludes,
  checkUpperdirUnderRoot,
  overlayfsSnapshotsDir,
  readContainerdUpperdir,
  readTarEntries,
  upperdirFromMount,
} from '../../src/restore-engine/rootfs-diff/index.js';
import { rejection } from '../helpers/rejection.js';
import { setXattr, snapshotTree, ustar, type HandEntry, type Node } from '../helpers/rootfs-tree.js';


const sh = (cmd: string, args: string[]): string => execFileSync(cmd, args, { encoding: 'utf8' });
interface Overlay {
  base: string;
  lower: string;
  upper: string;
  merged: string;
  mount: { upperdir: string };
  unmount: () => void;
}

/** A real overlay mount under a fresh temporary directory; `fill` populates the lower directory first. */
async function makeOverlay(fill: (lower: string) => Promise<void>, extraOptions = ''): Promise<Overlay> {
  const base = await mkdtemp(join(tmpdir(), 'thaw-ovl-'));
  const [lower, upper, work, merged] = ['lower', 'upper', 'work', 'merged'].map((d) => join(base, d)) as [string, string, string, string];
  for (const d of [lower, upper, work, merged]) await mkdir(d);
  await fill(lower);
  sh('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work}${extraOptions}`, merged]);
  const mount = { upperdir: upper };
  return { base, lower, upper, merged, mount, unmount: () => sh('umount', [merged]) };
}

describe("the upperdir from containerd's record", () => {
  it('reads the one upperdir= of an overlay mount, and refuses other mounts', () => {
    const options = ['index=off', 'workdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/work',
      'upperdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/fs', 'lowerdir=/a:/b'];
    expect(upperdirFromMount({ type: 'overlay', source: 'overlay', options })).toBe('/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/fs');
    const refused = (m: { type: string; source: string; options: string[] }): string => {
      try {
        upperdirFromMount(m);
      } catch (e) {
        return (e as ThawError).code;
      }
      return 'accepted';
    };
    expect(refused({ type: 'bind', source: '/x', options: ['upperdir=/u'] })).toBe('ROOTFS_NOT_OVERLAY');
    expect(refused({ type: 'overlay', source: 'overlay', options: ['ro', 'lowerdir=/a:/b'] })).toBe('ROOTFS_NOT_OVERLAY');
    expect(refused({ type: 'overlay', source: 'overlay', options: ['upperdir=/u1', 'upperdir=/u2'] })).toBe('ROOTFS_NOT_OVERLAY');
    expect(refused({ type: 'overlay', source: 'overlay', options: ['upperdir='] })).toBe('ROOTFS_NOT_OVERLAY');
  });

  describe('under the snapshotter root', () => {
    let root: string;
    let snapshots: string;
    let outside: string;
    beforeAll(async () => {
      root = await mkdtemp(join(tmpdir(), 'thaw-ctrd-root-'));
      snapshots = overlayfsSnapshotsDir(root);
      outside = await mkdtemp(join(tmpdir(), 'thaw-ctrd-outside-'));
      await mkdir(join(snapshots, '7', 'fs'), { recursive: true });
      await mkdir(join(outside, 'fs'));
      // A snapshot directory that is a symlink to a host directory, and one whose fs is.
      await symlink(outside, join(snapshots, '8'));
      await mkdir(join(snapshots, '9'));
      await symlink(join(outside, 'fs'), join(snapshots, '9', 'fs'));
    });
    afterAll(async () => {
      await rm(root, { recursive: true, force: true });
      await rm(outside, { recursive: true, force: true });
    });
    const code = async (upperdir: string): Promise<string> => {
      try {
        return await checkUpperdirUnderRoot(upperdir, snapshots);
      } catch (e) {
        return (e as ThawError).code;
      }
    };

    it('accepts <root>/io.containerd.snapshotter.v1.overlayfs/snapshots/<id>/fs', async () => {
      expect(snapshots).toBe(join(root, 'io.containerd.snapshotter.v1.overlayfs', 'snapshots'));
      expect(await code(join(snapshots, '7', 'fs'))).toBe(join(snapshots, '7', 'fs'));
    });

    it('refuses a symlinked upperdir or snapshot dir, "..", a path outside, and anything not <id>/fs', async () => {
      for (const bad of [
        `${snapshots}/8/fs`, // the snapshot dir is a symlink out
        `${snapshots}/9/fs`, // the fs dir is a symlink out
        `${snapshots}/7/fs/../../../../..${outside}/fs`, // ".." climbing out
        `${snapshots}/7/../7/fs`, // ".." even when it lands inside
        `${snapshots}/7/./fs`,
        `${snapshots}//7/fs`,
        `${outside}/fs`, // outside the root
        `${snapshots}/7`, // not the fs dir
        `${snapshots}/7/fs/etc`, // below it
        `${snapshots}/x/fs`, // not a snapshot id
        `${snapshots}/12/fs`, // does not exist
        'relative/7/fs',
      ]) {
        expect([bad, await code(bad)]).toEqual([bad, 'ROOTFS_UPPERDIR_UNTRUSTED']);
      }
    });

    it('refuses a containerd that does not answer, with its cause', async () => {
      const err = await rejection(readContainerdUpperdir('c1', { socket: join(root, 'no-such.sock'), root, timeoutMs: 2_000 }));
      expect(err.code).toBe('ROOTFS_CONTAINERD_QUERY_FAILED');
      expect(err.message).toContain('Containers/Get');
    });
  });

  it('matches the default exclusions', () => {
    const excluded = compileExcludes(['proc', 'sys', 'dev', '**/__pycache__', '**/*.pyc', '**/.cache/huggingface']);
    expect(['proc', 'dev', 'a/__pycache__', '__pycache__', 'x/y.pyc', 'root/.cache/huggingface'].filter(excluded)).toHaveLength(6);
    expect(['proc2', 'usr/proc', 'a/__pycache__x', 'x/y.pyc.txt', 'root/.cache/pip', 'devices'].filter(excluded)).toEqual([]);
  });
});

describe('rootfs diff on a real overlay', () => {
  let ov: Overlay;
  let work: string;
  const EXCLUDED = compileExcludes(['proc', 'dev', '**/__pycache__', '**/*.pyc']);

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'thaw-rootfs-'));
    ov = await makeOverlay(async (lower) => {
      for (const d of ['etc', 'gone-dir/sub', 'opaque', 'becomes-file', 'bin', 'usr/lib', 'srv']) await mkdir(join(lower, d), { recursive: true });
      await writeFile(join(lower, 'etc/keep.conf'), 'keep\n');
      await writeFile(join(lower, 'etc/modify.conf'), 'old\n');
      await writeFile(join(lower, 'etc/remove.conf'), 'remove me\n');
      await writeFile(join(lower, 'gone-dir/a'), 'a');
      await writeFile(join(lower, 'gone-dir/sub/b'), 'b');
      await writeFile(join(lower, 'opaque/old1'), '1');
      await writeFile(join(lower, 'opaque/old2'), '2');
      await writeFile(join(lower, 'becomes-file/inner'), 'inner');
      await writeFile(join(lower, 'file-becomes-dir'), 'f');
      await writeFile(join(lower, 'bin/tool'), '#!/bin/sh\n');
      await chmod(join(lower, 'bin/tool'), 0o755);
      await writeFile(join(lower, 'usr/lib/libx.so'), 'x');
      await symlink('usr/lib', join(lower, 'lib'));
    });
    const m = ov.merged;
    await appendFile(join(m, 'etc/modify.conf'), 'new\n');
    await rm(join(m, 'etc/remove.conf'));
    await rm(join(m, 'gone-dir'), { recursive: true });
    await rm(join(m, 'opaque'), { recursive: true });
    await mkdir(join(m, 'opaque'));
    await writeFile(join(m, 'opaque/new'), 'new');
    await rm(join(m, 'becomes-file'), { recursive: true });
    await writeFile(join(m, 'becomes-file'), 'now a file');
    await rm(join(m, 'file-becomes-dir'));
    await mkdir(join(m, 'file-becomes-dir'));
    await writeFile(join(m, 'file-becomes-dir/x'), 'x');
    await chmod(join(m, 'bin/tool'), 0o700);
    await writeFile(join(m, 'lib/newlib.so'), 'through the symlink');
    await mkdir(join(m, 'srv/app/nested/deeper'), { recursive: true });
    await writeFile(join(m, 'srv/app/data.bin'), randomBytes(300_000));
    await writeFile(join(m, 'srv/app/nested/deeper/name with spaces\nand newline'), 'odd name');
    await writeFile(join(m, 'srv/app/-starts-with-dash'), 'dash');
    await symlink('/etc/keep.conf', join(m, 'srv/app/abs-link'));
    await writeFile(join(m, 'srv/app/hard1'), 'linked');
    await link(join(m, 'srv/app/hard1'), join(m, 'srv/app/hard2'));
    sh('mkfifo', [join(m, 'srv/app/fifo')]);
    await writeFile(join(m, 'srv/app/script.sh'), 'echo hi\n');
    await chmod(join(m, 'srv/app/script.sh'), 0o750);
    await chown(join(m, 'srv/app/script.sh'), 1234, 5678);
    setXattr(join(m, 'srv/app/data.bin'), 'user.thaw', 'hello');
    const sparse = await open(join(m, 'srv/app/sparse'), 'w');
    await sparse.write(Buffer.from('tail'), 0, 4, 40 * 1024 * 1024);
    await sparse.close();
    await mkdir(join(m, 'srv/app/__pycache__'));
    await writeFile(join(m, 'srv/app/__pycache__/m.cpython-312.pyc'), 'bytecode');
    await writeFile(join(m, 'srv/app/mod.pyc'), 'bytecode');
    await mkdir(join(m, 'proc'));
    await writeFile(join(m, 'proc/not-really'), 'x');
  });

  afterAll(async () => {
    ov?.unmount();
    await rm(ov.base, { recursive: true, force: true });
    await rm(work, { recursive: true, force: true });
  });

  it('captures the upperdir and replays it onto a copy of the lower directory, identical to the merged view', async () => {
    const tarFile = join(work, 'rootfs-diff.tar');
    const deletedFilesFile = join(work, 'deleted-files.json');
    expect(ov.mount.upperdir).toBe(ov.upper);
    const captured = await captureRootfsDiff({ upperdir: ov.mount.upperdir, tarFile, deletedFilesFile });
    // Whiteouts, and opaque directories: 'opaque' (removed and recreated) and 'file-becomes-dir' (a directory
    // created over a whiteout is opaque too). 'becomes-file/inner' is gone with its directory: no whiteout.
    expect(captured.deleted).toEqual(['etc/remove.conf', 'file-becomes-dir', 'gone-dir', 'opaque']);
    expect(JSON.parse(await readFile(deletedFilesFile, 'utf8'))).toEqual(captured.deleted);
    expect((await lstat(tarFile)).mode & 0o777).toBe(0o600);

    const members = (await readTarEntries(tarFile)).map((e) => e.path);
    expect(members).not.toContain('./etc/remove.conf'); // whiteouts never become device nodes
    expect(members.some((p) => p.includes('__pycache__') || p.endsWith('.pyc') || p.startsWith('./proc'))).toBe(false);
    expect(members).toContain('./srv/app/sparse');
    expect(captured.tarBytes).toBeLessThan(5 * 1024 * 1024); // the 40 MiB sparse file stayed sparse

    const target = join(work, 'target');
    sh('cp', ['-a', ov.lower, target]);
    const logger = createCollectingLogger();
    const applied = await applyRootfsDiff({ rootfs: target, tarFile, deletedFilesFile, logger });
    expect(applied.skipped).toEqual([]);

    const want = await snapshotTree(ov.merged, EXCLUDED);
    const got = await snapshotTree(target);
    expect(got).toEqual(want);
    expect(want.find((n) => n.path === 'srv/app/data.bin')?.xattrs).toContain('user.thaw');
    expect(want.find((n) => n.path === 'srv/app/hard2')?.linkedTo).toBe('srv/app/hard1');
    expect(want.find((n) => n.path === 'srv/app/script.sh')).toMatchObject({ mode: '750', owner: '1234:5678' });

    // Idempotent: the hook may run again after a runtime retry.
    await applyRootfsDiff({ rootfs: target, tarFile, deletedFilesFile });
    expect(await snapshotTree(target)).toEqual(want);
  });

  it('refuses an upperdir whose renamed directory lives in a lower layer (redirect_dir)', async () => {
    const redirected = await makeOverlay(async (lower) => {
      await mkdir(join(lower, 'olddir'));
      await writeFile(join(lower, 'olddir/f'), 'f');
    }, ',redirect_dir=on');
    try {
      await rename(join(redirected.merged, 'olddir'), join(redirected.merged, 'newdir'));
      const err = await rejection(
        captureRootfsDiff({ upperdir: redirected.upper, tarFile: join(work, 'r.tar'), deletedFilesFile: join(work, 'r.json') }),
      );
      expect([err.code, err.message]).toEqual([
        'ROOTFS_DIFF_UNSUPPORTED',
        'capture rootfs diff: newdir is a directory renamed with overlay redirect_dir (from olddir); its content is not in the upperdir',
      ]);
    } finally {
      redirected.unmount();
      await rm(redirected.base, { recursive: true, force: true });
    }
  });
});

describe('unsafe rootfs diffs', () => {
  let dir: string;
  let rootfs: string;
  let outside: string;
  let snapshotBefore: Node[];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-unsafe-'));
    rootfs = join(dir, 'rootfs');
    outside = join(dir, 'outside');
    await mkdir(join(rootfs, 'etc'), { recursive: true });
    await mkdir(outside);
    await writeFile(join(outside, 'precious'), 'do not touch');
    await writeFile(join(rootfs, 'etc/passwd'), 'root:x:0:0::/root:/bin/sh\n');
    // An image symlink pointing out of the rootfs, as absolute symlinks do when seen from the host.
    await symlink(outside, join(rootfs, 'lib'));
    await writeFile(join(dir, 'none.json'), '[]');
    snapshotBefore = await snapshotTree(dir);
  });
  afterAll(async () => rm(dir, { recursive: true, force: true }));

  async function tryApply(entries: HandEntry[], deleted = '[]'): Promise<ThawError> {
    const tarFile = join(dir, 'evil.tar');
    const deletedFilesFile = join(dir, 'evil.json');
    await writeFile(tarFile, ustar(entries));
    await writeFile(deletedFilesFile, deleted);
    const err = await rejection(applyRootfsDiff({ rootfs, tarFile, deletedFilesFile }));
    await rm(tarFile);
    await rm(deletedFilesFile);
    // Nothing written anywhere: not in the rootfs, not outside it.
    expect(await snapshotTree(dir)).toEqual(snapshotBefore);
    return err;
  }

  it.each<[string, HandEntry[], RegExp]>([
    ['a .. entry', [{ name: 'ok', type: '0', data: 'fine' }, { name: '../evil', type: '0', data: 'x' }], /^validate rootfs diff: entry "\.\.\/evil" has a '\.\.' segment; the diff is refused$/],
    ['a nested .. entry', [{ name: './etc/../../evil', type: '0', data: 'x' }], /entry "\.\/etc\/\.\.\/\.\.\/evil" has a '\.\.' segment/],
    ['an absolute entry', [{ name: '/etc/evil', type: '0', data: 'x' }], /entry "\/etc\/evil" is an absolute path/],
    ['a write through a symlink of the archive', [{ name: 'esc', type: '2', linkname: '/tmp' }, { name: 'esc/evil', type: '0', data: 'x' }], /entry "esc\/evil" lies under "esc", a symlink of the same archive/],
    ['a write through a relative symlink of the archive', [{ name: 'up', type: '2', linkname: '../..' }, { name: 'up/outside/evil', type: '0', data: 'x' }], /lies under "up", a symlink/],
    ['a hard link out of the rootfs', [{ name: 'h', type: '1', linkname: '../outside/precious' }], /entry "h" is a hard link to "\.\.\/outside\/precious", which has a '\.\.' segment/],
    ['a hard link to an absolute path', [{ name: 'h', type: '1', linkname: '/etc/shadow' }], /is a hard link to "\/etc\/shadow", which is absolute/],
    ['a hard link to a file of the rootfs', [{ name: 'h', type: '1', linkname: 'etc/passwd' }], /which is not an earlier file of the archive/],
    ['a device node', [{ name: 'dev-null', type: '3' }], /entry "dev-null" is a device node/],
    ['a duplicate entry', [{ name: 'x', type: '2', linkname: '/etc/passwd' }, { name: 'x', type: '0', data: 'x' }], /entry "x" appears twice/],
    ['a write through a symlink of the rootfs', [{ name: 'lib/evil.so', type: '0', data: 'x' }], /^apply rootfs diff: entry "lib\/evil\.so" would be written through "lib", a symlink in the rootfs; the diff is refused$/],
  ])('refuses %s, writing nothing', async (_label, entries, message) => {
    const err = await tryApply(entries);
    expect(err.code).toBe('ROOTFS_DIFF_UNSAFE');
    expect(err.message).toMatch(message);
  });

  it('refuses deletions that leave the rootfs', async () => {
    const err = await tryApply([{ name: 'ok', type: '0', data: 'fine' }], '["../outside/precious"]');
    expect([err.code, err.message]).toEqual([
      'ROOTFS_DIFF_UNSAFE',
      `read rootfs diff deletions: deleted-files.json[0] "../outside/precious" has a '..' segment; the diff is refused`,
    ]);
    expect((await tryApply([], '["/etc/passwd"]')).message).toMatch(/deleted-files\.json\[0\] "\/etc\/passwd" is absolute/);
  });

  it('refuses a corrupt archive', async () => {
    const tarFile = join(dir, 'corrupt.tar');
    await writeFile(tarFile, randomBytes(4096));
    const err = await rejection(applyRootfsDiff({ rootfs, tarFile, deletedFilesFile: join(dir, 'none.json') }));
    expect(err.code).toBe('ROOTFS_DIFF_INVALID');
    expect(err.message).toMatch(/bad header checksum \(not a tar, or corrupt\) \(at byte 0\)$/);
    const truncated = ustar([{ name: 'big', type: '0', data: 'x'.repeat(2000) }]).subarray(0, 1024);
    await writeFile(tarFile, truncated);
    expect((await rejection(applyRootfsDiff({ rootfs, tarFile, deletedFilesFile: join(dir, 'none.json') }))).message).toMatch(/truncated/);
    await rm(tarFile);
  });

  it('skips a deletion through a symlink of the rootfs, and replaces that symlink when the diff has a directory there', async () => {
    const copy = join(dir, 'copy');
    sh('cp', ['-a', rootfs, copy]);
    try {
      const tarFile = join(dir, 'ok.tar');
      const deletedFilesFile = join(dir, 'ok.json');
      await writeFile(deletedFilesFile, '["lib/precious"]');
      // A file of the image that is a symlink out of the rootfs, where the diff has a regular file.
      await symlink(join(outside, 'precious'), join(copy, 'etc/link-out'));
      await writeFile(
        tarFile,
        ustar([
          { name: 'lib', type: '5' },
          { name: 'lib/new.so', type: '0', data: 'inside' },
          { name: 'etc/link-out', type: '0', data: 'replaced, not written through' },
        ]),
      );
      const logger = createCollectingLogger();
      const result = await applyRootfsDiff({ rootfs: copy, tarFile, deletedFilesFile, logger });
      expect(result.skipped).toEqual(['lib/precious']);
      expect(logger.lines.find((l) => l.level === 'warn')?.fields).toMatchObject({ path: 'lib/precious', at: 'lib', what: 'a symlink' });
      expect((await lstat(join(copy, 'lib'))).isDirectory()).toBe(true);
      expect(await readFile(join(copy, 'lib/new.so'), 'utf8')).toBe('inside');
      expect(await readdir(outside)).toEqual(['precious']);
      expect(await readFile(join(outside, 'precious'), 'utf8')).toBe('do not touch');
      expect((await lstat(join(copy, 'etc/link-out'))).isFile()).toBe(true);
      expect(await readFile(join(copy, 'etc/link-out'), 'utf8')).toBe('replaced, not written through');
      await rm(tarFile);
      await rm(deletedFilesFile);
    } finally {
      await rm(copy, { recursive: true, force: true });
    }
  });
});

describe('rootfs diff speed', () => {
  it('captures and applies a 100 MB diff', async () => {
    const ov = await makeOverlay(async (lower) => {
      await mkdir(join(lower, 'models'));
      for (let i = 0; i < 50; i++) await writeFile(join(lower, `models/base-${i}`), 'x');
    });
    const work = await mkdtemp(join(tmpdir(), 'thaw-speed-'));
    try {
      const chunk = randomBytes(1024 * 1024);
      for (let d = 0; d < 10; d++) {
        await mkdir(join(ov.merged, `models/shard-${d}`), { recursive: true });
        for (let f = 0; f < 10; f++) await writeFile(join(ov.merged, `models/shard-${d}/part-${f}.bin`), chunk);
      }
      for (let i = 0; i < 500; i++) await writeFile(join(ov.merged, `models/small-${i}.json`), `{"i":${i}}`);
      for (let i = 0; i < 25; i++) await rm(join(ov.merged, `models/base-${i}`));
      sh('sync', []);
      const tarFile = join(work, 'rootfs-diff.tar');
      const deletedFilesFile = join(work, 'deleted-files.json');
      const captured = await captureRootfsDiff({ upperdir: ov.upper, tarFile, deletedFilesFile });
      const target = join(work, 'target');
      sh('cp', ['-a', ov.lower, target]);
      const applied = await applyRootfsDiff({ rootfs: target, tarFile, deletedFilesFile });
      console.log(
        `rootfs diff of ${(captured.tarBytes / 1e6).toFixed(1)} MB, ${captured.entries} entries, ${captured.deleted.length} deletions: ` +
          `capture ${captured.ms.toFixed(0)} ms, apply ${applied.ms.toFixed(0)} ms ` +
          `(validate ${applied.phaseMs.validate.toFixed(0)}, delete+prepare ${applied.phaseMs.delete.toFixed(0)}, extract ${applied.phaseMs.extract.toFixed(0)})`,
      );
      expect(captured.tarBytes).toBeGreaterThan(100 * 1024 * 1024);
      expect(applied.entries).toBe(captured.entries);
      expect(await snapshotTree(target)).toEqual(await snapshotTree(ov.merged));
    } finally {
      ov.unmount();
      await rm(ov.base, { recursive: true, force: true });
      await rm(work, { recursive: true, force: true });
    }
  });
});
