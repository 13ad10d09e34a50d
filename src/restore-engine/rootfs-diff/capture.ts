/**
 * Capture: the container's overlay upperdir, walked and archived by thaw itself from directory fds.
 *
 * Every step of the walk is an `openat2` relative to the directory fd of the step before, with
 * RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS and O_NOFOLLOW: an entry is first opened as O_PATH
 * (a symlink is then the symlink itself, archived with its target as text), its type and inode read with fstat
 * on that fd, and a directory or file is then opened for reading under the same rules and checked to be the same
 * inode. A directory swapped for a symlink between the two opens fails the capture (ROOTFS_DIFF_UNSAFE); no
 * open ever follows a symlink, so no byte outside the upperdir can reach the archive. The archive is written
 * in-process (tar-format.ts); no external program runs.
 *
 * Archived: directories, regular files (sparse ones as PAX 1.0 sparse), symlinks, FIFOs, hard links between
 * files of the upperdir; user/trusted/security xattrs but not overlay's own or SELinux labels (xattrs of
 * symlinks are not carried). Whiteouts (char 0:0) and opaque directories go to deleted-files.json; other
 * device nodes and sockets are left out with a warning; redirect_dir and metacopy are refused
 * (ROOTFS_DIFF_UNSUPPORTED: their content is not in the upperdir).
 */
import { fstatSync, type BigIntStats, write as writeCb, read as readCb } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { isThawError } from '../../errors.js';
import { silentLogger, type Logger } from '../../log.js';
import { SysErrorCode } from '../../sys/errors.js';
import { FsAt, O_CREAT, O_DIRECTORY, O_NOFOLLOW, O_NONBLOCK, O_PATH, O_RDONLY, O_TRUNC, O_WRONLY, RESOLVE_WALK_DEFAULT } from '../../sys/fs-at.js';
import { RootfsError, RootfsErrorCode, throwIfAborted } from './errors.js';
import { BLOCK, encodeHeader, encodeSparseMap, END_OF_ARCHIVE, type TarEntryInput } from './tar-format.js';

const write = promisify(writeCb);
const read = promisify(readCb);

/** Dynamo's exclusions; `**​/` matches at any depth, `*` within one path segment. */
export const DEFAULT_ROOTFS_EXCLUDES: readonly string[] = ['proc', 'sys', 'dev', '**/__pycache__', '**/*.pyc', '**/.cache/huggingface'];
/** xattrs never carried: overlay's own bookkeeping (meaningless, and refused, in another overlay) and SELinux labels (the target's policy sets them). */
export function xattrCarried(name: string): boolean {
  return !name.startsWith('trusted.overlay.') && !name.startsWith('user.overlay.') && name !== 'security.selinux';
}
const OUT_BUFFER_BYTES = 1024 * 1024;

/** Turns the exclusion globs into one matcher of relative paths. */
export function compileExcludes(patterns: readonly string[]): (relPath: string) => boolean {
  const regexes = patterns.map((p) => {
    let anyDepth = false;
    let body = p;
    if (body.startsWith('**/')) {
      anyDepth = true;
      body = body.slice(3);
    }
    const re = body.replace(/[.+^${}()|[\]\\?]/g, '\\$&').replace(/\*/g, '[^/]*');
    return new RegExp(anyDepth ? `(?:^|/)${re}$` : `^${re}$`);
  });
  return (relPath) => regexes.some((r) => r.test(relPath));
}

export interface CaptureRootfsDiffOptions {
  /** The source container's overlay upperdir (host path; trusted: it comes from the host's own records). */
  upperdir: string;
  /** Where to write rootfs-diff.tar and deleted-files.json (the pending checkpoint's paths). */
  tarFile: string;
  deletedFilesFile: string;
  excludes?: readonly string[];
  signal?: AbortSignal;
  logger?: Logger;
}

export interface CaptureRootfsDiffResult {
  /** Entries archived (directories included). */
  entries: number;
  /** Paths deleted by the container (whiteouts and opaque directories), as written to deleted-files.json. */
  deleted: string[];
  tarBytes: number;
  ms: number;
}

/** Buffered appends to the archive's fd. */
class Out {
  private chunks: Buffer[] = [];
  private pending = 0;
  bytes = 0;
  constructor(private readonly fd: number) {}
  async push(buf: Buffer): Promise<void> {
    this.chunks.push(buf);
    this.pending += buf.length;
    this.bytes += buf.length;
    if (this.pending >= OUT_BUFFER_BYTES) await this.flush();
  }
  async flush(): Promise<void> {
    const data = Buffer.concat(this.chunks);
    this.chunks = [];
    this.pending = 0;
    for (let off = 0; off < data.length; ) off += (await write(this.fd, data, off, data.length - off)).bytesWritten;
  }
}

/**
 * Captures the rootfs diff of a (frozen) container from its upperdir; see the file comment. Errors:
 * ROOTFS_DIFF_UNSUPPORTED, ROOTFS_DIFF_UNSAFE (the tree changed under the walk), ROOTFS_ABORTED, ROOTFS_IO.
 */
export async function captureRootfsDiff(options: CaptureRootfsDiffOptions): Promise<CaptureRootfsDiffResult> {
  const step = 'capture rootfs diff';
  const started = performance.now();
  const logger = options.logger ?? silentLogger;
  const excluded = compileExcludes(options.excludes ?? DEFAULT_ROOTFS_EXCLUDES);
  const fs = FsAt.load();
  const deleted: string[] = [];
  const firstByInode = new Map<string, string>();
  const openFds = new Set<number>();
  const track = (fd: number): number => (openFds.add(fd), fd);
  const release = (fd: number): void => {
    openFds.delete(fd);
    fs.close(fd);
  };
  let entries = 0;
  let out: Out | undefined;
  const WALK = { resolve: RESOLVE_WALK_DEFAULT };
  const overlay = (fd: number, key: string): string | undefined =>
    (fs.fgetxattr(fd, `trusted.overlay.${key}`) ?? fs.fgetxattr(fd, `user.overlay.${key}`))?.toString('utf8');
  const sameInode = (a: BigIntStats, b: BigIntStats, rel: string): void => {
    if (a.ino !== b.ino || a.dev !== b.dev) {
      throw new RootfsError(RootfsErrorCode.DIFF_UNSAFE, `${rel} changed while it was captured (the container was not frozen?)`, { step, evidence: { path: rel } });
    }
  };
  const xattrsOf = (fd: number): Map<string, Buffer> => {
    const map = new Map<string, Buffer>();
    for (const name of fs.flistxattr(fd).filter(xattrCarried).sort()) {
      const value = fs.fgetxattr(fd, name);
      if (value !== null) map.set(name, value);
    }
    return map;
  };
  const meta = (st: BigIntStats): Pick<TarEntryInput, 'mode' | 'uid' | 'gid' | 'mtime'> => ({
    mode: Number(st.mode & 0o7777n),
    uid: Number(st.uid),
    gid: Number(st.gid),
    mtime: Number(st.mtimeMs / 1000n),
  });

  const archiveFile = async (dirFd: number, name: string, rel: string, pst: BigIntStats): Promise<void> => {
    const fd = track(fs.openat2(dirFd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK, WALK));
    try {
      const st = fstatSync(fd, { bigint: true });
      sameInode(pst, st, rel);
      if (overlay(fd, 'metacopy') !== undefined) {
        throw new RootfsError(RootfsErrorCode.DIFF_UNSUPPORTED, `${rel} is a metadata-only copy-up (overlay metacopy); its data is not in the upperdir`, {
          step,
          evidence: { path: rel },
        });
      }
      const key = `${st.dev}:${st.ino}`;
      if (st.nlink > 1n) {
        const first = firstByInode.get(key);
        if (first !== undefined) {
          await out!.push(encodeHeader({ path: `./${rel}`, type: 'hardlink', linkpath: `./${first}`, ...meta(st) }));
          return;
        }
        firstByInode.set(key, rel);
      }
      const size = Number(st.size);
      const sparse = st.blocks * 512n < st.size;
      const extents: Array<readonly [number, number]> = sparse ? fs.dataExtents(fd, size) : size > 0 ? [[0, size]] : [];
      const dataBytes = extents.reduce((n, [, l]) => n + l, 0);
      const input: TarEntryInput = { path: `./${rel}`, type: 'file', size: dataBytes, xattrs: xattrsOf(fd), ...meta(st) };
      if (sparse) input.sparse = { realSize: size, extents };
      await out!.push(encodeHeader(input));
      if (sparse) await out!.push(encodeSparseMap(extents));
      for (const [offset, length] of extents) {
        for (let done = 0; done < length; ) {
          const chunk = Buffer.alloc(Math.min(OUT_BUFFER_BYTES, length - done));
          const { bytesRead } = await read(fd, chunk, 0, chunk.length, offset + done);
          // A file that shrank under the walk: the header already promised `length` bytes, so the capture fails.
          if (bytesRead === 0) throw new RootfsError(RootfsErrorCode.DIFF_UNSAFE, `${rel} changed while it was captured`, { step, evidence: { path: rel } });
          await out!.push(chunk.subarray(0, bytesRead));
          done += bytesRead;
        }
      }
      const pad = (BLOCK - (dataBytes % BLOCK)) % BLOCK;
      if (pad > 0) await out!.push(Buffer.alloc(pad));
    } finally {
      release(fd);
    }
  };

  const visit = async (dirFd: number, rel: string): Promise<void> => {
    throwIfAborted(options.signal, step);
    const names = fs.readdir(dirFd).map((e) => e.name).sort();
    for (const name of names) {
      const childRel = rel === '' ? name : `${rel}/${name}`;
      if (excluded(childRel)) continue;
      const pfd = track(fs.openat2(dirFd, name, O_PATH | O_NOFOLLOW, WALK));
      let st: BigIntStats;
      try {
        st = fstatSync(pfd, { bigint: true });
        if (st.isSymbolicLink()) {
          await out!.push(encodeHeader({ path: `./${childRel}`, type: 'symlink', linkpath: fs.readlinkat(pfd, ''), ...meta(st) }));
          entries++;
          continue;
        }
      } finally {
        release(pfd);
      }
      if (st.isCharacterDevice() && st.rdev === 0n) {
        deleted.push(childRel); // a whiteout: the container deleted this path
        continue;
      }
      if (st.isCharacterDevice() || st.isBlockDevice() || st.isSocket()) {
        logger.warn('left a device node or socket out of the rootfs diff', { path: childRel });
        continue;
      }
      if (st.isFIFO()) {
        await out!.push(encodeHeader({ path: `./${childRel}`, type: 'fifo', ...meta(st) }));
        entries++;
        continue;
      }
      if (st.isFile()) {
        await archiveFile(dirFd, name, childRel, st);
        entries++;
        continue;
      }
      // A directory: opened under the same rules (a symlink swapped in since the O_PATH open fails: ELOOP).
      const dfd = track(fs.openat2(dirFd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, WALK));
      try {
        const dst = fstatSync(dfd, { bigint: true });
        sameInode(st, dst, childRel);
        const redirect = overlay(dfd, 'redirect');
        if (redirect !== undefined) {
          throw new RootfsError(
            RootfsErrorCode.DIFF_UNSUPPORTED,
            `${childRel} is a directory renamed with overlay redirect_dir (from ${redirect}); its content is not in the upperdir`,
            { step, evidence: { path: childRel, redirect } },
          );
        }
        if (overlay(dfd, 'opaque') === 'y') deleted.push(childRel);
        await out!.push(encodeHeader({ path: `./${childRel}/`, type: 'directory', xattrs: xattrsOf(dfd), ...meta(dst) }));
        entries++;
        await visit(dfd, childRel);
      } finally {
        release(dfd);
      }
    }
  };

  let outFd: number | undefined;
  try {
    outFd = fs.openat2(-100, options.tarFile, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, { resolve: 0, mode: 0o600 });
    fs.fchmod(outFd, 0o600);
    out = new Out(outFd);
    const rootFd = track(fs.openat2(-100, options.upperdir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, { resolve: 0 }));
    await visit(rootFd, '');
    await out.push(END_OF_ARCHIVE);
    await out.flush();
  } catch (err) {
    if (isThawError(err, SysErrorCode.SYMLINK_REFUSED) || isThawError(err, SysErrorCode.OUTSIDE_ROOT)) {
      throw new RootfsError(RootfsErrorCode.DIFF_UNSAFE, `the upperdir changed under the walk (a symlink where a directory or file was): ${(err as Error).message}`, {
        step,
        cause: err,
      });
    }
    if (err instanceof RootfsError) throw err;
    throw new RootfsError(RootfsErrorCode.IO, `cannot capture ${options.upperdir}: ${(err as Error).message}`, { step, cause: err });
  } finally {
    for (const fd of openFds) fs.close(fd);
    if (outFd !== undefined) fs.close(outFd);
  }
  deleted.sort();
  await writeFile(options.deletedFilesFile, `${JSON.stringify(deleted, null, 1)}\n`, { mode: 0o600 });
  const tarBytes = out.bytes;
  const ms = performance.now() - started;
  logger.info('rootfs diff captured', { entries, deleted: deleted.length, tarBytes, ms });
  return { entries, deleted, tarBytes, ms };
}
