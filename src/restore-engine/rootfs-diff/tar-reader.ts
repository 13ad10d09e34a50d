/**
 * The one reader of a rootfs diff: it decodes each header (tar-format.ts), validates the entry against those
 * before it (EntryChecker), and only then hands it on: to a list (readTarEntries, the first pass of apply) or
 * to the applier with its data (apply.ts, the second pass). What is applied is what was validated: both passes
 * run this code, and apply checks that its second pass meets the same entries as its first.
 */
import { constants as fsConstants, fstatSync, openSync, read as readCb, closeSync } from 'node:fs';
import { promisify } from 'node:util';
import { checkRelativePath } from '../../store/index.js';
import { RootfsError, RootfsErrorCode, throwIfAborted } from './errors.js';
import { BLOCK, checksumOk, cString, parsePax, tarNumber, typeOf, type TarEntry, type TarEntryType } from './tar-format.js';

const read = promisify(readCb);
const WINDOW_BYTES = 1024 * 1024;
const MAX_PAX_BYTES = 1024 * 1024;

/** Positional reads of an archive through a 1 MiB window: headers of small files cost no extra read. */
export class ArchiveFile {
  private window = { start: 0, length: 0, buffer: Buffer.alloc(WINDOW_BYTES) };
  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
  ) {}

  static open(path: string, step: string): ArchiveFile {
    let fd: number;
    try {
      fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
    } catch (err) {
      throw new RootfsError(RootfsErrorCode.IO, `cannot open ${path}: ${(err as Error).message}`, { step, cause: err });
    }
    const st = fstatSync(fd);
    if (!st.isFile()) {
      closeSync(fd);
      throw new RootfsError(RootfsErrorCode.DIFF_INVALID, `${path} is not a regular file`, { step });
    }
    return new ArchiveFile(path, fd, st.size);
  }

  close(): void {
    closeSync(this.fd);
  }

  /** `length` bytes at `offset` (a view into the window when they fit; copy it to keep it past the next read). */
  async bytes(offset: number, length: number, bad: (m: string, o: number) => Error): Promise<Buffer> {
    if (offset + length > this.size) throw bad('truncated', offset);
    const w = this.window;
    if (offset >= w.start && offset + length <= w.start + w.length) return w.buffer.subarray(offset - w.start, offset - w.start + length);
    if (length > w.buffer.length) {
      const out = Buffer.alloc(length);
      const { bytesRead } = await read(this.fd, out, 0, length, offset);
      if (bytesRead !== length) throw bad('truncated', offset);
      return out;
    }
    const { bytesRead } = await read(this.fd, w.buffer, 0, w.buffer.length, offset);
    w.start = offset;
    w.length = bytesRead;
    if (bytesRead < length) throw bad('truncated', offset);
    return w.buffer.subarray(0, length);
  }
}

/** A member name as a path relative to the rootfs: './a/b/' → 'a/b'; '.' or './' → ''. */
export function normalizeMember(path: string): string {
  let p = path;
  while (p.startsWith('./')) p = p.slice(2);
  if (p === '.') return '';
  return p.replace(/\/+$/, '');
}

/**
 * The rules an entry must meet given those before it; `check` throws ROOTFS_DIFF_UNSAFE or ROOTFS_DIFF_ORDER
 * naming the entry, and answers the entry with its normalized path (undefined for the archive's root `./`).
 *   - no absolute path, no `..`, no empty or odd segment (checkRelativePath), no duplicate;
 *   - no device node, no type a rootfs diff never holds;
 *   - nothing under an earlier non-directory of the archive (a symlink above all);
 *   - a parent that the archive holds comes before its children (a later entry for an earlier child's parent
 *     is refused: the child was written through whatever the rootfs had there);
 *   - hard links only to an earlier regular file of the archive.
 */
export class EntryChecker {
  private readonly seen = new Map<string, TarEntryType>();
  /** Parents that children used before any entry of theirs appeared. */
  private readonly usedParents = new Set<string>();

  check(entry: TarEntry, step: string): TarEntry | undefined {
    const unsafe = (why: string, code: RootfsErrorCode = RootfsErrorCode.DIFF_UNSAFE): RootfsError =>
      new RootfsError(code, `entry ${JSON.stringify(entry.path)} ${why}; the diff is refused`, {
        step,
        evidence: { entry: entry.path, type: entry.type, linkpath: entry.linkpath },
      });
    if (entry.path.startsWith('/')) throw unsafe('is an absolute path');
    const path = normalizeMember(entry.path);
    if (path === '' && entry.type === 'directory') return undefined; // the archive's root: the rootfs itself
    const bad = checkRelativePath(path);
    if (bad !== undefined) throw unsafe(`${bad}`);
    if (entry.type === 'chardev' || entry.type === 'blockdev') throw unsafe('is a device node');
    if (entry.type === 'other') throw unsafe(`has tar type ${JSON.stringify(entry.typeflag)}, which a rootfs diff never holds`);
    if (this.seen.has(path)) throw unsafe('appears twice');
    if (this.usedParents.has(path)) throw unsafe('comes after entries below it (a child before its parent)', RootfsErrorCode.DIFF_ORDER);
    const segments = path.split('/');
    for (let i = 1; i < segments.length; i++) {
      const parent = segments.slice(0, i).join('/');
      const parentType = this.seen.get(parent);
      if (parentType === undefined) this.usedParents.add(parent);
      else if (parentType !== 'directory') {
        throw unsafe(`lies under ${JSON.stringify(parent)}, a ${parentType} of the same archive (a write through it could leave the rootfs)`);
      }
    }
    if (entry.type === 'hardlink') {
      const target = normalizeMember(entry.linkpath);
      const badLink = entry.linkpath.startsWith('/') ? 'is absolute' : checkRelativePath(target);
      if (badLink !== undefined) throw unsafe(`is a hard link to ${JSON.stringify(entry.linkpath)}, which ${badLink}`);
      if (this.seen.get(target) !== 'file') {
        throw unsafe(`is a hard link to ${JSON.stringify(entry.linkpath)}, which is not an earlier file of the archive`);
      }
    }
    this.seen.set(path, entry.type);
    return { ...entry, path };
  }
}

/** A validated entry and where its data starts in the archive. */
export interface PlacedEntry {
  entry: TarEntry;
  dataOffset: number;
}

/**
 * Every entry of the archive, decoded and validated in order (see the file comment); `onEntry` runs for each
 * valid entry before the next header is read. Errors: ROOTFS_DIFF_INVALID (not a well-formed tar of the kind
 * thaw writes), ROOTFS_DIFF_GLOBAL_PAX, ROOTFS_DIFF_UNSAFE, ROOTFS_DIFF_ORDER, ROOTFS_ABORTED.
 */
export async function forEachEntry(
  archive: ArchiveFile,
  step: string,
  onEntry: (placed: PlacedEntry) => Promise<void> | void,
  options: { signal?: AbortSignal | undefined; validate?: boolean } = {},
): Promise<void> {
  const bad = (message: string, offset: number): RootfsError =>
    new RootfsError(RootfsErrorCode.DIFF_INVALID, `${archive.path}: ${message} (at byte ${offset})`, { step, evidence: { offset } });
  const checker = new EntryChecker();
  let offset = 0;
  let pax: Map<string, Buffer> | undefined;
  for (;;) {
    throwIfAborted(options.signal, step);
    if (offset + BLOCK > archive.size) throw bad('truncated: no end-of-archive marker', offset);
    const header = Buffer.from(await archive.bytes(offset, BLOCK, bad));
    if (header.every((b) => b === 0)) {
      if (pax !== undefined) throw bad('a pax header with no entry after it', offset);
      return;
    }
    if (!checksumOk(header)) throw bad('bad header checksum (not a tar, or corrupt)', offset);
    const typeflag = String.fromCharCode(header[156]!);
    const headerOffset = offset;
    let size = tarNumber(header, 124, 12);
    if (!Number.isSafeInteger(size) || size < 0) throw bad('bad size field', offset);
    offset += BLOCK;
    if (typeflag === 'g') {
      throw new RootfsError(RootfsErrorCode.DIFF_GLOBAL_PAX, `${archive.path}: a global pax header (at byte ${headerOffset}); the diff is refused`, {
        step,
        evidence: { offset: headerOffset },
      });
    }
    if (typeflag === 'L' || typeflag === 'K' || typeflag === 'S') {
      throw bad(`a GNU ${typeflag === 'S' ? 'old sparse' : 'long name'} header, which thaw's writer never makes`, headerOffset);
    }
    if (typeflag === 'x') {
      if (pax !== undefined) throw bad('two pax headers for one entry', headerOffset);
      if (size > MAX_PAX_BYTES) throw bad(`a ${size}-byte pax header`, headerOffset);
      try {
        pax = parsePax(Buffer.from(await archive.bytes(offset, size, bad)));
      } catch (err) {
        if (err instanceof RootfsError) throw err;
        throw bad((err as Error).message, headerOffset);
      }
      offset += Math.ceil(size / BLOCK) * BLOCK;
      continue;
    }
    const text = (key: string): string | undefined => pax?.get(key)?.toString('utf8');
    const num = (key: string, fallback: number): number => {
      const v = text(key);
      if (v === undefined) return fallback;
      if (!/^[0-9]{1,16}$/.test(v)) throw bad(`pax ${key} ${JSON.stringify(v)} is not a number`, headerOffset);
      return Number(v);
    };
    const magic = header.subarray(257, 263).toString('latin1');
    const prefix = magic === 'ustar\0' ? cString(header, 345, 155) : '';
    const name = cString(header, 0, 100);
    const sparse = text('GNU.sparse.major');
    if (sparse !== undefined && (sparse !== '1' || text('GNU.sparse.minor') !== '0' || !pax!.has('GNU.sparse.name'))) {
      throw bad(`sparse format ${sparse}.${text('GNU.sparse.minor')} is not the one thaw writes (1.0)`, headerOffset);
    }
    const path = text('GNU.sparse.name') ?? text('path') ?? (prefix ? `${prefix}/${name}` : name);
    const linkpath = text('linkpath') ?? cString(header, 157, 100);
    size = num('size', size);
    const xattrs = new Map<string, Buffer>();
    for (const [key, value] of pax ?? []) if (key.startsWith('SCHILY.xattr.')) xattrs.set(key.slice('SCHILY.xattr.'.length), Buffer.from(value));
    const type = typeOf(typeflag);
    if (type !== 'file' && size !== 0 && type !== 'other') throw bad(`a ${type} entry with ${size} bytes of data`, headerOffset);
    const fields = { mode: tarNumber(header, 100, 8), uid: num('uid', tarNumber(header, 108, 8)), gid: num('gid', tarNumber(header, 116, 8)), mtime: tarNumber(header, 136, 12) };
    if (Object.values(fields).some((v) => !Number.isSafeInteger(v))) throw bad('a numeric field that is not octal', headerOffset);
    const entry: TarEntry = { path, type, linkpath, size, typeflag, ...fields, xattrs };
    if (sparse !== undefined) entry.sparseRealSize = num('GNU.sparse.realsize', -1);
    if (entry.sparseRealSize !== undefined && entry.sparseRealSize < 0) throw bad('a sparse file without its real size', headerOffset);
    pax = undefined;
    const dataOffset = offset;
    offset += Math.ceil(size / BLOCK) * BLOCK;
    if (offset > archive.size) throw bad('truncated', dataOffset);
    const valid = options.validate === false ? entry : checker.check(entry, step);
    if (valid !== undefined) await onEntry({ entry: valid, dataOffset });
  }
}

/**
 * Lists the entries of a rootfs-diff archive as stored (paths not normalized), reading headers only. It runs the
 * reader without the entry rules, for inspection and tests; apply validates. ROOTFS_DIFF_INVALID for anything
 * that is not a well-formed tar of the kind thaw writes.
 */
export async function readTarEntries(tarFile: string, options: { signal?: AbortSignal } = {}): Promise<TarEntry[]> {
  const archive = ArchiveFile.open(tarFile, 'read rootfs diff');
  try {
    const out: TarEntry[] = [];
    await forEachEntry(archive, 'read rootfs diff', ({ entry }) => void out.push(entry), { signal: options.signal, validate: false });
    return out;
  } finally {
    archive.close();
  }
}
