/**
 * Directory-fd filesystem calls through koffi: `openat2(2)` with its RESOLVE_* rules, and the `*at` calls that
 * act on one last component relative to a directory fd. Node's fs resolves every path from the root on each call,
 * following whatever symlinks it meets on the way; a tree that someone else can change (a container's rootfs, an
 * overlay upperdir) must instead be walked one opened directory at a time, each step checked by the kernel.
 *
 * Contract of every method: it throws a SysError (src/sys/errors.ts) whose errno was read on the calling thread
 * right after the call (koffi's errno() is per thread, and these are synchronous calls); EXDEV under
 * RESOLVE_BENEATH/RESOLVE_IN_ROOT becomes SYS_OUTSIDE_ROOT, ELOOP becomes SYS_SYMLINK_REFUSED. Fds returned are
 * O_CLOEXEC and owned by the caller (close them with `close`). Names are UTF-8 strings.
 *
 * Linux ≥ 5.6 (openat2), glibc ≥ 2.30 (getdents64). No module-level state: bind once with `FsAt.load()`.
 */
import koffi from 'koffi';
import { SysError, SysErrorCode } from './errors.js';

// Flags of open(2) (Linux, the generic values x86-64 and arm64 share).
export const O_RDONLY = 0;
export const O_WRONLY = 0o1;
export const O_RDWR = 0o2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_NOCTTY = 0o400;
export const O_TRUNC = 0o1000;
export const O_NONBLOCK = 0o4000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const O_PATH = 0o10000000;

// struct open_how.resolve (linux/openat2.h).
/** Refuse to cross a mount point (bind mounts included). */
export const RESOLVE_NO_XDEV = 0x01;
/** Refuse /proc/<pid>/fd-style magic links. */
export const RESOLVE_NO_MAGICLINKS = 0x02;
/** Refuse every symlink, in any component (the last one too, unlike O_NOFOLLOW it fails rather than opens it). */
export const RESOLVE_NO_SYMLINKS = 0x04;
/** Refuse any resolution that leaves dirfd's subtree (`..` above it, absolute symlinks): EXDEV. */
export const RESOLVE_BENEATH = 0x08;
/** Resolve as if dirfd were `/`: absolute symlinks and `..` are clamped inside it, like a chroot. */
export const RESOLVE_IN_ROOT = 0x10;

export const AT_FDCWD = -100;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const AT_REMOVEDIR = 0x200;
export const AT_SYMLINK_FOLLOW = 0x400;
export const AT_EMPTY_PATH = 0x1000;

export const RENAME_NOREPLACE = 1;
export const RENAME_EXCHANGE = 2;
export const RENAME_WHITEOUT = 4;

export const XATTR_CREATE = 1;
export const XATTR_REPLACE = 2;

/** d_type values of getdents64. */
export const DT = { UNKNOWN: 0, FIFO: 1, CHR: 2, DIR: 4, BLK: 6, REG: 8, LNK: 10, SOCK: 12 } as const;

/** The resolve rules for a path inside a tree used as a root: clamped inside, no /proc magic links. */
export const RESOLVE_ROOT_DEFAULT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
/** The resolve rules for walking a tree one may not leave and whose symlinks must never be followed. */
export const RESOLVE_WALK_DEFAULT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;

/** openat2 is 437 in the asm-generic table that x86-64 and arm64 both use. */
const SYS_OPENAT2: Partial<Record<string, number>> = { x64: 437, arm64: 437 };
const UTIME_OMIT = (1 << 30) - 2;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;

export interface DirEntry {
  name: string;
  /** One of DT; DT.UNKNOWN on filesystems that do not fill it (fstat the opened entry then). */
  type: number;
  ino: bigint;
}

/** A time for utimensat: whole seconds and nanoseconds, or `'omit'` to leave that time as it is. */
export type TimeSpec = { sec: number | bigint; nsec: number } | 'omit';

type Fn = (...args: unknown[]) => unknown;

export class FsAt {
  private readonly fn: Record<string, Fn>;
  private readonly errnoNames: Map<number, string>;
  private readonly openat2Nr: number | undefined;

  private constructor(lib: koffi.IKoffiLib) {
    const f = (proto: string): Fn => lib.func(proto) as Fn;
    this.fn = {
      syscall: f('intptr_t syscall(intptr_t number, ...)'),
      close: f('int close(int fd)'),
      mkdirat: f('int mkdirat(int dirfd, const char *path, uint32_t mode)'),
      unlinkat: f('int unlinkat(int dirfd, const char *path, int flags)'),
      renameat2: f('int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags)'),
      linkat: f('int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)'),
      symlinkat: f('int symlinkat(const char *target, int newdirfd, const char *linkpath)'),
      mknodat: f('int mknodat(int dirfd, const char *path, uint32_t mode, uint64_t dev)'),
      fchmod: f('int fchmod(int fd, uint32_t mode)'),
      fchown: f('int fchown(int fd, uint32_t uid, uint32_t gid)'),
      fchownat: f('int fchownat(int dirfd, const char *path, uint32_t uid, uint32_t gid, int flags)'),
      utimensat: f('int utimensat(int dirfd, const char *path, void *times, int flags)'),
      futimens: f('int futimens(int fd, void *times)'),
      readlinkat: f('intptr_t readlinkat(int dirfd, const char *path, void *buf, size_t size)'),
      fgetxattr: f('intptr_t fgetxattr(int fd, const char *name, void *value, size_t size)'),
      fsetxattr: f('int fsetxattr(int fd, const char *name, void *value, size_t size, int flags)'),
      fremovexattr: f('int fremovexattr(int fd, const char *name)'),
      flistxattr: f('intptr_t flistxattr(int fd, void *list, size_t size)'),
      getdents64: f('intptr_t getdents64(int fd, void *buf, size_t count)'),
      lseek: f('int64_t lseek(int fd, int64_t offset, int whence)'),
      ftruncate: f('int ftruncate(int fd, int64_t length)'),
    };
    this.errnoNames = new Map(Object.entries(koffi.os.errno).map(([name, nr]) => [nr, name] as [number, string]));
    this.openat2Nr = SYS_OPENAT2[process.arch];
  }

  static load(path = 'libc.so.6'): FsAt {
    return new FsAt(koffi.load(path));
  }

  /** errno number of a name in this OS's table (for callers comparing `SysError.errno`). */
  static errno(name: string): number {
    return koffi.os.errno[name] ?? -1;
  }

  /**
   * openat2(2): opens `path` relative to `dirFd` under the kernel's `resolve` rules. O_CLOEXEC is always added.
   * An absolute `path` is relative to dirFd's root under RESOLVE_IN_ROOT and refused under RESOLVE_BENEATH.
   */
  openat2(dirFd: number, path: string, flags: number, options: { resolve: number; mode?: number }): number {
    if (this.openat2Nr === undefined) {
      throw new SysError(SysErrorCode.UNSUPPORTED, `no openat2 syscall number for ${process.arch}`, {
        step: 'openat2',
        errno: 0,
        errnoName: '',
        evidence: { arch: process.arch },
      });
    }
    const how = Buffer.alloc(24);
    how.writeBigUInt64LE(BigInt((flags | O_CLOEXEC) >>> 0), 0);
    how.writeBigUInt64LE(BigInt(flags & O_CREAT ? (options.mode ?? 0o600) : 0), 8);
    how.writeBigUInt64LE(BigInt(options.resolve), 16);
    const fd = Number(this.fn.syscall!(this.openat2Nr, 'int', dirFd, 'const char *', path, 'void *', how, 'size_t', 24));
    if (fd < 0) throw this.failure('openat2', path, options.resolve);
    return fd;
  }

  /**
   * Opens `path` inside the tree `rootFd` stands for, as if it were `/` (RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS
   * unless `resolve` says otherwise): `..` and absolute symlinks stay inside it.
   */
  openInRoot(rootFd: number, path: string, flags: number, options: { resolve?: number; mode?: number } = {}): number {
    return this.openat2(rootFd, path, flags, { resolve: options.resolve ?? RESOLVE_ROOT_DEFAULT, mode: options.mode });
  }

  /**
   * Opens `path` below `dirFd` following no symlink at all (RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
   * RESOLVE_NO_MAGICLINKS unless `resolve` says otherwise): a symlink anywhere in it fails with SYS_SYMLINK_REFUSED.
   */
  openBeneath(dirFd: number, path: string, flags: number, options: { resolve?: number; mode?: number } = {}): number {
    return this.openat2(dirFd, path, flags | O_NOFOLLOW, { resolve: options.resolve ?? RESOLVE_WALK_DEFAULT, mode: options.mode });
  }

  close(fd: number): void {
    if ((this.fn.close!(fd) as number) !== 0) throw this.failure('close', String(fd));
  }

  mkdirat(dirFd: number, name: string, mode: number): void {
    this.check(this.fn.mkdirat!(dirFd, name, mode), 'mkdirat', name);
  }

  unlinkat(dirFd: number, name: string, flags = 0): void {
    this.check(this.fn.unlinkat!(dirFd, name, flags), 'unlinkat', name);
  }

  renameat2(oldDirFd: number, oldName: string, newDirFd: number, newName: string, flags = 0): void {
    this.check(this.fn.renameat2!(oldDirFd, oldName, newDirFd, newName, flags), 'renameat2', `${oldName} -> ${newName}`);
  }

  /** linkat(2); without AT_SYMLINK_FOLLOW a symlink `oldName` is linked itself, never its target. */
  linkat(oldDirFd: number, oldName: string, newDirFd: number, newName: string, flags = 0): void {
    this.check(this.fn.linkat!(oldDirFd, oldName, newDirFd, newName, flags), 'linkat', `${oldName} -> ${newName}`);
  }

  symlinkat(target: string, dirFd: number, name: string): void {
    this.check(this.fn.symlinkat!(target, dirFd, name), 'symlinkat', name);
  }

  mknodat(dirFd: number, name: string, mode: number, dev: bigint | number = 0): void {
    this.check(this.fn.mknodat!(dirFd, name, mode, BigInt(dev)), 'mknodat', name);
  }

  fchmod(fd: number, mode: number): void {
    this.check(this.fn.fchmod!(fd, mode), 'fchmod', String(fd));
  }

  fchown(fd: number, uid: number, gid: number): void {
    this.check(this.fn.fchown!(fd, uid, gid), 'fchown', String(fd));
  }

  /** fchownat(2); pass AT_SYMLINK_NOFOLLOW to own a symlink itself, AT_EMPTY_PATH with name '' for an O_PATH fd. */
  fchownat(dirFd: number, name: string, uid: number, gid: number, flags: number): void {
    this.check(this.fn.fchownat!(dirFd, name, uid, gid, flags), 'fchownat', name);
  }

  /** utimensat(2) (access time, modification time); AT_SYMLINK_NOFOLLOW sets a symlink's own times. */
  utimensat(dirFd: number, name: string, atime: TimeSpec, mtime: TimeSpec, flags: number): void {
    this.check(this.fn.utimensat!(dirFd, name, timespecs(atime, mtime), flags), 'utimensat', name);
  }

  futimens(fd: number, atime: TimeSpec, mtime: TimeSpec): void {
    this.check(this.fn.futimens!(fd, timespecs(atime, mtime)), 'futimens', String(fd));
  }

  /** The target of the symlink `name` in dirFd (name '' reads an O_PATH|O_NOFOLLOW fd of the symlink itself). */
  readlinkat(dirFd: number, name: string): string {
    for (let size = 256; ; size *= 4) {
      const buf = Buffer.alloc(size);
      const n = Number(this.fn.readlinkat!(dirFd, name, buf, size));
      if (n < 0) throw this.failure('readlinkat', name);
      if (n < size) return buf.subarray(0, n).toString('utf8');
      if (size > 65536) throw this.failure('readlinkat', name);
    }
  }

  /** The names of fd's extended attributes (fd must be a real open file, not O_PATH). */
  flistxattr(fd: number): string[] {
    const size = Number(this.fn.flistxattr!(fd, null, 0));
    if (size < 0) throw this.failure('flistxattr', String(fd));
    if (size === 0) return [];
    const buf = Buffer.alloc(size);
    const n = Number(this.fn.flistxattr!(fd, buf, size));
    if (n < 0) throw this.failure('flistxattr', String(fd));
    return buf.subarray(0, n).toString('utf8').split('\0').filter((name) => name !== '');
  }

  /** The value of attribute `name`, or null when fd has none of that name (ENODATA). */
  fgetxattr(fd: number, name: string): Buffer | null {
    for (let attempt = 0; attempt < 4; attempt++) {
      const size = Number(this.fn.fgetxattr!(fd, name, null, 0));
      if (size < 0) {
        if (koffi.errno() === FsAt.errno('ENODATA')) return null;
        throw this.failure('fgetxattr', name);
      }
      const buf = Buffer.alloc(size);
      const n = Number(this.fn.fgetxattr!(fd, name, buf, size));
      if (n >= 0) return buf.subarray(0, n);
      // ERANGE: the value grew between the two calls; ask its size again.
      if (koffi.errno() !== FsAt.errno('ERANGE')) throw this.failure('fgetxattr', name);
    }
    throw this.failure('fgetxattr', name);
  }

  fsetxattr(fd: number, name: string, value: Buffer, flags = 0): void {
    this.check(this.fn.fsetxattr!(fd, name, value, value.length, flags), 'fsetxattr', name);
  }

  fremovexattr(fd: number, name: string): void {
    this.check(this.fn.fremovexattr!(fd, name), 'fremovexattr', name);
  }

  /** Every entry of the directory fd (`.` and `..` left out), read from fd's current offset to its end. */
  readdir(fd: number): DirEntry[] {
    const entries: DirEntry[] = [];
    const buf = Buffer.alloc(32768);
    for (;;) {
      const n = Number(this.fn.getdents64!(fd, buf, buf.length));
      if (n < 0) throw this.failure('getdents64', String(fd));
      if (n === 0) return entries;
      for (let off = 0; off < n; ) {
        const reclen = buf.readUInt16LE(off + 16);
        const type = buf.readUInt8(off + 18);
        const end = buf.indexOf(0, off + 19);
        const name = buf.subarray(off + 19, end < 0 || end > off + reclen ? off + reclen : end).toString('utf8');
        if (name !== '.' && name !== '..') entries.push({ name, type, ino: buf.readBigUInt64LE(off) });
        off += reclen;
      }
    }
  }

  /**
   * The data extents of a file (SEEK_DATA/SEEK_HOLE), in order, as [offset, length]; a file without holes is
   * one extent. For sparse files: what a copy must write, and what it may leave as holes.
   */
  dataExtents(fd: number, size: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    const ENXIO = FsAt.errno('ENXIO');
    for (let pos = 0; pos < size; ) {
      const data = Number(this.fn.lseek!(fd, pos, SEEK_DATA));
      if (data < 0) {
        if (koffi.errno() === ENXIO) break; // only a hole up to the end
        throw this.failure('lseek(SEEK_DATA)', String(fd));
      }
      const hole = Number(this.fn.lseek!(fd, data, SEEK_HOLE));
      if (hole < 0) throw this.failure('lseek(SEEK_HOLE)', String(fd));
      const end = Math.min(hole, size);
      if (end > data) out.push([data, end - data]);
      pos = end;
    }
    return out;
  }

  ftruncate(fd: number, length: number): void {
    this.check(this.fn.ftruncate!(fd, length), 'ftruncate', String(fd));
  }

  private check(rc: unknown, call: string, path: string): void {
    if (Number(rc) !== 0) throw this.failure(call, path);
  }

  /** The SysError for the call that just failed; must run before anything else can touch this thread's errno. */
  private failure(call: string, path: string, resolve?: number): SysError {
    const errno = koffi.errno();
    const errnoName = this.errnoNames.get(errno) ?? `E${errno}`;
    const code =
      errnoName === 'EXDEV' && call === 'openat2'
        ? SysErrorCode.OUTSIDE_ROOT
        : errnoName === 'ELOOP'
          ? SysErrorCode.SYMLINK_REFUSED
          : errnoName === 'ENOSYS' && call === 'openat2'
            ? SysErrorCode.UNSUPPORTED
            : SysErrorCode.CALL_FAILED;
    return new SysError(code, `${call} ${JSON.stringify(path)}: ${errnoName}`, {
      step: call,
      errno,
      errnoName,
      evidence: resolve === undefined ? { path } : { path, resolve },
    });
  }
}

function timespecs(atime: TimeSpec, mtime: TimeSpec): Buffer {
  const buf = Buffer.alloc(32);
  [atime, mtime].forEach((t, i) => {
    buf.writeBigInt64LE(t === 'omit' ? 0n : BigInt(t.sec), i * 16);
    buf.writeBigInt64LE(BigInt(t === 'omit' ? UTIME_OMIT : t.nsec), i * 16 + 8);
  });
  return buf;
}
