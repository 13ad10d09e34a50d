/**
 * CRIU image files, the few thaw reads or rewrites (`proto/criu/images.proto`): pure framing and decoding at
 * the bottom, no I/O. An image file is two u32 magics then entries, each a u32 length (little endian) and one
 * protobuf message; `pages-<id>.img` is raw pages in pagemap order and is not read here.
 */
import protobuf from 'protobufjs';
import { CriuError, CriuErrorCode } from './errors.js';
import { criuProtoPath } from './rpc.js';

export const CRIU_PAGE_BYTES = 4096;

/** VMA status bits (CRIU's image.h) that decide whether a page may be left out of the images. */
export const VmaStatus = {
  AREA_REGULAR: 1 << 0,
  FILE_PRIVATE: 1 << 6,
  FILE_SHARED: 1 << 7,
  ANON_SHARED: 1 << 8,
  ANON_PRIVATE: 1 << 9,
  AREA_SYSVIPC: 1 << 10,
  AREA_SOCKET: 1 << 11,
  AREA_VVAR: 1 << 12,
  AREA_AIORING: 1 << 13,
  AREA_MEMFD: 1 << 14,
  AREA_SHSTK: 1 << 15,
} as const;

/** pagemap_entry flags (CRIU's pagemap.h). */
export const PagemapFlags = { PARENT: 1 << 0, LAZY: 1 << 1, PRESENT: 1 << 2 } as const;

export interface ImageFile {
  /** The first 8 bytes (common magic, image magic), kept verbatim when the file is rewritten. */
  header: Buffer;
  entries: Buffer[];
}

export interface PstreeEntry {
  pid: number;
  ppid: number;
  /** The task's thread ids (decoded; encoders default it to [pid]). */
  threads?: number[];
}

/** A thread's credentials as CRIU recorded them (creds_entry); capability sets as 32-bit words, lowest first. */
export interface RecordedCreds {
  uid: number;
  gid: number;
  euid: number;
  egid: number;
  suid: number;
  sgid: number;
  fsuid: number;
  fsgid: number;
  capInh: number[];
  capPrm: number[];
  capEff: number[];
  capBnd: number[];
  capAmb: number[];
  secbits: number;
  groups: number[];
  noNewPrivs: boolean;
  lsmProfile?: string;
}

/** SECCOMP_MODE_* of a thread: 0 disabled, 1 strict, 2 filter (CRIU's seccomp_mode). */
export interface CoreCredentials {
  seccompMode: number;
  creds?: RecordedCreds;
}

export interface VmaEntry {
  start: bigint;
  end: bigint;
  status: number;
  flags: number;
  /** File mappings: the offset in the file, in bytes (the offset column of /proc/<pid>/maps). */
  pgoff?: bigint;
  /** File mappings: the id of the file's reg_file_entry in files.img. */
  shmid?: bigint;
}

/** A regular file of files.img: `name` is its path as the dumped process saw it (its mount namespace). */
export interface RegFileEntry {
  id: number;
  name: string;
}

export interface PagemapEntry {
  vaddr: bigint;
  nrPages: number;
  inParent?: boolean;
  flags?: number;
}

const IMAGE_HEADER_BYTES = 8;

/**
 * A pagemap_entry straight from its wire bytes (proto/criu/images.proto: 1 vaddr uint64, 2 nr_pages uint32,
 * 3 in_parent bool, 4 flags uint32; other fields skipped by wire type), for the pagemaps of tens of thousands of
 * entries a restore plans from (memory-fill.ts), where protobufjs's object conversion costs most of the time.
 * The address as a number: user addresses are below 2^53. Throws CRIU_PROTOCOL on malformed bytes.
 */
export function decodePagemapEntryRaw(b: Buffer, name: string): { vaddr: number; nrPages: number; inParent: boolean; flags?: number } {
  let at = 0;
  const varint = (): number => {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      if (at >= b.length) throw imageError(`read CRIU image ${name}`, `${name}: truncated varint in a pagemap entry`);
      const byte = b[at++]!;
      v += (byte & 0x7f) * mul;
      if ((byte & 0x80) === 0) {
        if (!Number.isSafeInteger(v)) throw imageError(`read CRIU image ${name}`, `${name}: a pagemap value past 2^53`);
        return v;
      }
      mul *= 128;
    }
    throw imageError(`read CRIU image ${name}`, `${name}: a varint of more than 10 bytes`);
  };
  let vaddr: number | undefined;
  let nrPages: number | undefined;
  let compat: number | undefined;
  let inParent = false;
  let flags: number | undefined;
  while (at < b.length) {
    const tag = varint();
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    if (wire === 0) {
      const v = varint();
      if (field === 1) vaddr = v;
      else if (field === 2) compat = v;
      else if (field === 5) nrPages = v;
      else if (field === 3) inParent = v !== 0;
      else if (field === 4) flags = v;
    } else if (wire === 2) {
      at += varint();
    } else if (wire === 5) {
      at += 4;
    } else if (wire === 1) {
      at += 8;
    } else {
      throw imageError(`read CRIU image ${name}`, `${name}: wire type ${wire} in a pagemap entry`);
    }
    if (at > b.length) throw imageError(`read CRIU image ${name}`, `${name}: a pagemap entry runs past its end`);
  }
  // CRIU 4.2 writes the count as nr_pages (5) and 0 in compat_nr_pages (2); earlier CRIUs write only 2.
  nrPages ??= compat;
  if (vaddr === undefined || nrPages === undefined) throw imageError(`read CRIU image ${name}`, `${name}: a pagemap entry without vaddr or nr_pages`);
  return { vaddr, nrPages, inParent, ...(flags !== undefined ? { flags } : {}) };
}

function imageError(step: string, message: string, evidence?: Record<string, unknown>): CriuError {
  return new CriuError(CriuErrorCode.PROTOCOL, message, { step, ...(evidence ? { evidence } : {}) });
}

/** Splits an image file into its header and entries; throws CRIU_PROTOCOL on a truncated file. */
export function parseImageFile(bytes: Buffer, name: string): ImageFile {
  const step = `read CRIU image ${name}`;
  if (bytes.length < IMAGE_HEADER_BYTES) throw imageError(step, `${name}: ${bytes.length} bytes, shorter than an image header`);
  const entries: Buffer[] = [];
  let at = IMAGE_HEADER_BYTES;
  while (at < bytes.length) {
    if (at + 4 > bytes.length) throw imageError(step, `${name}: truncated entry length at byte ${at}`);
    const size = bytes.readUInt32LE(at);
    at += 4;
    if (at + size > bytes.length) throw imageError(step, `${name}: entry of ${size} bytes at byte ${at} runs past the end (${bytes.length})`);
    entries.push(bytes.subarray(at, at + size));
    at += size;
  }
  return { header: Buffer.from(bytes.subarray(0, IMAGE_HEADER_BYTES)), entries };
}

export function encodeImageFile(image: ImageFile): Buffer {
  const parts: Buffer[] = [image.header];
  for (const e of image.entries) {
    const len = Buffer.alloc(4);
    len.writeUInt32LE(e.length);
    parts.push(len, e);
  }
  return Buffer.concat(parts);
}

const toBigInt = (v: unknown): bigint => (typeof v === 'number' ? BigInt(v) : BigInt(String(v)));

/** Decoders of pstree, mm and pagemap entries; load once and share (it holds only the parsed types). */
export class CriuImageCodec {
  private constructor(
    private readonly pstree: protobuf.Type,
    private readonly mm: protobuf.Type,
    private readonly pagemapHead: protobuf.Type,
    private readonly pagemap: protobuf.Type,
    private readonly file: protobuf.Type,
    private readonly core: protobuf.Type,
  ) {}

  private static sharedCodec: CriuImageCodec | undefined;

  /** One codec for the process, loaded on first use (it holds only the parsed types). */
  static shared(): CriuImageCodec {
    CriuImageCodec.sharedCodec ??= CriuImageCodec.load();
    return CriuImageCodec.sharedCodec;
  }

  static load(protoPath: string = criuProtoPath('images.proto')): CriuImageCodec {
    const root = new protobuf.Root();
    root.loadSync(protoPath);
    return new CriuImageCodec(
      root.lookupType('pstree_entry'),
      root.lookupType('mm_entry'),
      root.lookupType('pagemap_head'),
      root.lookupType('pagemap_entry'),
      root.lookupType('file_entry'),
      root.lookupType('core_entry'),
    );
  }

  private decode(type: protobuf.Type, bytes: Buffer, what: string): Record<string, unknown> {
    try {
      return type.toObject(type.decode(bytes), { longs: String, defaults: false }) as Record<string, unknown>;
    } catch (err) {
      throw new CriuError(CriuErrorCode.PROTOCOL, `undecodable ${what}: ${err instanceof Error ? err.message : String(err)}`, { step: `decode CRIU ${what}`, cause: err });
    }
  }

  decodePstree(bytes: Buffer): PstreeEntry {
    const o = this.decode(this.pstree, bytes, 'pstree_entry');
    return { pid: Number(o['pid']), ppid: Number(o['ppid']), threads: ((o['threads'] as number[] | undefined) ?? []).map(Number) };
  }

  /**
   * A thread's recorded credentials and seccomp mode (core-<tid>.img's entry). The seccomp mode is the thread's,
   * or the task's older field when the thread has none; `creds` is undefined when the image has none.
   */
  decodeCore(bytes: Buffer): CoreCredentials {
    const o = this.decode(this.core, bytes, 'core_entry');
    const thread = (o['threadCore'] as Record<string, unknown> | undefined) ?? {};
    const task = (o['tc'] as Record<string, unknown> | undefined) ?? {};
    const c = thread['creds'] as Record<string, unknown> | undefined;
    const words = (v: unknown): number[] => ((v as number[] | undefined) ?? []).map(Number);
    const mode = Number(thread['seccompMode'] ?? task['oldSeccompMode'] ?? 0);
    const out: CoreCredentials = { seccompMode: mode };
    if (c !== undefined) {
      out.creds = {
        uid: Number(c['uid']), gid: Number(c['gid']), euid: Number(c['euid']), egid: Number(c['egid']),
        suid: Number(c['suid']), sgid: Number(c['sgid']), fsuid: Number(c['fsuid']), fsgid: Number(c['fsgid']),
        capInh: words(c['capInh']), capPrm: words(c['capPrm']), capEff: words(c['capEff']), capBnd: words(c['capBnd']), capAmb: words(c['capAmb']),
        secbits: Number(c['secbits']),
        groups: words(c['groups']),
        noNewPrivs: Number(c['noNewPrivs'] ?? 0) !== 0,
        ...(typeof c['lsmProfile'] === 'string' ? { lsmProfile: c['lsmProfile'] } : {}),
      };
    }
    return out;
  }

  /** The stack pointer a thread stopped with (core-<tid>.img, x86-64); undefined when the image has none. */
  decodeStackPointer(bytes: Buffer): bigint | undefined {
    const o = this.decode(this.core, bytes, 'core_entry');
    const sp = ((o['threadInfo'] as Record<string, unknown> | undefined)?.['gpregs'] as Record<string, unknown> | undefined)?.['sp'];
    return sp === undefined ? undefined : toBigInt(sp);
  }

  /** For tests: a core-<tid>.img entry with these credentials (the fields CRIU requires besides are not written). */
  encodeCore(e: CoreCredentials & { sp?: bigint }): Buffer {
    const c = e.creds;
    const msg = this.core.fromObject({
      ...(e.sp !== undefined ? { threadInfo: { gpregs: { sp: e.sp.toString() } } } : {}),
      threadCore: {
        seccompMode: e.seccompMode,
        ...(c !== undefined
          ? {
              creds: {
                uid: c.uid, gid: c.gid, euid: c.euid, egid: c.egid, suid: c.suid, sgid: c.sgid, fsuid: c.fsuid, fsgid: c.fsgid,
                capInh: c.capInh, capPrm: c.capPrm, capEff: c.capEff, capBnd: c.capBnd, capAmb: c.capAmb,
                secbits: c.secbits, groups: c.groups, noNewPrivs: c.noNewPrivs ? 1 : 0,
                ...(c.lsmProfile !== undefined ? { lsmProfile: c.lsmProfile } : {}),
              },
            }
          : {}),
      },
    });
    return Buffer.from(this.core.encode(msg).finish());
  }

  /** The VMAs of an mm_entry (its other fields are not needed here). */
  decodeVmas(bytes: Buffer): VmaEntry[] {
    const o = this.decode(this.mm, bytes, 'mm_entry');
    const vmas = (o['vmas'] as Array<Record<string, unknown>> | undefined) ?? [];
    return vmas.map((v) => ({
      start: toBigInt(v['start']),
      end: toBigInt(v['end']),
      status: Number(v['status']),
      flags: Number(v['flags']),
      ...(v['pgoff'] !== undefined ? { pgoff: toBigInt(v['pgoff']) } : {}),
      ...(v['shmid'] !== undefined ? { shmid: toBigInt(v['shmid']) } : {}),
    }));
  }

  /** The regular file of a files.img entry; undefined for other kinds of file. */
  decodeRegFile(bytes: Buffer): RegFileEntry | undefined {
    const o = this.decode(this.file, bytes, 'file_entry');
    const reg = o['reg'] as Record<string, unknown> | undefined;
    if (Number(o['type']) !== 1 || reg === undefined) return undefined;
    return { id: Number(reg['id']), name: String(reg['name']) };
  }

  /** For tests: a files.img entry of a regular file. */
  encodeRegFile(e: RegFileEntry): Buffer {
    const msg = this.file.fromObject({ type: 1, id: e.id, reg: { id: e.id, flags: 0, pos: '0', name: e.name } });
    return Buffer.from(this.file.encode(msg).finish());
  }

  decodePagemapHead(bytes: Buffer): { pagesId: number } {
    return { pagesId: Number(this.decode(this.pagemapHead, bytes, 'pagemap_head')['pagesId']) };
  }

  decodePagemapEntry(bytes: Buffer): PagemapEntry {
    const o = this.decode(this.pagemap, bytes, 'pagemap_entry');
    return {
      vaddr: toBigInt(o['vaddr']),
      // CRIU 4.2 writes the count as nr_pages (5) and 0 in compat_nr_pages (2); earlier CRIUs write only 2.
      nrPages: Number(o['nrPages'] ?? o['compatNrPages']),
      ...(o['inParent'] !== undefined ? { inParent: Boolean(o['inParent']) } : {}),
      ...(o['flags'] !== undefined ? { flags: Number(o['flags']) } : {}),
    };
  }

  encodePagemapEntry(e: PagemapEntry): Buffer {
    const msg = this.pagemap.fromObject({
      vaddr: e.vaddr.toString(), // fromObject turns a decimal string into an unsigned 64-bit value
      // Both: CRIU 4.2 reads nr_pages when present, earlier CRIUs read compat_nr_pages (and skip field 5).
      compatNrPages: e.nrPages <= 0xffffffff ? e.nrPages : 0,
      nrPages: e.nrPages,
      ...(e.inParent !== undefined ? { inParent: e.inParent } : {}),
      ...(e.flags !== undefined ? { flags: e.flags } : {}),
    });
    return Buffer.from(this.pagemap.encode(msg).finish());
  }

  /** For tests and tools that build images: encoders of the read-only messages. */
  encodePstree(e: PstreeEntry & { pgid?: number; sid?: number; threads?: number[] }): Buffer {
    return Buffer.from(this.pstree.encode(this.pstree.fromObject({ pid: e.pid, ppid: e.ppid, pgid: e.pgid ?? e.pid, sid: e.sid ?? e.pid, threads: e.threads ?? [e.pid] })).finish());
  }

  encodeMm(vmas: Array<VmaEntry & { prot?: number }>): Buffer {
    const long = (v: bigint): string => v.toString();
    const zero = long(0n);
    const msg = this.mm.fromObject({
      mmStartCode: zero, mmEndCode: zero, mmStartData: zero, mmEndData: zero, mmStartStack: zero, mmStartBrk: zero, mmBrk: zero,
      mmArgStart: zero, mmArgEnd: zero, mmEnvStart: zero, mmEnvEnd: zero, exeFileId: 0,
      vmas: vmas.map((v) => ({ start: long(v.start), end: long(v.end), pgoff: long(v.pgoff ?? 0n), shmid: long(v.shmid ?? 0n), prot: v.prot ?? 3, flags: v.flags, status: v.status, fd: -1 })),
    });
    return Buffer.from(this.mm.encode(msg).finish());
  }

  encodePagemapHead(pagesId: number): Buffer {
    return Buffer.from(this.pagemapHead.encode(this.pagemapHead.fromObject({ pagesId })).finish());
  }
}
