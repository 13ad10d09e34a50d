/**
 * The tar format of a rootfs diff, both ways, with no I/O: POSIX ustar headers, pax extended headers ('x') for
 * what ustar cannot hold (long names and link targets, large sizes and ids, xattrs as `SCHILY.xattr.<name>`),
 * and sparse files as GNU's PAX sparse format 1.0 (`GNU.sparse.major=1`: a map of data extents at the start of
 * the entry's data, then the extents' bytes). GNU tar, bsdtar and Go's archive/tar read what this writes.
 *
 * The reader (tar-reader.ts) accepts exactly what this writer makes: ustar types 0 1 2 5 6 (3 and 4 decode, to be
 * refused by name), 'x' headers. Global pax headers ('g'), GNU long names ('L', 'K') and old GNU sparse ('S')
 * are refused: a header that changes how later headers read is a way to make two readers disagree.
 * Modification times are kept to the second (ustar's field); sub-second times are not carried.
 */
export const BLOCK = 512;

export type TarEntryType = 'file' | 'hardlink' | 'symlink' | 'chardev' | 'blockdev' | 'directory' | 'fifo' | 'other';

export interface TarEntry {
  /** As stored (`./a/b`, `./dir/`), after the pax `path` or `GNU.sparse.name` override. */
  path: string;
  type: TarEntryType;
  /** Symlink target or hard-link source. */
  linkpath: string;
  /** Bytes of data that follow the header in the archive (for a sparse file: its map and its extents). */
  size: number;
  /** The typeflag character, for messages. */
  typeflag: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  /** `SCHILY.xattr.*` records, by attribute name. */
  xattrs: Map<string, Buffer>;
  /** Set for a PAX 1.0 sparse file: its real size (extents follow the map in the data). */
  sparseRealSize?: number;
}

/** What the writer is given for one entry. */
export interface TarEntryInput {
  path: string;
  type: 'file' | 'hardlink' | 'symlink' | 'directory' | 'fifo';
  linkpath?: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  /** Regular files: the bytes that follow (for a sparse file, the sum of its extents). */
  size?: number;
  xattrs?: ReadonlyMap<string, Buffer>;
  /** A sparse regular file: its real size and its data extents [offset, length]. */
  sparse?: { realSize: number; extents: ReadonlyArray<readonly [number, number]> };
}

const TYPEFLAG: Record<TarEntryInput['type'], string> = { file: '0', hardlink: '1', symlink: '2', directory: '5', fifo: '6' };
const MAX_OCTAL_11 = 0o77777777777;
const MAX_OCTAL_7 = 0o7777777;

function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`), value, Buffer.from('\n')]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len)), body]);
}

function padded(data: Buffer): Buffer {
  const pad = (BLOCK - (data.length % BLOCK)) % BLOCK;
  return pad === 0 ? data : Buffer.concat([data, Buffer.alloc(pad)]);
}

function octal(h: Buffer, value: number, offset: number, width: number): void {
  h.write(`${value.toString(8).padStart(width - 1, '0')}\0`, offset, width, 'latin1');
}

function ustarHeader(name: Buffer, typeflag: string, size: number, e: TarEntryInput, linkname: Buffer): Buffer {
  const h = Buffer.alloc(BLOCK);
  name.copy(h, 0, 0, Math.min(name.length, 100));
  octal(h, e.mode & 0o7777, 100, 8);
  octal(h, Math.min(e.uid, MAX_OCTAL_7), 108, 8);
  octal(h, Math.min(e.gid, MAX_OCTAL_7), 116, 8);
  octal(h, Math.min(size, MAX_OCTAL_11), 124, 12);
  octal(h, Math.max(0, Math.min(Math.floor(e.mtime), MAX_OCTAL_11)), 136, 12);
  h.write('        ', 148, 'latin1');
  h.write(typeflag, 156, 'latin1');
  linkname.copy(h, 157, 0, Math.min(linkname.length, 100));
  h.write('ustar\0', 257, 'latin1');
  h.write('00', 263, 'latin1');
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
  return h;
}

/** The sparse map that starts a PAX 1.0 sparse entry's data, padded to a block. */
export function encodeSparseMap(extents: ReadonlyArray<readonly [number, number]>): Buffer {
  return padded(Buffer.from(`${extents.length}\n${extents.map(([o, l]) => `${o}\n${l}\n`).join('')}`));
}

/**
 * The header blocks of one entry: a pax 'x' header when ustar cannot hold it, then the ustar header. The
 * entry's data (and, for a sparse file, the map from encodeSparseMap before it) follows, padded to a block.
 */
export function encodeHeader(e: TarEntryInput): Buffer {
  const records: Buffer[] = [];
  const path = Buffer.from(e.path);
  const linkpath = Buffer.from(e.linkpath ?? '');
  let size = e.type === 'file' ? (e.size ?? 0) : 0;
  let name = path;
  if (e.sparse) {
    size += encodeSparseMap(e.sparse.extents).length;
    records.push(paxRecord('GNU.sparse.major', Buffer.from('1')), paxRecord('GNU.sparse.minor', Buffer.from('0')));
    records.push(paxRecord('GNU.sparse.name', path), paxRecord('GNU.sparse.realsize', Buffer.from(String(e.sparse.realSize))));
    name = Buffer.from('./GNUSparseFile.0/sparse');
  } else if (path.length > 100) records.push(paxRecord('path', path));
  if (linkpath.length > 100) records.push(paxRecord('linkpath', linkpath));
  if (size > MAX_OCTAL_11) records.push(paxRecord('size', Buffer.from(String(size))));
  if (e.uid > MAX_OCTAL_7) records.push(paxRecord('uid', Buffer.from(String(e.uid))));
  if (e.gid > MAX_OCTAL_7) records.push(paxRecord('gid', Buffer.from(String(e.gid))));
  for (const [key, value] of e.xattrs ?? []) records.push(paxRecord(`SCHILY.xattr.${key}`, value));
  const main = ustarHeader(name, TYPEFLAG[e.type], size, e, linkpath);
  if (records.length === 0) return main;
  const pax = Buffer.concat(records);
  const paxHeader = ustarHeader(Buffer.from('./PaxHeaders/entry'), 'x', pax.length, { ...e, mode: 0o644 }, Buffer.alloc(0));
  return Buffer.concat([paxHeader, padded(pax), main]);
}

/** The end of an archive: two zero blocks. */
export const END_OF_ARCHIVE = Buffer.alloc(2 * BLOCK);

// ---- decoding -------------------------------------------------------------------------------------------

export function cString(buf: Buffer, start: number, length: number): string {
  const slice = buf.subarray(start, start + length);
  const nul = slice.indexOf(0);
  return slice.subarray(0, nul < 0 ? slice.length : nul).toString('utf8');
}

/** Octal numeric field, or GNU base-256 when the high bit of the first byte is set; NaN when neither. */
export function tarNumber(buf: Buffer, start: number, length: number): number {
  if ((buf[start]! & 0x80) !== 0) {
    let value = buf[start]! & 0x7f;
    for (let i = 1; i < length; i++) value = value * 256 + buf[start + i]!;
    return value;
  }
  const text = cString(buf, start, length).trim();
  if (text === '') return 0;
  return /^[0-7]+$/.test(text) ? parseInt(text, 8) : NaN;
}

export function typeOf(flag: string): TarEntryType {
  switch (flag) {
    case '0': case '\0': case '7': return 'file';
    case '1': return 'hardlink';
    case '2': return 'symlink';
    case '3': return 'chardev';
    case '4': return 'blockdev';
    case '5': return 'directory';
    case '6': return 'fifo';
    default: return 'other';
  }
}

/** True when the 512-byte block's checksum is right. */
export function checksumOk(h: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
  return sum === tarNumber(h, 148, 8);
}

/** pax extended header records "<len> <key>=<value>\n"; values are raw bytes (xattrs are binary). */
export function parsePax(data: Buffer): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break; // padding
    const space = data.indexOf(0x20, pos);
    if (space < 0) throw new Error(`bad pax record at byte ${pos}`);
    const lenText = data.subarray(pos, space).toString('ascii');
    const len = /^[0-9]+$/.test(lenText) ? parseInt(lenText, 10) : NaN;
    if (!Number.isSafeInteger(len) || len <= space - pos + 1 || pos + len > data.length || data[pos + len - 1] !== 0x0a) {
      throw new Error(`bad pax record at byte ${pos}`);
    }
    const record = data.subarray(space + 1, pos + len - 1);
    const eq = record.indexOf(0x3d);
    if (eq <= 0) throw new Error(`bad pax record at byte ${pos}`);
    const key = record.subarray(0, eq).toString('utf8');
    if (out.has(key)) throw new Error(`pax key ${JSON.stringify(key)} appears twice`);
    out.set(key, record.subarray(eq + 1));
    pos += len;
  }
  return out;
}

/** Parses a PAX 1.0 sparse map from the start of `data`: the extents and the map's length (block-padded). */
export function decodeSparseMap(data: Buffer): { extents: Array<[number, number]>; mapBytes: number } | undefined {
  const numbers: number[] = [];
  let pos = 0;
  let count = -1;
  while (count < 0 || numbers.length < 2 * count) {
    const nl = data.indexOf(0x0a, pos);
    if (nl < 0) return undefined; // need more data
    const text = data.subarray(pos, nl).toString('ascii');
    if (!/^[0-9]{1,16}$/.test(text)) throw new Error('bad sparse map');
    const n = Number(text);
    if (count < 0) {
      if (n > 1_000_000) throw new Error('sparse map too long');
      count = n;
    } else numbers.push(n);
    pos = nl + 1;
  }
  const extents: Array<[number, number]> = [];
  for (let i = 0; i < numbers.length; i += 2) extents.push([numbers[i]!, numbers[i + 1]!]);
  return { extents, mapBytes: Math.ceil(pos / BLOCK) * BLOCK };
}
