/**
 * A task's pagemap as thaw walks it (the fill plan, CRIU's own reads, the compressed pages' rewrite): each entry
 * decoded, with its raw bytes (a rewrite keeps the entries it keeps as they were) and where its pages lie in the
 * task's pages file. Pages in a parent image, or not dumped at all, take no bytes of that file.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CRIU_PAGE_BYTES, decodePagemapEntryRaw, PagemapFlags, parseImageFile, type CriuImageCodec } from './images.js';

export interface PagemapRecord {
  raw: Buffer;
  vaddr: number;
  nrPages: number;
  /** The entry's flags; PE_PRESENT where it has none (CRIU before 3.x wrote none). */
  flags: number;
  /** In a parent image (in_parent, or PE_PARENT). */
  inParent: boolean;
  /** Its first byte in the pages file; undefined when its pages are not in it (a parent's, or not present). */
  offset?: number;
}

export interface Pagemap {
  /** pagemap-<pid>.img, and its path. */
  name: string;
  file: string;
  /** The image header and the head entry, kept verbatim by a rewrite. */
  header: Buffer;
  head: Buffer;
  pagesId: number;
  /** pages-<pagesId>.img in the same directory. */
  pagesFile: string;
  records: PagemapRecord[];
  /** The bytes the records place in the pages file (its size, in an image CRIU wrote). */
  pagesBytes: number;
}

export const isLazyRecord = (r: Pick<PagemapRecord, 'flags'>): boolean => (r.flags & PagemapFlags.LAZY) !== 0;

/** Task `pid`'s pagemap in `dir`; undefined when it has no head entry. Throws on an unreadable or undecodable image. */
export async function readPagemap(dir: string, pid: number, codec: CriuImageCodec): Promise<Pagemap | undefined> {
  const name = `pagemap-${pid}.img`;
  const file = join(dir, name);
  const image = parseImageFile(await readFile(file), name);
  const [head, ...rest] = image.entries;
  if (head === undefined) return undefined;
  const { pagesId } = codec.decodePagemapHead(head);
  const records: PagemapRecord[] = [];
  let offset = 0;
  for (const raw of rest) {
    const e = decodePagemapEntryRaw(raw, name);
    const flags = e.flags ?? PagemapFlags.PRESENT;
    const inParent = e.inParent || (flags & PagemapFlags.PARENT) !== 0;
    const inFile = !inParent && (flags & PagemapFlags.PRESENT) !== 0;
    records.push({ raw, vaddr: e.vaddr, nrPages: e.nrPages, flags, inParent, ...(inFile ? { offset } : {}) });
    if (inFile) offset += e.nrPages * CRIU_PAGE_BYTES;
  }
  return { name, file, header: image.header, head, pagesId, pagesFile: join(dir, `pages-${pagesId}.img`), records, pagesBytes: offset };
}
