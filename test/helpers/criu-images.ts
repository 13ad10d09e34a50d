/**
 * CRIU image directories built with thaw's image codec, for the unit tests of what reads and rewrites dumps
 * (memory-fill.ts's plan, lazy-marks.ts, compressed-pages.ts): pstree, per task its mm (VMAs), pagemap, pages
 * file and, when asked, its threads' core images; the zero-pages list when given. The integration tests run the
 * same code on CRIU's own dumps.
 */
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { CRIU_PAGE_BYTES as P, CriuImageCodec, encodeImageFile, PagemapFlags, VmaStatus, type VmaEntry } from '../../src/restore-engine/criu/images.js';
import { ZERO_PAGES_FILE } from '../../src/restore-engine/zero-pages.js';

export const codec = CriuImageCodec.load();
/** An image header (CRIU's magic pair); the decoders keep it and do not check it. */
export const HEADER = Buffer.from([0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56]);
export const ANON = VmaStatus.AREA_REGULAR | VmaStatus.ANON_PRIVATE;
export const PRESENT = PagemapFlags.PRESENT;
export const LAZY = PagemapFlags.PRESENT | PagemapFlags.LAZY;
export const PRIVATE_ANON = 0x22; // MAP_PRIVATE | MAP_ANONYMOUS
export const FILE_PRIVATE = 0x02;
export const MAP_LOCKED = 0x2000;
/** Two far-apart user addresses. */
export const A = 0x10000000;
export const B = 0x20000000;

export const vma = (start: number, pages: number, flags = PRIVATE_ANON, status = ANON): VmaEntry => ({ start: BigInt(start), end: BigInt(start + pages * P), status, flags });

export interface ImageTask {
  pid: number;
  vmas: VmaEntry[];
  /** [vaddr, pages, flags] per pagemap entry. */
  map: Array<[number, number, number]>;
  /** Its pages file's id (default: the pid). */
  pagesId?: number;
  /** Stack pointers of its threads (the first is the task's own; undefined: a core image without one); absent: no core images. */
  sps?: Array<bigint | undefined>;
}

/**
 * The first 8 bytes of page `i` of a pages file written with `pages: 'marked'`: the file's id and the page's index
 * (the rest of the page is zeros).
 */
export function pageMark(pagesId: number, i: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(pagesId, 0);
  b.writeUInt32LE(i, 4);
  return b;
}

/** Image directories made in this file's tests, removed after each. */
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/**
 * Writes the images of `tasks` into a new directory (removed after the test). Pages files hold as many pages as
 * their present entries: sparse (`pages: 'sparse'`, the default: for code that reads no page) or each page
 * marked (pageMark). `zeros`: the zero-pages list (thaw-zero-pages.json) by pid; absent, none is written.
 */
export function writeImages(tasks: ImageTask[], o: { zeros?: Record<string, Array<[string, number]>>; pages?: 'sparse' | 'marked' } = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'thaw-criu-images-'));
  dirs.push(dir);
  const tids = (t: ImageTask): number[] => (t.sps ?? []).map((_, i) => t.pid + i);
  writeFileSync(join(dir, 'pstree.img'), encodeImageFile({
    header: HEADER,
    entries: tasks.map((t, i) => codec.encodePstree({ pid: t.pid, ppid: i === 0 ? 0 : tasks[0]!.pid, ...(t.sps !== undefined ? { threads: tids(t) } : {}) })),
  }));
  for (const t of tasks) {
    tids(t).forEach((tid, i) => {
      const sp = t.sps![i];
      writeFileSync(join(dir, `core-${tid}.img`), encodeImageFile({ header: HEADER, entries: [codec.encodeCore({ seccompMode: 0, ...(sp !== undefined ? { sp } : {}) })] }));
    });
    const pagesId = t.pagesId ?? t.pid;
    writeFileSync(join(dir, `mm-${t.pid}.img`), encodeImageFile({ header: HEADER, entries: [codec.encodeMm(t.vmas)] }));
    const entries = t.map.map(([vaddr, nrPages, flags]) => codec.encodePagemapEntry({ vaddr: BigInt(vaddr), nrPages, flags }));
    writeFileSync(join(dir, `pagemap-${t.pid}.img`), encodeImageFile({ header: HEADER, entries: [codec.encodePagemapHead(pagesId), ...entries] }));
    const present = t.map.filter(([, , f]) => (f & PagemapFlags.PRESENT) !== 0).reduce((n, [, pages]) => n + pages, 0);
    const file = join(dir, `pages-${pagesId}.img`);
    if (o.pages === 'marked') {
      const bytes = Buffer.alloc(present * P);
      for (let i = 0; i < present; i++) pageMark(pagesId, i).copy(bytes, i * P);
      writeFileSync(file, bytes);
    } else {
      writeFileSync(file, '');
      truncateSync(file, present * P);
    }
  }
  if (o.zeros !== undefined) writeFileSync(join(dir, ZERO_PAGES_FILE), JSON.stringify({ v: 1, processes: o.zeros }));
  return dir;
}
