/**
 * The undo journal of a rootfs diff (issue 12, item 3): a fallback must run on the image's own rootfs, so
 * before the apply overwrites, replaces or deletes anything of the rootfs it moves the original into a private
 * backup directory inside the same rootfs (`/.thaw-undo-<random>`, mkdirat 0700 by the apply itself, so it is
 * no path of the image), and it records every path it creates and the metadata of every existing directory it
 * changes. Undo walks the journal backwards: what the diff created is removed, the originals are renamed back,
 * directory metadata is set back, and the backup directory is removed.
 *
 * Everything goes through dir fds from the rootfs fd with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS: a symlink planted
 * on any path the undo walks (in the rootfs or inside the backup) makes that step fail, never followed; renames
 * use RENAME_NOREPLACE and stay inside the one filesystem, so each is atomic. Overlayfs refuses to rename a
 * directory of a lower layer (EXDEV without redirect_dir): such a directory is "rebuilt" instead: made anew in
 * the backup, its children moved into it one by one (recursively), its metadata recorded, and then removed; undo
 * makes it again and moves the children back.
 *
 * The undo runs on the container's own view of its rootfs (`/proc/<pid>/root`), the apply on the runtime's view
 * before the container's mounts: a step whose path is a mount point of the container, or lies beyond one (runc's
 * mount points of bind mounts the image lacks are in the upperdir, hence in a diff), is skipped. What the diff did
 * there lies under the mount, out of the workload's sight, on a directory runc makes for every such container.
 */
import { fstatSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { isThawError } from '../../errors.js';
import {
  AT_REMOVEDIR,
  FsAt,
  O_DIRECTORY,
  O_NOFOLLOW,
  O_PATH,
  O_RDONLY,
  RENAME_NOREPLACE,
  RESOLVE_NO_XDEV,
  RESOLVE_WALK_DEFAULT,
} from '../../sys/fs-at.js';
import { xattrCarried } from './capture.js';
import { RootfsError, RootfsErrorCode } from './errors.js';

const BENEATH = { resolve: RESOLVE_WALK_DEFAULT };
/** The backup directory's name in the rootfs root: this prefix and 16 random bytes in hex. */
export const UNDO_DIR_PREFIX = '.thaw-undo-';

/** What a directory's own metadata was (xattr values base64, null: the attribute was absent). */
export interface DirMeta {
  mode: number;
  uid: number;
  gid: number;
  atimeNs: string;
  mtimeNs: string;
  xattrs: Record<string, string | null>;
  /** Only for a rebuilt directory: its children that were rebuilt in turn (the others were renamed whole). */
  rebuilt?: Record<string, DirMeta>;
}

export type UndoStep =
  /** The original at `path` was moved to `<backupDir>/<backup>` (rebuilt: see the file comment). */
  | { op: 'moved'; path: string; backup: string; rebuilt?: DirMeta }
  /** The diff created `path` (nothing was there). */
  | { op: 'created'; path: string }
  /** The existing directory `path` had this metadata before the diff set its own. */
  | { op: 'meta'; path: string; meta: DirMeta };

export interface UndoJournal {
  /** The backup directory's name in the rootfs root. */
  backupDir: string;
  steps: UndoStep[];
}

const split = (rel: string): { parent: string; name: string } => {
  const slash = rel.lastIndexOf('/');
  return slash < 0 ? { parent: '', name: rel } : { parent: rel.slice(0, slash), name: rel.slice(slash + 1) };
};

/** True when `path` from rootFd is, or lies beyond, a mount point (RESOLVE_NO_XDEV refuses it with EXDEV). */
function crossesMount(fs: FsAt, rootFd: number, path: string): boolean {
  try {
    fs.close(fs.openat2(rootFd, path, O_PATH | O_NOFOLLOW, { resolve: RESOLVE_WALK_DEFAULT | RESOLVE_NO_XDEV }));
    return false;
  } catch (err) {
    return errnoOf(err) === 'EXDEV';
  }
}

const errnoOf = (err: unknown): string | undefined => (isThawError(err) && 'errnoName' in err ? String(err.errnoName) : undefined);

function kindAt(fs: FsAt, dirFd: number, name: string): 'dir' | 'other' | undefined {
  let fd: number;
  try {
    fd = fs.openat2(dirFd, name, O_PATH | O_NOFOLLOW, BENEATH);
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return undefined;
    throw err;
  }
  try {
    return fstatSync(fd).isDirectory() ? 'dir' : 'other';
  } finally {
    fs.close(fd);
  }
}

function withDir<T>(fs: FsAt, dirFd: number, rel: string, use: (fd: number) => T, flags = O_PATH): T {
  if (rel === '' && flags === O_PATH) return use(dirFd);
  const fd = fs.openat2(dirFd, rel === '' ? '.' : rel, flags | O_DIRECTORY | O_NOFOLLOW, BENEATH);
  try {
    return use(fd);
  } finally {
    fs.close(fd);
  }
}

/** The metadata of an open directory (a real fd, not O_PATH: xattrs are read through it). */
export function readDirMeta(fs: FsAt, fd: number, xattrNames?: string[]): DirMeta {
  const st = fstatSync(fd, { bigint: true });
  const names = (xattrNames ?? fs.flistxattr(fd)).filter(xattrCarried);
  const xattrs: Record<string, string | null> = {};
  for (const name of names) xattrs[name] = fs.fgetxattr(fd, name)?.toString('base64') ?? null;
  return { mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), atimeNs: String(st.atimeNs), mtimeNs: String(st.mtimeNs), xattrs };
}

function writeDirMeta(fs: FsAt, fd: number, meta: DirMeta): void {
  fs.fchown(fd, meta.uid, meta.gid);
  fs.fchmod(fd, meta.mode);
  for (const [name, value] of Object.entries(meta.xattrs)) {
    if (value !== null) fs.fsetxattr(fd, name, Buffer.from(value, 'base64'));
    else if (fs.fgetxattr(fd, name) !== null) fs.fremovexattr(fd, name);
  }
  const t = (ns: string): { sec: bigint; nsec: number } => ({ sec: BigInt(ns) / 1_000_000_000n, nsec: Number(BigInt(ns) % 1_000_000_000n) });
  fs.futimens(fd, t(meta.atimeNs), t(meta.mtimeNs));
}

/**
 * Moves `name` of parentFd to `backupName` of backupFd (RENAME_NOREPLACE); a directory overlayfs will not
 * rename is rebuilt there (file comment). Returns the rebuilt directory's metadata, or undefined when renamed.
 */
function moveAway(fs: FsAt, parentFd: number, name: string, backupFd: number, backupName: string): DirMeta | undefined {
  try {
    fs.renameat2(parentFd, name, backupFd, backupName, RENAME_NOREPLACE);
    return undefined;
  } catch (err) {
    if (errnoOf(err) !== 'EXDEV' || kindAt(fs, parentFd, name) !== 'dir') throw err;
  }
  const srcFd = fs.openat2(parentFd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, BENEATH);
  try {
    const meta = readDirMeta(fs, srcFd);
    fs.mkdirat(backupFd, backupName, 0o700);
    const rebuilt: Record<string, DirMeta> = {};
    withDir(fs, backupFd, backupName, (dstFd) => {
      for (const entry of fs.readdir(srcFd)) {
        const child = moveAway(fs, srcFd, entry.name, dstFd, entry.name);
        if (child !== undefined) rebuilt[entry.name] = child;
      }
    });
    fs.unlinkat(parentFd, name, AT_REMOVEDIR);
    return Object.keys(rebuilt).length > 0 ? { ...meta, rebuilt } : meta;
  } finally {
    fs.close(srcFd);
  }
}

/** The reverse of moveAway: `backupName` of backupFd back to `name` of parentFd (which must be free). */
function moveBack(fs: FsAt, backupFd: number, backupName: string, parentFd: number, name: string, rebuilt: DirMeta | undefined): void {
  if (rebuilt === undefined) {
    fs.renameat2(backupFd, backupName, parentFd, name, RENAME_NOREPLACE);
    return;
  }
  fs.mkdirat(parentFd, name, 0o700);
  withDir(fs, backupFd, backupName, (srcFd) => {
    withDir(fs, parentFd, name, (dstFd) => {
      for (const entry of fs.readdir(srcFd)) moveBack(fs, srcFd, entry.name, dstFd, entry.name, rebuilt.rebuilt?.[entry.name]);
      writeDirMeta(fs, dstFd, rebuilt);
    }, O_RDONLY);
  }, O_RDONLY);
  fs.unlinkat(backupFd, backupName, AT_REMOVEDIR);
}

/** Removes `name` in dirFd: a directory's content first, each level through its own fd; absent is fine. */
function removeTree(fs: FsAt, dirFd: number, name: string): void {
  const kind = kindAt(fs, dirFd, name);
  if (kind === undefined) return;
  if (kind === 'dir') {
    withDir(fs, dirFd, name, (fd) => {
      for (const entry of fs.readdir(fd)) removeTree(fs, fd, entry.name);
    }, O_RDONLY);
    fs.unlinkat(dirFd, name, AT_REMOVEDIR);
  } else fs.unlinkat(dirFd, name);
}

/** The journal an apply writes as it goes; `fail` and `discard` close it. */
export class UndoRecorder {
  readonly journal: UndoJournal;
  private readonly backupFd: number;
  private next = 0;

  constructor(private readonly fs: FsAt, rootFd: number) {
    const backupDir = `${UNDO_DIR_PREFIX}${randomBytes(16).toString('hex')}`;
    // mkdirat fails on anything already there (a planted symlink included): the directory is always ours.
    fs.mkdirat(rootFd, backupDir, 0o700);
    this.backupFd = fs.openat2(rootFd, backupDir, O_PATH | O_DIRECTORY | O_NOFOLLOW, BENEATH);
    this.journal = { backupDir, steps: [] };
  }

  /** Moves the original at `path` (name of parentFd) away before the diff replaces or deletes it; absent: nothing. */
  moveAway(parentFd: number, path: string): void {
    const { name } = split(path);
    if (kindAt(this.fs, parentFd, name) === undefined) return;
    const backup = String(this.next++);
    const rebuilt = moveAway(this.fs, parentFd, name, this.backupFd, backup);
    this.journal.steps.push(rebuilt === undefined ? { op: 'moved', path, backup } : { op: 'moved', path, backup, rebuilt });
  }

  created(path: string): void {
    this.journal.steps.push({ op: 'created', path });
  }

  /** Records an existing directory's metadata before the diff changes it (fd: the directory, opened for reading). */
  dirMeta(fd: number, path: string, xattrNames: string[]): void {
    this.journal.steps.push({ op: 'meta', path, meta: readDirMeta(this.fs, fd, xattrNames) });
  }

  close(): void {
    this.fs.close(this.backupFd);
  }
}

/**
 * Undoes an applied (or partly applied) diff from its journal: the rootfs is as it was before the apply, and
 * the backup directory is gone. Throws ROOTFS_UNDO_FAILED on the first step it cannot take (a symlink planted
 * on the way included): the rootfs is then half changed and must not run anything.
 */
export function undoRootfsDiff(rootfs: string, journal: UndoJournal, fs = FsAt.load()): void {
  const step = 'undo rootfs diff';
  checkJournal(journal);
  let rootFd: number | undefined;
  let at: UndoStep | undefined;
  try {
    rootFd = fs.openat2(-100, rootfs, O_PATH | O_DIRECTORY | O_NOFOLLOW, { resolve: 0 });
    const root = rootFd;
    withDir(fs, root, journal.backupDir, (backupFd) => {
      for (const s of [...journal.steps].reverse()) {
        at = s;
        if (crossesMount(fs, root, s.path)) {
          // Its original stays out of sight under the mount too: its backup goes, so the backup directory can.
          if (s.op === 'moved') removeTree(fs, backupFd, s.backup);
          continue;
        }
        const { parent, name } = split(s.path);
        if (s.op === 'created') {
          withDir(fs, root, parent, (dirFd) => {
            const kind = kindAt(fs, dirFd, name);
            // A created directory holds only what the diff created (undone before it) or moved back out of it.
            if (kind !== undefined) fs.unlinkat(dirFd, name, kind === 'dir' ? AT_REMOVEDIR : 0);
          });
        } else if (s.op === 'moved') {
          withDir(fs, root, parent, (dirFd) => moveBack(fs, backupFd, s.backup, dirFd, name, s.rebuilt));
        } else withDir(fs, root, s.path, (fd) => writeDirMeta(fs, fd, s.meta), O_RDONLY);
      }
    });
    at = undefined;
    fs.unlinkat(root, journal.backupDir, AT_REMOVEDIR);
  } catch (err) {
    throw new RootfsError(RootfsErrorCode.UNDO_FAILED, `cannot undo the rootfs diff in ${rootfs}${at ? ` at ${at.op} ${JSON.stringify(at.path)}` : ''}: ${(err as Error).message}`, {
      step,
      cause: err,
      evidence: { rootfs, ...(at ? { op: at.op, path: at.path } : {}) },
    });
  } finally {
    if (rootFd !== undefined) fs.close(rootFd);
  }
}

/** After a restore that succeeded: removes the backup directory (the originals the diff replaced). */
export function discardUndo(rootfs: string, journal: Pick<UndoJournal, 'backupDir'>, fs = FsAt.load()): void {
  checkJournal({ backupDir: journal.backupDir, steps: [] });
  let rootFd: number | undefined;
  try {
    rootFd = fs.openat2(-100, rootfs, O_PATH | O_DIRECTORY | O_NOFOLLOW, { resolve: 0 });
    removeTree(fs, rootFd, journal.backupDir);
  } catch (err) {
    throw new RootfsError(RootfsErrorCode.UNDO_FAILED, `cannot remove the undo backup ${journal.backupDir} in ${rootfs}: ${(err as Error).message}`, { step: 'discard rootfs undo', cause: err, evidence: { rootfs } });
  } finally {
    if (rootFd !== undefined) fs.close(rootFd);
  }
}

/** A journal read back must name only our backup directory and plain numbered backups (no path games). */
function checkJournal(journal: UndoJournal): void {
  const bad = (m: string): never => {
    throw new RootfsError(RootfsErrorCode.UNDO_FAILED, `the undo journal is invalid: ${m}`, { step: 'check the undo journal' });
  };
  if (!new RegExp(`^${UNDO_DIR_PREFIX.replace('.', '\\.')}[0-9a-f]{32}$`).test(journal.backupDir)) bad(`backup directory ${JSON.stringify(journal.backupDir)}`);
  for (const s of journal.steps) {
    if (typeof s.path !== 'string' || s.path === '' || s.path.startsWith('/') || s.path.split('/').some((seg) => seg === '' || seg === '.' || seg === '..')) bad(`path ${JSON.stringify(s.path)}`);
    if (s.op === 'moved' && !/^[0-9]+$/.test(s.backup)) bad(`backup ${JSON.stringify(s.backup)}`);
  }
}
