/**
 * The rootfs diff: what a container changed in its filesystem, saved at checkpoint and replayed into the
 * target container's rootfs before any of its processes runs (design.md, Checkpoint step 3, Restore step 2).
 *
 * Capture (from the host, source container frozen): the container's overlay upperdir holds exactly its
 * changes. thaw walks it itself and writes
 *   - `rootfs-diff.tar`: every directory, file, symlink and FIFO of the upperdir (GNU tar, POSIX format,
 *     `--numeric-owner --xattrs --sparse`), minus the exclusions (`proc`, `sys`, `dev`, Python caches, the
 *     Hugging Face cache) and minus the overlay's whiteouts;
 *   - `deleted-files.json`: a JSON array of paths relative to the rootfs (no leading '/') that the container
 *     deleted: its whiteouts (char devices 0:0) and its opaque directories (xattr `trusted.overlay.opaque`
 *     or `user.overlay.opaque` = "y", read with lgetxattr through koffi). An opaque directory is listed
 *     because the container removed everything the image had there; the tar then recreates it with what the
 *     container put in it.
 *   Refused (ROOTFS_DIFF_UNSUPPORTED), because an upperdir alone does not hold their content: directories
 *   renamed with `redirect_dir` (xattr overlay.redirect) and metadata-only copy-ups (overlay.metacopy).
 *   Device nodes other than whiteouts are left out with a warning (a rootfs diff must not carry devices).
 *   Also not handled: the "overlay.whiteout" xattr form of whiteouts used by nested overlays.
 *
 * Apply (the createRuntime hook, on the host, into the target's rootfs; nothing runs there yet):
 *   1. read every tar header (no data) and validate the entries: no absolute path, no `..`, no duplicate,
 *      no device node, no entry under an earlier symlink or hard link of the archive, hard links only to
 *      earlier entries. Any violation refuses the whole diff (ROOTFS_DIFF_UNSAFE naming the entry) before
 *      anything is written.
 *   2. apply the deletions, each path resolved component by component with lstat inside the rootfs (a
 *      symlink on the way is never followed: that deletion is skipped and logged).
 *   3. make room: where the archive has a directory and the rootfs has anything else (a symlink above all),
 *      or the archive has a non-directory and the rootfs has a directory, remove the rootfs's entry; refuse
 *      (ROOTFS_DIFF_UNSAFE) an entry whose parent in the rootfs is a symlink the archive does not replace.
 *      So GNU tar never writes through a symlink of the image: an absolute one would point into the host.
 *   4. extract with GNU tar, files overwritten: the diff wins over the image, since it is the source
 *      container's state (no `--skip-old-files`; tar's default unlinks an existing file and creates it anew
 *      rather than writing through it, as `--overwrite` would).
 *
 * GNU tar's path is an option: the host's `/bin/tar` by default; callers pass the toolkit's
 * (`/opt/thaw/stack/1.7/bin/tar`).
 */
import { spawn } from 'node:child_process';
import { constants as fsConstants, type Stats } from 'node:fs';
import { chmod, lstat, open, readdir, readFile, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { ThawError } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { checkRelativePath } from '../store/index.js';

export const RootfsErrorCode = {
  /** A /proc/<pid>/mountinfo line that does not parse (evidence: the line). */
  MOUNTINFO_INVALID: 'ROOTFS_MOUNTINFO_INVALID',
  /** The container's root is not an overlay mount (no upperdir to capture). */
  NOT_OVERLAY: 'ROOTFS_NOT_OVERLAY',
  /** The upperdir uses an overlay feature whose content is not in the upperdir (redirect_dir, metacopy). */
  DIFF_UNSUPPORTED: 'ROOTFS_DIFF_UNSUPPORTED',
  /** rootfs-diff.tar is not a readable tar, or deleted-files.json is not a list of relative paths. */
  DIFF_INVALID: 'ROOTFS_DIFF_INVALID',
  /** An entry would be written outside the rootfs, or through a symlink (evidence: the entry). */
  DIFF_UNSAFE: 'ROOTFS_DIFF_UNSAFE',
  /** GNU tar exited non-zero (evidence: exit status, stderr). */
  TAR_FAILED: 'ROOTFS_TAR_FAILED',
  /** The caller's AbortSignal fired. */
  ABORTED: 'ROOTFS_ABORTED',
  /** A filesystem call failed (cause: the Node error). */
  IO: 'ROOTFS_IO',
} as const;
export type RootfsErrorCode = (typeof RootfsErrorCode)[keyof typeof RootfsErrorCode];

export class RootfsError extends ThawError {
  declare readonly code: RootfsErrorCode;
  constructor(code: RootfsErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'RootfsError';
  }
}

export const DEFAULT_TAR_PATH = '/bin/tar';
/** Dynamo's exclusions; `**​/` matches at any depth, `*` within one path segment. */
export const DEFAULT_ROOTFS_EXCLUDES: readonly string[] = ['proc', 'sys', 'dev', '**/__pycache__', '**/*.pyc', '**/.cache/huggingface'];
/** Upper bound for one tar run (capture of a large upperdir included); a hook passes its own, shorter budget. A 100 MB diff applies in under a second. */
export const DEFAULT_TAR_TIMEOUT_MS = 120_000;
/** xattrs never carried: overlay's own bookkeeping (meaningless, and refused, in another overlay) and SELinux labels (the target's policy sets them). */
const TAR_XATTR_EXCLUDES = ['trusted.overlay.*', 'user.overlay.*', 'security.selinux'];
const STDERR_LIMIT_BYTES = 16 * 1024;

// ---------------------------------------------------------------------------------------------------------
// mountinfo

export interface OverlayMount {
  mountPoint: string;
  /** Top to bottom, as overlayfs lists them. */
  lowerdirs: string[];
  upperdir: string;
  workdir: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo octal. */
function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Splits overlay's lowerdir list on ':' not escaped with a backslash ("\:" is a colon inside a path). */
function splitLowerdirs(value: string): string[] {
  return value.split(/(?<!\\):/).map((d) => d.replace(/\\:/g, ':'));
}

/**
 * Parses one line of /proc/<pid>/mountinfo (proc(5)). Returns the overlay's directories when the line is an
 * overlay mount with an upperdir, undefined for any other mount. Pure. Throws ROOTFS_MOUNTINFO_INVALID for a
 * line that is not mountinfo.
 *
 *   36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w
 */
export function parseOverlayMount(mountinfoLine: string): OverlayMount | undefined {
  const step = 'parse mountinfo';
  const fields = mountinfoLine.trim().split(' ');
  const dash = fields.indexOf('-', 6);
  if (fields.length < 10 || dash < 0 || fields.length < dash + 4 || !/^\d+:\d+$/.test(fields[2] ?? '')) {
    throw new RootfsError(RootfsErrorCode.MOUNTINFO_INVALID, `not a mountinfo line: ${JSON.stringify(mountinfoLine)}`, {
      step,
      evidence: { line: mountinfoLine },
    });
  }
  if (fields[dash + 1] !== 'overlay') return undefined;
  const mount: Partial<OverlayMount> & { mountPoint: string; lowerdirs: string[] } = {
    mountPoint: unescapeMountinfo(fields[4]!),
    lowerdirs: [],
  };
  // Super options are comma-separated; a comma inside a path is octal-escaped, so splitting first is safe.
  for (const option of fields.slice(dash + 3).join(' ').split(',')) {
    const eq = option.indexOf('=');
    if (eq < 0) continue;
    const key = option.slice(0, eq);
    const value = unescapeMountinfo(option.slice(eq + 1));
    if (key === 'lowerdir') mount.lowerdirs.push(...splitLowerdirs(value));
    else if (key === 'lowerdir+') mount.lowerdirs.push(value); // the new mount API lists layers one by one
    else if (key === 'upperdir') mount.upperdir = value;
    else if (key === 'workdir') mount.workdir = value;
  }
  if (mount.upperdir === undefined) return undefined; // a read-only overlay: nothing to capture
  return { mountPoint: mount.mountPoint, lowerdirs: mount.lowerdirs, upperdir: mount.upperdir, workdir: mount.workdir ?? '' };
}

/**
 * The overlay mounted at `/` of process `pid` (its container's root), from `/proc/<pid>/mountinfo`. The last
 * mount on `/` wins, as in the kernel's view. ROOTFS_NOT_OVERLAY when that is not an overlay with an upperdir.
 */
export async function readContainerOverlay(pid: number, options: { procRoot?: string } = {}): Promise<OverlayMount> {
  const step = 'find the container rootfs overlay';
  const path = join(options.procRoot ?? '/proc', String(pid), 'mountinfo');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new RootfsError(RootfsErrorCode.IO, `cannot read ${path}: ${(err as Error).message}`, { step, cause: err });
  }
  let root: { line: string; overlay: OverlayMount | undefined } | undefined;
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const fields = line.split(' ');
    if (fields[4] === '/') root = { line, overlay: parseOverlayMount(line) };
  }
  if (root?.overlay === undefined) {
    throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `the root mount of pid ${pid} is not an overlay with an upperdir`, {
      step,
      evidence: { pid, line: root?.line },
    });
  }
  return root.overlay;
}

// ---------------------------------------------------------------------------------------------------------
// xattrs (koffi)

type GetXattr = (path: string, name: string) => string | undefined;

/**
 * lgetxattr(2) from libc: the value as a string, or undefined when the attribute is absent. koffi is loaded
 * here, not at the top: the create-runtime hook imports this module for applyRootfsDiff, and every ms of its
 * start is on a restore's critical path (koffi's load is ~20 ms).
 */
async function bindGetXattr(): Promise<GetXattr> {
  const { default: koffi } = await import('koffi');
  const libc = koffi.load('libc.so.6');
  const lgetxattr = libc.func('long lgetxattr(const char *path, const char *name, _Out_ uint8_t *value, size_t size)');
  const buffer = Buffer.alloc(256);
  return (path, name) => {
    const n = lgetxattr(path, name, buffer, buffer.length) as number;
    return n < 0 ? undefined : buffer.subarray(0, n).toString('utf8');
  };
}

const overlayXattr = (get: GetXattr, path: string, key: string): string | undefined =>
  get(path, `trusted.overlay.${key}`) ?? get(path, `user.overlay.${key}`);

// ---------------------------------------------------------------------------------------------------------
// capture

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
  /** The source container's overlay upperdir (readContainerOverlay(pid).upperdir). */
  upperdir: string;
  /** Where to write rootfs-diff.tar and deleted-files.json (the pending checkpoint's paths). */
  tarFile: string;
  deletedFilesFile: string;
  tarPath?: string;
  excludes?: readonly string[];
  timeoutMs?: number;
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

/**
 * Captures the rootfs diff of a (frozen) container from its upperdir; see the file comment. Errors:
 * ROOTFS_DIFF_UNSUPPORTED, ROOTFS_TAR_FAILED, ROOTFS_ABORTED, ROOTFS_IO.
 */
export async function captureRootfsDiff(options: CaptureRootfsDiffOptions): Promise<CaptureRootfsDiffResult> {
  const step = 'capture rootfs diff';
  const started = performance.now();
  const logger = options.logger ?? silentLogger;
  const excluded = compileExcludes(options.excludes ?? DEFAULT_ROOTFS_EXCLUDES);
  const getXattr = await bindGetXattr();
  const members: string[] = [];
  const deleted: string[] = [];

  const visit = async (rel: string): Promise<void> => {
    throwIfAborted(options.signal, step);
    const names = await readdir(join(options.upperdir, rel));
    names.sort();
    for (const name of names) {
      const childRel = rel === '' ? name : `${rel}/${name}`;
      if (excluded(childRel)) continue;
      const abs = join(options.upperdir, childRel);
      const st = await lstat(abs);
      if (st.isCharacterDevice() && st.rdev === 0) {
        deleted.push(childRel); // a whiteout: the container deleted this path
        continue;
      }
      if (st.isCharacterDevice() || st.isBlockDevice() || st.isSocket()) {
        logger.warn('left a device node or socket out of the rootfs diff', { path: childRel });
        continue;
      }
      if (st.isDirectory()) {
        const redirect = overlayXattr(getXattr, abs, 'redirect');
        if (redirect !== undefined) {
          throw new RootfsError(
            RootfsErrorCode.DIFF_UNSUPPORTED,
            `${childRel} is a directory renamed with overlay redirect_dir (from ${redirect}); its content is not in the upperdir`,
            { step, evidence: { path: childRel, redirect } },
          );
        }
        if (overlayXattr(getXattr, abs, 'opaque') === 'y') deleted.push(childRel);
        members.push(childRel);
        await visit(childRel);
        continue;
      }
      if (st.isFile() && overlayXattr(getXattr, abs, 'metacopy') !== undefined) {
        throw new RootfsError(
          RootfsErrorCode.DIFF_UNSUPPORTED,
          `${childRel} is a metadata-only copy-up (overlay metacopy); its data is not in the upperdir`,
          { step, evidence: { path: childRel } },
        );
      }
      members.push(childRel);
    }
  };
  try {
    await visit('');
  } catch (err) {
    if (err instanceof ThawError) throw err;
    throw new RootfsError(RootfsErrorCode.IO, `cannot walk ${options.upperdir}: ${(err as Error).message}`, { step, cause: err });
  }

  // The member list goes to tar NUL-separated, verbatim, without recursion: tar archives exactly what the
  // walk chose (no whiteouts, nothing excluded), parents before children.
  const list = Buffer.from(members.map((m) => `./${m}\0`).join(''));
  await runTar(
    options.tarPath ?? DEFAULT_TAR_PATH,
    [
      '--create',
      `--file=${options.tarFile}`,
      `--directory=${options.upperdir}`,
      '--format=posix',
      '--numeric-owner',
      // atime and ctime would add two pax records per entry and cannot be restored meaningfully anyway.
      '--pax-option=delete=atime,delete=ctime',
      '--sparse',
      '--xattrs',
      "--xattrs-include=*",
      ...TAR_XATTR_EXCLUDES.map((x) => `--xattrs-exclude=${x}`),
      '--no-recursion',
      '--null',
      '--verbatim-files-from',
      '--files-from=-',
    ],
    { step, input: list, timeoutMs: options.timeoutMs, signal: options.signal },
  );
  deleted.sort();
  await writeFile(options.deletedFilesFile, `${JSON.stringify(deleted, null, 1)}\n`, { mode: 0o600 });
  await chmod(options.tarFile, 0o600);
  const tarBytes = (await lstat(options.tarFile)).size;
  const ms = performance.now() - started;
  logger.info('rootfs diff captured', { entries: members.length, deleted: deleted.length, tarBytes, ms });
  return { entries: members.length, deleted, tarBytes, ms };
}

// ---------------------------------------------------------------------------------------------------------
// tar headers (read-only; no data is read)

export type TarEntryType = 'file' | 'hardlink' | 'symlink' | 'chardev' | 'blockdev' | 'directory' | 'fifo' | 'other';

export interface TarEntry {
  /** As stored, after pax/GNU long-name resolution. */
  path: string;
  type: TarEntryType;
  /** Symlink target or hard-link source. */
  linkpath: string;
  size: number;
  /** The typeflag character, for messages. */
  typeflag: string;
}

const BLOCK = 512;
const TAR_READ_WINDOW_BYTES = 64 * 1024;

function cString(buf: Buffer, start: number, length: number): string {
  const slice = buf.subarray(start, start + length);
  const nul = slice.indexOf(0);
  return slice.subarray(0, nul < 0 ? slice.length : nul).toString('utf8');
}

/** Octal numeric field, or GNU base-256 when the high bit of the first byte is set. */
function tarNumber(buf: Buffer, start: number, length: number): number {
  if ((buf[start]! & 0x80) !== 0) {
    let value = buf[start]! & 0x7f;
    for (let i = 1; i < length; i++) value = value * 256 + buf[start + i]!;
    return value;
  }
  const text = cString(buf, start, length).trim();
  return text === '' ? 0 : parseInt(text, 8);
}

function typeOf(flag: string): TarEntryType {
  switch (flag) {
    case '0': case '\0': case '7': case 'S': return 'file';
    case '1': return 'hardlink';
    case '2': return 'symlink';
    case '3': return 'chardev';
    case '4': return 'blockdev';
    case '5': case 'D': return 'directory';
    case '6': return 'fifo';
    default: return 'other';
  }
}

/** pax extended header records: "<len> <key>=<value>\n". */
function parsePax(data: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < data.length) {
    const space = data.indexOf(0x20, pos);
    if (space < 0) break;
    const len = parseInt(data.subarray(pos, space).toString('ascii'), 10);
    if (!Number.isSafeInteger(len) || len <= 0 || pos + len > data.length) throw new Error(`bad pax record at byte ${pos}`);
    const record = data.subarray(space + 1, pos + len - 1).toString('utf8');
    const eq = record.indexOf('=');
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    pos += len;
  }
  return out;
}

/**
 * Lists the entries of a tar file by reading its headers only (data is skipped by offset). Handles ustar,
 * POSIX pax (path, linkpath, size, GNU.sparse.name), GNU long names/links and GNU sparse headers.
 * ROOTFS_DIFF_INVALID for anything that is not a well-formed tar (bad checksum, truncation).
 */
export async function readTarEntries(tarFile: string, options: { signal?: AbortSignal } = {}): Promise<TarEntry[]> {
  const step = 'read rootfs diff';
  const bad = (message: string, offset: number): RootfsError =>
    new RootfsError(RootfsErrorCode.DIFF_INVALID, `${tarFile}: ${message} (at byte ${offset})`, { step, evidence: { offset } });
  let fh: FileHandle;
  try {
    fh = await open(tarFile, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
  } catch (err) {
    throw new RootfsError(RootfsErrorCode.IO, `cannot open ${tarFile}: ${(err as Error).message}`, { step, cause: err });
  }
  try {
    const fileSize = (await fh.stat()).size;
    const header = Buffer.alloc(BLOCK);
    // Headers of small files sit close together: read 64 KiB windows and serve most headers from memory, so
    // that validating thousands of entries costs a few reads, not one per header.
    const window = { start: 0, length: 0, buffer: Buffer.alloc(TAR_READ_WINDOW_BYTES) };
    const readAt = async (buf: Buffer, offset: number): Promise<void> => {
      if (offset < window.start || offset + buf.length > window.start + window.length) {
        if (buf.length > window.buffer.length) {
          const { bytesRead } = await fh.read(buf, 0, buf.length, offset);
          if (bytesRead !== buf.length) throw bad('truncated', offset);
          return;
        }
        const { bytesRead } = await fh.read(window.buffer, 0, window.buffer.length, offset);
        window.start = offset;
        window.length = bytesRead;
        if (bytesRead < buf.length) throw bad('truncated', offset);
      }
      window.buffer.copy(buf, 0, offset - window.start, offset - window.start + buf.length);
    };
    const entries: TarEntry[] = [];
    let offset = 0;
    let pax = new Map<string, string>();
    const globalPax = new Map<string, string>();
    let longName: string | undefined;
    let longLink: string | undefined;
    for (;;) {
      throwIfAborted(options.signal, step);
      if (offset + BLOCK > fileSize) throw bad('truncated: no end-of-archive marker', offset);
      await readAt(header, offset);
      if (header.every((b) => b === 0)) break; // end of archive (the second zero block and padding follow)
      let sum = 0;
      for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i]!;
      if (sum !== tarNumber(header, 148, 8)) throw bad('bad header checksum (not a tar, or corrupt)', offset);
      const typeflag = String.fromCharCode(header[156]!);
      let size = tarNumber(header, 124, 12);
      const headerOffset = offset;
      offset += BLOCK;
      if (typeflag === 'S' && header[482] === 1) {
        // Old GNU sparse: extension blocks follow the header, each ending with its own "isextended" byte.
        const ext = Buffer.alloc(BLOCK);
        do {
          await readAt(ext, offset);
          offset += BLOCK;
        } while (ext[504] === 1);
      }
      const readData = async (): Promise<Buffer> => {
        if (size > 16 * 1024 * 1024) throw bad(`a ${size}-byte metadata header`, headerOffset);
        const data = Buffer.alloc(size);
        if (size > 0) await readAt(data, offset);
        return data;
      };
      if (typeflag === 'x' || typeflag === 'g' || typeflag === 'L' || typeflag === 'K') {
        const data = await readData();
        try {
          if (typeflag === 'x') pax = parsePax(data);
          else if (typeflag === 'g') for (const [k, v] of parsePax(data)) globalPax.set(k, v);
          else if (typeflag === 'L') longName = cString(data, 0, data.length);
          else longLink = cString(data, 0, data.length);
        } catch (err) {
          throw bad((err as Error).message, headerOffset);
        }
        offset += Math.ceil(size / BLOCK) * BLOCK;
        continue;
      }
      const magic = header.subarray(257, 263).toString('latin1');
      const prefix = magic === 'ustar\0' ? cString(header, 345, 155) : '';
      const name = cString(header, 0, 100);
      const path =
        pax.get('GNU.sparse.name') ?? pax.get('path') ?? longName ?? globalPax.get('path') ?? (prefix ? `${prefix}/${name}` : name);
      const linkpath = pax.get('linkpath') ?? longLink ?? cString(header, 157, 100);
      if (pax.has('size')) size = Number(pax.get('size'));
      const type = typeOf(typeflag);
      entries.push({ path, type, linkpath, size, typeflag });
      // Hard links, symlinks, devices, directories and FIFOs carry no data.
      if (type === 'file' || type === 'other') offset += Math.ceil(size / BLOCK) * BLOCK;
      pax = new Map();
      longName = undefined;
      longLink = undefined;
    }
    return entries;
  } finally {
    await fh.close();
  }
}

/** A member name as a path relative to the rootfs: './a/b/' → 'a/b'; '.' or './' → ''. */
function normalizeMember(path: string): string {
  let p = path;
  while (p.startsWith('./')) p = p.slice(2);
  if (p === '.') return '';
  return p.replace(/\/+$/, '');
}

/**
 * Validates a diff's entries before anything is extracted (see the file comment, Apply step 1). Pure.
 * Throws ROOTFS_DIFF_UNSAFE naming the first bad entry. Returns the entries with normalized paths.
 */
export function checkTarEntries(entries: readonly TarEntry[]): TarEntry[] {
  const step = 'validate rootfs diff';
  const unsafe = (entry: TarEntry, why: string): RootfsError =>
    new RootfsError(RootfsErrorCode.DIFF_UNSAFE, `entry ${JSON.stringify(entry.path)} ${why}; the diff is refused`, {
      step,
      evidence: { entry: entry.path, type: entry.type, linkpath: entry.linkpath },
    });
  const seen = new Map<string, TarEntryType>();
  const out: TarEntry[] = [];
  for (const entry of entries) {
    if (entry.path.startsWith('/')) throw unsafe(entry, 'is an absolute path');
    const path = normalizeMember(entry.path);
    if (path === '' && entry.type === 'directory') continue; // the archive's root: the rootfs itself
    const bad = checkRelativePath(path);
    if (bad !== undefined) throw unsafe(entry, `${bad}`);
    if (entry.type === 'chardev' || entry.type === 'blockdev') throw unsafe(entry, 'is a device node');
    if (entry.type === 'other') throw unsafe(entry, `has tar type ${JSON.stringify(entry.typeflag)}, which a rootfs diff never holds`);
    if (seen.has(path)) throw unsafe(entry, 'appears twice');
    const segments = path.split('/');
    for (let i = 1; i < segments.length; i++) {
      const parent = segments.slice(0, i).join('/');
      const parentType = seen.get(parent);
      if (parentType !== undefined && parentType !== 'directory') {
        throw unsafe(entry, `lies under ${JSON.stringify(parent)}, a ${parentType} of the same archive (a write through it could leave the rootfs)`);
      }
    }
    if (entry.type === 'hardlink') {
      const target = normalizeMember(entry.linkpath);
      const badLink = entry.linkpath.startsWith('/') ? 'is absolute' : checkRelativePath(target);
      if (badLink !== undefined) throw unsafe(entry, `is a hard link to ${JSON.stringify(entry.linkpath)}, which ${badLink}`);
      const targetType = seen.get(target);
      if (targetType === undefined || targetType === 'directory') {
        throw unsafe(entry, `is a hard link to ${JSON.stringify(entry.linkpath)}, which is not an earlier file of the archive`);
      }
    }
    seen.set(path, entry.type);
    out.push({ ...entry, path });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// apply

export interface ApplyRootfsDiffOptions {
  /** The target container's rootfs (bundle rootfs or overlay merged directory), absolute. */
  rootfs: string;
  tarFile: string;
  deletedFilesFile: string;
  tarPath?: string;
  timeoutMs?: number;
  signal?: AbortSignal;
  logger?: Logger;
}

export interface ApplyRootfsDiffResult {
  entries: number;
  deleted: number;
  /** Deletions not applied because a symlink lies on their path in the rootfs. */
  skipped: string[];
  ms: number;
  phaseMs: { validate: number; delete: number; extract: number };
}

/** lstat that answers undefined for a missing path. */
async function lstatOrUndefined(path: string): Promise<Stats | undefined> {
  try {
    return await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
    throw err;
  }
}

/**
 * How `rel` resolves inside `rootfs` without following symlinks: 'ok' when every parent is a real
 * directory (or missing), else the first parent that is a symlink or a non-directory.
 */
async function parentsInside(rootfs: string, rel: string): Promise<{ ok: true } | { ok: false; at: string; what: string }> {
  const segments = rel.split('/');
  for (let i = 1; i < segments.length; i++) {
    const parent = segments.slice(0, i).join('/');
    const st = await lstatOrUndefined(join(rootfs, parent));
    if (st === undefined) return { ok: true };
    if (!st.isDirectory()) return { ok: false, at: parent, what: st.isSymbolicLink() ? 'a symlink' : 'not a directory' };
  }
  return { ok: true };
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

/**
 * Applies a rootfs diff to a container's rootfs before its process runs (see the file comment, Apply).
 * Idempotent: applying twice gives the same tree. Errors: ROOTFS_DIFF_UNSAFE (nothing written when the
 * archive itself is unsafe), ROOTFS_DIFF_INVALID, ROOTFS_TAR_FAILED, ROOTFS_ABORTED, ROOTFS_IO.
 */
export async function applyRootfsDiff(options: ApplyRootfsDiffOptions): Promise<ApplyRootfsDiffResult> {
  const step = 'apply rootfs diff';
  const logger = options.logger ?? silentLogger;
  const { rootfs } = options;
  const t0 = performance.now();
  const entries = checkTarEntries(await readTarEntries(options.tarFile, { signal: options.signal }));
  const deletions = parseDeletedFiles(await readFile(options.deletedFilesFile, 'utf8'));
  const rootStat = await lstatOrUndefined(rootfs);
  if (!rootStat?.isDirectory()) {
    throw new RootfsError(RootfsErrorCode.IO, `rootfs ${rootfs} is not a directory`, { step, evidence: { rootfs } });
  }
  const t1 = performance.now();

  const skipped: string[] = [];
  try {
    // Deletions first: an opaque directory is emptied here and refilled by the archive.
    for (const rel of deletions) {
      throwIfAborted(options.signal, step);
      const parents = await parentsInside(rootfs, rel);
      if (!parents.ok) {
        skipped.push(rel);
        logger.warn('rootfs diff deletion skipped: a parent in the rootfs is not a directory', { path: rel, at: parents.at, what: parents.what });
        continue;
      }
      await rm(join(rootfs, rel), { recursive: true, force: true }); // removes a symlink itself, never its target
    }
    // Make room where the archive and the rootfs disagree on what a path is, and refuse to write through a
    // symlink of the rootfs that the archive does not replace.
    const archiveDirs = new Set(entries.filter((e) => e.type === 'directory').map((e) => e.path));
    // Parents repeat across entries: remember what each one is (only parents the archive does not hold,
    // which this loop never removes).
    const parentStats = new Map<string, Stats | undefined>();
    for (const entry of entries) {
      throwIfAborted(options.signal, step);
      const segments = entry.path.split('/');
      for (let i = 1; i < segments.length; i++) {
        const parent = segments.slice(0, i).join('/');
        if (archiveDirs.has(parent)) continue; // checked (and made a directory) as an entry of its own
        if (!parentStats.has(parent)) parentStats.set(parent, await lstatOrUndefined(join(rootfs, parent)));
        const st = parentStats.get(parent);
        if (st !== undefined && !st.isDirectory()) {
          throw new RootfsError(
            RootfsErrorCode.DIFF_UNSAFE,
            `entry ${JSON.stringify(entry.path)} would be written through ${JSON.stringify(parent)}, ${st.isSymbolicLink() ? 'a symlink' : 'not a directory'} in the rootfs; the diff is refused`,
            { step, evidence: { entry: entry.path, at: parent } },
          );
        }
        if (st === undefined) break; // tar creates the rest
      }
      const target = join(rootfs, entry.path);
      const st = await lstatOrUndefined(target);
      if (st === undefined) continue;
      if (entry.type === 'directory' ? !st.isDirectory() : st.isDirectory()) await rm(target, { recursive: true, force: true });
    }
  } catch (err) {
    if (err instanceof ThawError) throw err;
    throw new RootfsError(RootfsErrorCode.IO, `cannot prepare ${rootfs}: ${(err as Error).message}`, { step, cause: err });
  }
  const t2 = performance.now();

  await runTar(
    options.tarPath ?? DEFAULT_TAR_PATH,
    [
      '--extract',
      `--file=${options.tarFile}`,
      `--directory=${rootfs}`,
      '--numeric-owner',
      '--same-owner',
      '--preserve-permissions',
      '--xattrs',
      '--xattrs-include=*',
      ...TAR_XATTR_EXCLUDES.map((x) => `--xattrs-exclude=${x}`),
      // Directory metadata (mode, mtime) is restored after their content, so a read-only directory gets filled.
      '--delay-directory-restore',
    ],
    { step, timeoutMs: options.timeoutMs, signal: options.signal },
  );
  const t3 = performance.now();
  const result: ApplyRootfsDiffResult = {
    entries: entries.length,
    deleted: deletions.length - skipped.length,
    skipped,
    ms: t3 - t0,
    phaseMs: { validate: t1 - t0, delete: t2 - t1, extract: t3 - t2 },
  };
  logger.info('rootfs diff applied', { rootfs, entries: result.entries, deleted: result.deleted, ms: result.ms });
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// helpers

function throwIfAborted(signal: AbortSignal | undefined, step: string): void {
  if (signal?.aborted) throw new RootfsError(RootfsErrorCode.ABORTED, 'aborted by the caller', { step, cause: signal.reason });
}

/** Runs GNU tar; ROOTFS_TAR_FAILED with its exit status and stderr on failure or timeout. */
async function runTar(
  tarPath: string,
  args: string[],
  options: { step: string; input?: Buffer; timeoutMs?: number | undefined; signal?: AbortSignal | undefined },
): Promise<void> {
  throwIfAborted(options.signal, options.step);
  const timeoutMs = options.timeoutMs ?? DEFAULT_TAR_TIMEOUT_MS;
  const signals = [AbortSignal.timeout(timeoutMs), ...(options.signal ? [options.signal] : [])];
  const signal = AbortSignal.any(signals);
  await new Promise<void>((resolve, reject) => {
    const child = spawn(tarPath, args, { stdio: [options.input ? 'pipe' : 'ignore', 'ignore', 'pipe'], signal, killSignal: 'SIGKILL' });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => {
      if (stderr.length < STDERR_LIMIT_BYTES) stderr += d.toString();
    });
    if (options.input) {
      child.stdin!.on('error', () => undefined); // tar exiting early shows up as its exit status
      child.stdin!.end(options.input);
    }
    child.once('error', (err) => {
      if (options.signal?.aborted) {
        reject(new RootfsError(RootfsErrorCode.ABORTED, 'aborted by the caller', { step: options.step, cause: options.signal.reason }));
      } else if (signal.aborted) {
        reject(new RootfsError(RootfsErrorCode.TAR_FAILED, `${tarPath} ran past ${timeoutMs} ms and was killed`, { step: options.step, evidence: { stderr } }));
      } else {
        reject(new RootfsError(RootfsErrorCode.TAR_FAILED, `cannot run ${tarPath}: ${err.message}`, { step: options.step, cause: err }));
      }
    });
    child.once('close', (code, sig) => {
      if (code === 0) return resolve();
      if (signal.aborted) return; // the 'error' handler reports it
      const status = code === null ? `killed by ${sig}` : `exit status ${code}`;
      const firstLine = stderr.trim().split('\n')[0] ?? '';
      reject(
        new RootfsError(RootfsErrorCode.TAR_FAILED, `${tarPath} failed (${status}): ${firstLine}`, {
          step: options.step,
          evidence: { status: code, signal: sig, stderr, args },
        }),
      );
    });
  });
}
