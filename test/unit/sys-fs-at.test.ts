import { closeSync, fstatSync, mkdirSync, mkdtempSync, readFileSync, readSync, rmSync, symlinkSync, writeFileSync, lstatSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import { SysError, SysErrorCode } from '../../src/sys/errors.js';
import {
  AT_REMOVEDIR,
  AT_SYMLINK_NOFOLLOW,
  FsAt,
  O_CREAT,
  O_DIRECTORY,
  O_EXCL,
  O_NOFOLLOW,
  O_PATH,
  O_RDONLY,
  O_WRONLY,
  RENAME_EXCHANGE,
  RESOLVE_BENEATH,
  RESOLVE_IN_ROOT,
  RESOLVE_NO_SYMLINKS,
} from '../../src/sys/fs-at.js';

// Attacks on the resolution rules themselves: a tree (`root/`) full of symlinks that point at a canary outside it,
// opened the ways thaw opens a container's rootfs. Every one must land inside the tree or fail; the canary outside
// is read and written by nothing.
describe('sys/fs-at: openat2 and the *at calls', () => {
  const fs = FsAt.load();
  let base: string;
  let root: string;
  let rootFd: number;
  const canary = 'host canary: never read, never written';

  const readAll = (fd: number): string => {
    const buf = Buffer.alloc(4096);
    const n = readSync(fd, buf, 0, buf.length, 0);
    return buf.subarray(0, n).toString('utf8');
  };
  const expectCode = (fn: () => unknown, code: string, errnoName?: string): SysError => {
    try {
      fn();
    } catch (err) {
      expect(isThawError(err, code), String(err)).toBe(true);
      if (errnoName) expect((err as SysError).errnoName).toBe(errnoName);
      return err as SysError;
    }
    throw new Error(`expected ${code}`);
  };

  beforeAll(() => {
    base = mkdtempSync(join(tmpdir(), 'thaw-fs-at-'));
    mkdirSync(join(base, 'host'));
    writeFileSync(join(base, 'host', 'secret'), canary);
    root = join(base, 'root');
    mkdirSync(join(root, 'etc'), { recursive: true });
    mkdirSync(join(root, 'host'));
    writeFileSync(join(root, 'etc', 'secret'), 'inside');
    writeFileSync(join(root, 'host', 'secret'), 'inside host');
    // Absolute and relative escapes, and a link to the parent's tree.
    symlinkSync(join(base, 'host'), join(root, 'abs'));
    // The same absolute path, inside the root: where `abs` must land.
    mkdirSync(join(root, base, 'host'), { recursive: true });
    writeFileSync(join(root, base, 'host', 'secret'), 'inside mirror');
    symlinkSync('../../host', join(root, 'etc', 'rel'));
    symlinkSync('/', join(root, 'slash'));
    rootFd = fs.openat2(-100, root, O_RDONLY | O_DIRECTORY, { resolve: 0 });
  });
  afterAll(() => {
    closeSync(rootFd);
    expect(readFileSync(join(base, 'host', 'secret'), 'utf8')).toBe(canary);
    rmSync(base, { recursive: true, force: true });
  });

  it('resolves an absolute symlink to a host directory inside the root (RESOLVE_IN_ROOT)', () => {
    const fd = fs.openInRoot(rootFd, 'abs/secret', O_RDONLY);
    expect(readAll(fd)).toBe('inside mirror');
    closeSync(fd);
    // `/` inside the root is the root.
    const viaSlash = fs.openInRoot(rootFd, 'slash/etc/secret', O_RDONLY);
    expect(readAll(viaSlash)).toBe('inside');
    closeSync(viaSlash);
    // Without its mirror inside the root, the same link finds nothing: ENOENT, never the host file.
    rmSync(join(root, base, 'host', 'secret'));
    expectCode(() => fs.openInRoot(rootFd, 'abs/secret', O_RDONLY), SysErrorCode.CALL_FAILED, 'ENOENT');
  });

  it('keeps `..` inside the root, through a path and through a relative symlink', () => {
    const fd = fs.openInRoot(rootFd, '../../../../host/secret', O_RDONLY);
    expect(readAll(fd)).toBe('inside host');
    closeSync(fd);
    const viaLink = fs.openInRoot(rootFd, 'etc/rel/secret', O_RDONLY);
    expect(readAll(viaLink)).toBe('inside host');
    closeSync(viaLink);
  });

  it('refuses to leave the tree under RESOLVE_BENEATH (`..`, absolute symlinks)', () => {
    expectCode(() => fs.openat2(rootFd, '../host/secret', O_RDONLY, { resolve: RESOLVE_BENEATH }), SysErrorCode.OUTSIDE_ROOT);
    expectCode(() => fs.openat2(rootFd, 'abs/secret', O_RDONLY, { resolve: RESOLVE_BENEATH }), SysErrorCode.OUTSIDE_ROOT);
    expectCode(() => fs.openat2(rootFd, '/etc/secret', O_RDONLY, { resolve: RESOLVE_BENEATH }), SysErrorCode.OUTSIDE_ROOT);
  });

  it('refuses every symlink under RESOLVE_NO_SYMLINKS, in the middle and at the end', () => {
    expectCode(() => fs.openBeneath(rootFd, 'etc/rel/secret', O_RDONLY), SysErrorCode.SYMLINK_REFUSED, 'ELOOP');
    expectCode(() => fs.openBeneath(rootFd, 'slash', O_RDONLY), SysErrorCode.SYMLINK_REFUSED, 'ELOOP');
    expectCode(
      () => fs.openat2(rootFd, 'abs/secret', O_RDONLY, { resolve: RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS }),
      SysErrorCode.SYMLINK_REFUSED,
    );
    const fd = fs.openBeneath(rootFd, 'etc/secret', O_RDONLY);
    expect(readAll(fd)).toBe('inside');
    closeSync(fd);
  });

  it('creates, links, renames, exchanges and deletes only inside the root, on the last component', () => {
    const etc = fs.openInRoot(rootFd, 'slash/etc', O_RDONLY | O_DIRECTORY);
    const fd = fs.openat2(etc, 'new', O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, { resolve: RESOLVE_BENEATH, mode: 0o640 });
    fs.fchmod(fd, 0o604);
    fs.futimens(fd, { sec: 1_000_000, nsec: 5 }, { sec: 2_000_000, nsec: 7 });
    closeSync(fd);
    const st = lstatSync(join(root, 'etc', 'new'));
    expect(st.mode & 0o777).toBe(0o604);
    expect(lstatSync(join(root, "etc", "new"), { bigint: true }).mtimeNs).toBe(2_000_000_000_000_007n);
    fs.mkdirat(etc, 'dir', 0o755);
    fs.symlinkat('/host', etc, 'link');
    expect(readlinkSync(join(root, 'etc', 'link'))).toBe('/host');
    expect(fs.readlinkat(etc, 'link')).toBe('/host');
    fs.linkat(etc, 'new', etc, 'hard');
    expect(lstatSync(join(root, 'etc', 'hard')).ino).toBe(st.ino);
    fs.renameat2(etc, 'dir', etc, 'link', RENAME_EXCHANGE);
    expect(lstatSync(join(root, 'etc', 'dir')).isSymbolicLink()).toBe(true);
    // The symlink is owned and timed itself, never its target.
    fs.fchownat(etc, 'dir', 0, 0, AT_SYMLINK_NOFOLLOW);
    fs.utimensat(etc, 'dir', 'omit', { sec: 3, nsec: 0 }, AT_SYMLINK_NOFOLLOW);
    expect(lstatSync(join(root, 'etc', 'dir')).mtimeMs).toBe(3000);
    fs.unlinkat(etc, 'dir');
    fs.unlinkat(etc, 'link', AT_REMOVEDIR);
    fs.unlinkat(etc, 'hard');
    expectCode(() => fs.unlinkat(etc, 'hard'), SysErrorCode.CALL_FAILED, 'ENOENT');
    const names = fs.readdir(fs.openInRoot(rootFd, 'etc', O_RDONLY | O_DIRECTORY)).map((e) => e.name).sort();
    expect(names).toEqual(['new', 'rel', 'secret']);
    expect(fs.readdir(rootFd).map((e) => e.name).sort()).toEqual(['abs', 'etc', 'host', 'slash', base.split('/')[1]!].sort());
    closeSync(etc);
  });

  it('reads and writes extended attributes on the fd it opened', () => {
    const fd = fs.openBeneath(rootFd, 'etc/secret', O_RDONLY);
    fs.fsetxattr(fd, 'user.thaw', Buffer.from('v1'));
    expect(fs.flistxattr(fd)).toContain('user.thaw');
    expect(fs.fgetxattr(fd, 'user.thaw')?.toString()).toBe('v1');
    expect(fs.fgetxattr(fd, 'user.absent')).toBeNull();
    closeSync(fd);
  });

  it('opens a symlink itself with O_PATH|O_NOFOLLOW, so fstat and readlink see the link, not its target', () => {
    const fd = fs.openat2(rootFd, 'abs', O_PATH | O_NOFOLLOW, { resolve: RESOLVE_BENEATH });
    expect(fstatSync(fd).isSymbolicLink()).toBe(true);
    expect(fs.readlinkat(fd, '')).toBe(join(base, 'host'));
    closeSync(fd);
  });
});
