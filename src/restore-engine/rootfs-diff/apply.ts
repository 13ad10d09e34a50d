/**
 * Apply (the createRuntime hook, on the host, into the target's rootfs; nothing runs there yet):
 *   1. validate: read every header with the one reader (tar-reader.ts), entry rules included; read
 *      deleted-files.json; check, without following any symlink, that no entry's parent in the rootfs is a
 *      symlink or non-directory the archive does not replace (ROOTFS_DIFF_UNSAFE). Nothing is written yet.
 *   2. delete: each path's parent opened component by component from the rootfs fd with RESOLVE_BENEATH|
 *      RESOLVE_NO_SYMLINKS (a symlink on the way: that deletion is skipped and logged), then the last component
 *      removed with unlinkat, a directory's content first, each level through its own fd.
 *   3. extract: the same reader again, streaming each entry (checked equal to step 1's) into the *at calls: the
 *      parent opened from the rootfs fd with RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS, then the
 *      entry created on the last component (O_CREAT|O_EXCL|O_NOFOLLOW, mkdirat, symlinkat, linkat, mknodat for
 *      FIFOs), whatever was there removed first (the diff wins over the image), owner, mode, xattrs and times set
 *      through the created fd. Directory modes and times are set last, so a read-only directory gets filled.
 * Steps 2 and 3 keep an undo journal (undo.ts): whatever they replace or delete is first moved into a private
 * backup directory of the rootfs, and every path they create is recorded; a failure during them is undone before
 * the apply throws, and with keepUndo the caller can undo a successful apply later (a restore that fails after it).
 * No external program runs; nothing resolves outside the rootfs.
 */
import { fstatSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { write as writeCb } from 'node:fs';
import { isThawError } from '../../errors.js';
import { silentLogger, type Logger } from '../../log.js';
import { checkRelativePath } from '../../store/index.js';
import { SysErrorCode } from '../../sys/errors.js';
import {
  AT_SYMLINK_NOFOLLOW,
  FsAt,
  O_CREAT,
  O_DIRECTORY,
  O_EXCL,
  O_NOFOLLOW,
  O_NONBLOCK,
  O_PATH,
  O_RDONLY,
  O_WRONLY,
  RESOLVE_IN_ROOT,
  RESOLVE_NO_MAGICLINKS,
  RESOLVE_NO_SYMLINKS,
  RESOLVE_WALK_DEFAULT,
} from '../../sys/fs-at.js';
import { xattrCarried } from './capture.js';
import { RootfsError, RootfsErrorCode, throwIfAborted } from './errors.js';
import { decodeSparseMap, type TarEntry } from './tar-format.js';
import { discardUndo, undoRootfsDiff, UndoRecorder, type UndoJournal } from './undo.js';
import { ArchiveFile, forEachEntry, type PlacedEntry } from './tar-reader.js';

const write = promisify(writeCb);
const IN_ROOT = { resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS };
const BENEATH = { resolve: RESOLVE_WALK_DEFAULT };
const S_IFIFO = 0o010000;
const DATA_CHUNK_BYTES = 1024 * 1024;

export interface ApplyRootfsDiffOptions {
  /** The target container's rootfs (bundle rootfs or overlay merged directory), absolute. */
  rootfs: string;
  tarFile: string;
  deletedFilesFile: string;
  /** Upper bound for the whole apply (a hook passes its budget); past it, ROOTFS_ABORTED. */
  timeoutMs?: number;
  signal?: AbortSignal;
  logger?: Logger;
  /**
   * Keep the undo journal and its backup directory after a successful apply (the caller undoes on a later
   * fallback with undoRootfsDiff, or drops the backup with discardUndo). Absent: the backup is removed at once.
   * Either way a failure during the writes is undone before the apply throws.
   */
  keepUndo?: boolean;
}

export interface ApplyRootfsDiffResult {
  entries: number;
  deleted: number;
  /** Deletions not applied because a symlink lies on their path in the rootfs. */
  skipped: string[];
  ms: number;
  phaseMs: { validate: number; delete: number; extract: number };
  /** With keepUndo: what undoes this apply (undo.ts). */
  undo?: UndoJournal;
}

/** Reads deleted-files.json: an array of relative paths that stay inside the rootfs. */
export function parseDeletedFiles(text: string, source = 'deleted-files.json'): string[] {
  const step = 'read rootfs diff deletions';
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new RootfsError(RootfsErrorCode.DIFF_INVALID, `${source} is not JSON: ${(err as Error).message}`, { step, cause: err });
  }
  if (!Array.isArray(value)) throw new RootfsError(RootfsErrorCode.DIFF_INVALID, `${source} must be a JSON array of paths`, { step });
  return value.map((p, i) => {
    if (typeof p !== 'string') throw new RootfsError(RootfsErrorCode.DIFF_INVALID, `${source}[${i}] must be a string`, { step });
    const bad = p.startsWith('/') ? 'is absolute' : checkRelativePath(p);
    if (bad !== undefined) {
      throw new RootfsError(RootfsErrorCode.DIFF_UNSAFE, `${source}[${i}] ${JSON.stringify(p)} ${bad}; the diff is refused`, {
        step,
        evidence: { entry: p },
      });
    }
    return p;
  });
}

const split = (rel: string): { parent: string; name: string } => {
  const slash = rel.lastIndexOf('/');
  return slash < 0 ? { parent: '', name: rel } : { parent: rel.slice(0, slash), name: rel.slice(slash + 1) };
};

/** What `rel` is in the tree of `dirFd` without following it: 'dir', 'symlink', 'other', or undefined (absent). */
function kindAt(fs: FsAt, dirFd: number, rel: string): 'dir' | 'symlink' | 'other' | undefined {
  let fd: number;
  try {
    fd = fs.openat2(dirFd, rel, O_PATH | O_NOFOLLOW, BENEATH);
  } catch (err) {
    if (isThawError(err) && 'errnoName' in err && (err.errnoName === 'ENOENT' || err.errnoName === 'ENOTDIR')) return undefined;
    throw err;
  }
  try {
    const st = fstatSync(fd);
    return st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : 'other';
  } finally {
    fs.close(fd);
  }
}

/**
 * Applies a rootfs diff to a container's rootfs before its process runs (see the file comment). Idempotent:
 * applying twice gives the same tree. Errors: ROOTFS_UNDO_FAILED (the writes failed and so did
 * their undo: the rootfs is half changed),: ROOTFS_DIFF_UNSAFE, ROOTFS_DIFF_ORDER, ROOTFS_DIFF_GLOBAL_PAX
 * (nothing written when the archive itself is refused), ROOTFS_DIFF_INVALID, ROOTFS_ABORTED, ROOTFS_IO.
 */
export async function applyRootfsDiff(options: ApplyRootfsDiffOptions): Promise<ApplyRootfsDiffResult> {
  const step = 'apply rootfs diff';
  const logger = options.logger ?? silentLogger;
  const { rootfs } = options;
  const fs = FsAt.load();
  const t0 = performance.now();
  const signals = [...(options.timeoutMs !== undefined ? [AbortSignal.timeout(Math.max(1, Math.ceil(options.timeoutMs)))] : []), ...(options.signal ? [options.signal] : [])];
  const signal = signals.length > 0 ? AbortSignal.any(signals) : undefined;
  const archive = ArchiveFile.open(options.tarFile, 'validate rootfs diff');
  let rootFd: number | undefined;
  let undo: UndoRecorder | undefined;
  const dirFds = new Map<string, number>();
  try {
    const validated: PlacedEntry[] = [];
    await forEachEntry(archive, 'validate rootfs diff', (placed) => void validated.push(placed), { signal });
    const deletions = parseDeletedFiles(await readFile(options.deletedFilesFile, 'utf8'));
    try {
      rootFd = fs.openat2(-100, rootfs, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, { resolve: 0 });
    } catch (err) {
      throw new RootfsError(RootfsErrorCode.IO, `rootfs ${rootfs} is not a directory`, { step, cause: err, evidence: { rootfs } });
    }
    const root = rootFd;
    // No entry may go through a symlink or non-directory of the rootfs that the archive does not replace.
    const archiveDirs = new Set(validated.filter((p) => p.entry.type === 'directory').map((p) => p.entry.path));
    const parentKinds = new Map<string, ReturnType<typeof kindAt>>();
    for (const { entry } of validated) {
      const segments = entry.path.split('/');
      for (let i = 1; i < segments.length; i++) {
        const parent = segments.slice(0, i).join('/');
        if (archiveDirs.has(parent)) continue; // made a directory as an entry of its own, before its children
        if (!parentKinds.has(parent)) parentKinds.set(parent, kindAt(fs, root, parent));
        const kind = parentKinds.get(parent);
        if (kind === undefined) break;
        if (kind !== 'dir') {
          throw new RootfsError(
            RootfsErrorCode.DIFF_UNSAFE,
            `entry ${JSON.stringify(entry.path)} would be written through ${JSON.stringify(parent)}, ${kind === 'symlink' ? 'a symlink' : 'not a directory'} in the rootfs; the diff is refused`,
            { step, evidence: { entry: entry.path, at: parent } },
          );
        }
      }
    }
    const t1 = performance.now();

    // From here on everything the diff replaces or deletes is moved into the backup first (undo.ts).
    undo = new UndoRecorder(fs, root);
    const journal = undo;
    const skipped: string[] = [];
    for (const rel of deletions) {
      throwIfAborted(signal, step);
      const { parent } = split(rel);
      let blockedAt: { at: string; what: string } | undefined;
      let missing = false;
      const segments = parent === '' ? [] : parent.split('/');
      for (let i = 1; i <= segments.length; i++) {
        const kind = kindAt(fs, root, segments.slice(0, i).join('/'));
        if (kind === undefined) missing = true;
        else if (kind !== 'dir') blockedAt = { at: segments.slice(0, i).join('/'), what: kind === 'symlink' ? 'a symlink' : 'not a directory' };
        if (missing || blockedAt) break;
      }
      if (blockedAt) {
        skipped.push(rel);
        logger.warn('rootfs diff deletion skipped: a parent in the rootfs is not a directory', { path: rel, ...blockedAt });
        continue;
      }
      if (missing) continue;
      const parentFd = parent === '' ? root : fs.openat2(root, parent, O_PATH | O_DIRECTORY | O_NOFOLLOW, BENEATH);
      try {
        journal.moveAway(parentFd, rel);
      } finally {
        if (parentFd !== root) fs.close(parentFd);
      }
    }
    const t2 = performance.now();

    const parentFd = (rel: string): number => {
      if (rel === '') return root;
      let fd = dirFds.get(rel);
      if (fd === undefined) {
        fd = fs.openat2(root, rel, O_PATH | O_DIRECTORY | O_NOFOLLOW, IN_ROOT);
        dirFds.set(rel, fd);
      }
      return fd;
    };
    const delayedDirs: TarEntry[] = [];
    let index = 0;
    await forEachEntry(
      archive,
      'validate rootfs diff',
      async ({ entry, dataOffset }) => {
        const first = validated[index++];
        // The second pass must meet exactly the entries the first validated (the file cannot change the plan).
        if (!first || first.dataOffset !== dataOffset || first.entry.path !== entry.path || first.entry.type !== entry.type || first.entry.linkpath !== entry.linkpath || first.entry.size !== entry.size) {
          throw new RootfsError(RootfsErrorCode.DIFF_INVALID, `${options.tarFile} changed between validation and extraction`, { step });
        }
        const { parent, name } = split(entry.path);
        const dir = parentFd(parent);
        const existing = kindAt(fs, dir, name);
        if (entry.type === 'directory') {
          if (existing !== undefined && existing !== 'dir') journal.moveAway(dir, entry.path);
          if (existing !== 'dir') {
            fs.mkdirat(dir, name, 0o700);
            journal.created(entry.path);
          }
          const fd = fs.openat2(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, BENEATH);
          try {
            if (existing === 'dir') journal.dirMeta(fd, entry.path, [...entry.xattrs.keys()]);
            fs.fchown(fd, entry.uid, entry.gid);
            setXattrs(fs, fd, entry);
          } finally {
            fs.close(fd);
          }
          delayedDirs.push(entry);
          return;
        }
        if (existing !== undefined) journal.moveAway(dir, entry.path);
        if (entry.type === 'file') {
          const fd = fs.openat2(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, { ...BENEATH, mode: 0o600 });
          journal.created(entry.path);
          try {
            await writeData(fs, archive, fd, entry, dataOffset, step);
            fs.fchown(fd, entry.uid, entry.gid);
            fs.fchmod(fd, entry.mode & 0o7777); // after chown, which clears set-id bits
            setXattrs(fs, fd, entry);
            fs.futimens(fd, { sec: entry.mtime, nsec: 0 }, { sec: entry.mtime, nsec: 0 });
          } finally {
            fs.close(fd);
          }
          return;
        }
        if (entry.type === 'hardlink') {
          const target = split(entry.linkpath.replace(/^(\.\/)+/, ''));
          fs.linkat(parentFd(target.parent), target.name, dir, name, 0);
          journal.created(entry.path);
          return;
        }
        if (entry.type === 'symlink') {
          fs.symlinkat(entry.linkpath, dir, name);
          journal.created(entry.path);
        } else {
          fs.mknodat(dir, name, S_IFIFO | 0o600, 0);
          journal.created(entry.path);
          // A FIFO opens for reading at once with O_NONBLOCK: its mode is set through that fd (mknodat's is masked).
          const fd = fs.openat2(dir, name, O_RDONLY | O_NONBLOCK | O_NOFOLLOW, BENEATH);
          try {
            fs.fchown(fd, entry.uid, entry.gid);
            fs.fchmod(fd, entry.mode & 0o7777);
          } finally {
            fs.close(fd);
          }
        }
        if (entry.type === 'symlink') fs.fchownat(dir, name, entry.uid, entry.gid, AT_SYMLINK_NOFOLLOW);
        fs.utimensat(dir, name, { sec: entry.mtime, nsec: 0 }, { sec: entry.mtime, nsec: 0 }, AT_SYMLINK_NOFOLLOW);
      },
      { signal },
    );
    for (const entry of delayedDirs.reverse()) {
      const fd = fs.openat2(root, entry.path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, IN_ROOT);
      try {
        fs.fchmod(fd, entry.mode & 0o7777);
        fs.futimens(fd, { sec: entry.mtime, nsec: 0 }, { sec: entry.mtime, nsec: 0 });
      } finally {
        fs.close(fd);
      }
    }
    const t3 = performance.now();
    const result: ApplyRootfsDiffResult = {
      entries: validated.length,
      deleted: deletions.length - skipped.length,
      skipped,
      ms: t3 - t0,
      phaseMs: { validate: t1 - t0, delete: t2 - t1, extract: t3 - t2 },
    };
    undo.close();
    undo = undefined;
    if (options.keepUndo) result.undo = journal.journal;
    else discardUndo(rootfs, journal.journal, fs);
    logger.info('rootfs diff applied', { rootfs, entries: result.entries, deleted: result.deleted, ms: result.ms });
    return result;
  } catch (err) {
    if (undo !== undefined) {
      // A failure during the writes: put the rootfs back as it was before the error leaves (undo.ts).
      const journal = undo.journal;
      undo.close();
      undo = undefined;
      try {
        undoRootfsDiff(rootfs, journal, fs);
      } catch (undoErr) {
        throw new RootfsError(RootfsErrorCode.UNDO_FAILED, `${(err as Error).message}; ${(undoErr as Error).message}`, { step, cause: undoErr, evidence: { applyError: isThawError(err) ? err.code : undefined } });
      }
    }
    if (err instanceof RootfsError) throw err;
    if (isThawError(err, SysErrorCode.SYMLINK_REFUSED) || isThawError(err, SysErrorCode.OUTSIDE_ROOT)) {
      throw new RootfsError(RootfsErrorCode.DIFF_UNSAFE, `a path of the diff met a symlink of the rootfs: ${(err as Error).message}`, { step, cause: err });
    }
    throw new RootfsError(RootfsErrorCode.IO, `cannot apply the diff to ${rootfs}: ${(err as Error).message}`, { step, cause: err });
  } finally {
    for (const fd of dirFds.values()) fs.close(fd);
    if (rootFd !== undefined) fs.close(rootFd);
    archive.close();
  }
}

function setXattrs(fs: FsAt, fd: number, entry: TarEntry): void {
  for (const [name, value] of entry.xattrs) if (xattrCarried(name)) fs.fsetxattr(fd, name, value);
}

/** Copies an entry's data to fd: plain bytes, or a PAX 1.0 sparse map and its extents (holes left as holes). */
async function writeData(fs: FsAt, archive: ArchiveFile, fd: number, entry: TarEntry, dataOffset: number, step: string): Promise<void> {
  const bad = (m: string, o: number): RootfsError => new RootfsError(RootfsErrorCode.DIFF_INVALID, `${archive.path}: ${m} (at byte ${o})`, { step });
  let extents: Array<[number, number]> = [[0, entry.size]];
  let pos = dataOffset;
  if (entry.sparseRealSize !== undefined) {
    const head = await archive.bytes(dataOffset, Math.min(entry.size, 64 * 1024), bad);
    let map;
    try {
      map = decodeSparseMap(Buffer.from(head));
    } catch (err) {
      throw bad((err as Error).message, dataOffset);
    }
    if (!map) throw bad('sparse map too long', dataOffset);
    extents = map.extents;
    pos += map.mapBytes;
    const total = extents.reduce((n, [o, l]) => (o + l > entry.sparseRealSize! ? Infinity : n + l), map.mapBytes);
    if (total !== entry.size) throw bad('sparse map does not match the entry size', dataOffset);
    fs.ftruncate(fd, entry.sparseRealSize);
  }
  for (const [offset, length] of extents) {
    for (let done = 0; done < length; ) {
      const n = Math.min(DATA_CHUNK_BYTES, length - done);
      const chunk = await archive.bytes(pos, n, bad);
      for (let w = 0; w < n; ) w += (await write(fd, chunk, w, n - w, offset + done + w)).bytesWritten;
      pos += n;
      done += n;
    }
  }
}
