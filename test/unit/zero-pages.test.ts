/**
 * Dropping all-zero pages from CRIU images (src/restore-engine/zero-pages.ts) on images built here with the
 * image codec: which pages go (private anonymous, not inherited from the parent), which stay (file-backed,
 * shared, inherited), the rewritten pagemap and pages file, and every case that must leave the dump untouched.
 * test/integration/zero-pages.test.ts restores a real process from rewritten images with CRIU.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CRIU_PAGE_BYTES as P, CriuImageCodec, encodeImageFile, PagemapFlags, parseImageFile, VmaStatus, type PagemapEntry, type VmaEntry } from '../../src/restore-engine/criu/images.js';
import { droppableRanges, dropZeroPages, parseZeroPagesFile, ZERO_PAGES_FILE } from '../../src/restore-engine/zero-pages.js';

const codec = CriuImageCodec.load();
const HEADER = Buffer.from([0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56]); // common magic + pagemap magic
const ANON = VmaStatus.AREA_REGULAR | VmaStatus.ANON_PRIVATE;
const FILE = VmaStatus.AREA_REGULAR | VmaStatus.FILE_PRIVATE;
const SHARED = VmaStatus.AREA_REGULAR | VmaStatus.ANON_SHARED;
const PRESENT_LAZY = PagemapFlags.PRESENT | PagemapFlags.LAZY;

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A page: zero, or filled with a byte that names it. */
const page = (fill: number): Buffer => Buffer.alloc(P, fill);
const vma = (start: number, pages: number, status: number): VmaEntry => ({ start: BigInt(start), end: BigInt(start + pages * P), status, flags: 0x22 });

interface Proc {
  pid: number;
  ppid: number;
  vmas: VmaEntry[];
  /** [vaddr, page fills] per pagemap entry. */
  map: Array<[number, number[], number?]>;
  pagesId: number;
}

function writeImages(procs: Proc[]): string {
  const dir = mkdtempSync(join(tmpdir(), 'thaw-zero-pages-'));
  dirs.push(dir);
  writeFileSync(join(dir, 'pstree.img'), encodeImageFile({ header: HEADER, entries: procs.map((p) => codec.encodePstree({ pid: p.pid, ppid: p.ppid })) }));
  for (const p of procs) {
    writeFileSync(join(dir, `mm-${p.pid}.img`), encodeImageFile({ header: HEADER, entries: [codec.encodeMm(p.vmas)] }));
    const entries = p.map.map(([vaddr, fills, flags]) => codec.encodePagemapEntry({ vaddr: BigInt(vaddr), nrPages: fills.length, flags: flags ?? PRESENT_LAZY }));
    writeFileSync(join(dir, `pagemap-${p.pid}.img`), encodeImageFile({ header: HEADER, entries: [codec.encodePagemapHead(p.pagesId), ...entries] }));
    writeFileSync(join(dir, `pages-${p.pagesId}.img`), Buffer.concat(p.map.flatMap(([, fills]) => fills.map(page))));
  }
  return dir;
}

function readPagemap(dir: string, pid: number): PagemapEntry[] {
  return parseImageFile(readFileSync(join(dir, `pagemap-${pid}.img`)), 'pagemap').entries.slice(1).map((e) => codec.decodePagemapEntry(e));
}

/** The fills of a pages file, one number per page. */
const fillsOf = (file: string): number[] => {
  const b = readFileSync(file);
  return Array.from({ length: b.length / P }, (_, i) => b[i * P]!);
};

const A = 0x10000000;
const B = 0x20000000;
const C = 0x30000000;
const D = 0x40000000;

describe('dropZeroPages', () => {
  it('drops zero pages of private anonymous mappings only, and rewrites pagemap and pages in step', async () => {
    const dir = writeImages([
      {
        pid: 10, ppid: 0, pagesId: 1,
        vmas: [vma(A, 8, ANON), vma(B, 4, FILE), vma(C, 2, SHARED)],
        map: [[A, [1, 0, 0, 2, 0, 3, 0, 0]], [B, [0, 0, 4, 0]], [C, [0, 0]]],
      },
      {
        // The child has the parent's mapping A (CRIU may premap it copy-on-write from the parent): kept whole.
        pid: 11, ppid: 10, pagesId: 2,
        vmas: [vma(A, 8, ANON), vma(D, 4, ANON)],
        map: [[A, [0, 0, 5, 0]], [D, [0, 6, 0, 0]]],
      },
    ]);
    const r = await dropZeroPages(dir, { minDropBytes: 0 });
    expect(r.rewritten.sort()).toEqual([10, 11]);
    expect(r.skipped).toEqual([]);
    expect(r.droppedBytes).toBe((5 + 3) * P); // A: five zero pages of 10; D: three of 11
    expect(r.scannedBytes).toBe((14 + 8) * P);
    expect(fillsOf(join(dir, 'pages-1.img'))).toEqual([1, 2, 3, 0, 0, 4, 0, 0, 0]);
    expect(readPagemap(dir, 10)).toEqual([
      { vaddr: BigInt(A), nrPages: 1, flags: PRESENT_LAZY },
      { vaddr: BigInt(A + 3 * P), nrPages: 1, flags: PRESENT_LAZY },
      { vaddr: BigInt(A + 5 * P), nrPages: 1, flags: PRESENT_LAZY },
      { vaddr: BigInt(B), nrPages: 4, flags: PRESENT_LAZY },
      { vaddr: BigInt(C), nrPages: 2, flags: PRESENT_LAZY },
    ]);
    expect(fillsOf(join(dir, 'pages-2.img'))).toEqual([0, 0, 5, 0, 6]);
    expect(readPagemap(dir, 11)).toEqual([
      { vaddr: BigInt(A), nrPages: 4, flags: PRESENT_LAZY },
      { vaddr: BigInt(D + P), nrPages: 1, flags: PRESENT_LAZY },
    ]);
    expect(readdirSync(dir).filter((f) => f.endsWith('.thaw-zero-pages'))).toEqual([]);
    // The dropped ranges, for the memory fill: runs of consecutive dropped pages per process.
    const hex = (a: number): string => a.toString(16);
    expect(JSON.parse(readFileSync(join(dir, ZERO_PAGES_FILE), 'utf8'))).toEqual({
      v: 1,
      processes: { '10': [[hex(A + P), 2], [hex(A + 4 * P), 1], [hex(A + 6 * P), 2]], '11': [[hex(D), 1], [hex(D + 2 * P), 2]] },
    });
    expect([...parseZeroPagesFile(readFileSync(join(dir, ZERO_PAGES_FILE), 'utf8')).get(11)!]).toEqual([
      { start: D, end: D + P },
      { start: D + 2 * P, end: D + 4 * P },
    ]);
    // The header of the rewritten pagemap is CRIU's, byte for byte.
    expect(readFileSync(join(dir, 'pagemap-10.img')).subarray(0, 8)).toEqual(HEADER);
  });

  it('merges kept pages across pagemap entries that touch, and keeps a process whose pages are all zero valid', async () => {
    const dir = writeImages([{ pid: 20, ppid: 0, pagesId: 3, vmas: [vma(A, 8, ANON)], map: [[A, [7, 0, 8]], [A + 3 * P, [9, 9]], [A + 6 * P, [0, 0]]] }]);
    await dropZeroPages(dir, { minDropBytes: 0 });
    expect(readPagemap(dir, 20)).toEqual([
      { vaddr: BigInt(A), nrPages: 1, flags: PRESENT_LAZY },
      { vaddr: BigInt(A + 2 * P), nrPages: 3, flags: PRESENT_LAZY },
    ]);
    const empty = writeImages([{ pid: 21, ppid: 0, pagesId: 4, vmas: [vma(A, 2, ANON)], map: [[A, [0, 0]]] }]);
    await dropZeroPages(empty, { minDropBytes: 0 });
    expect(readPagemap(empty, 21)).toEqual([]);
    expect(statSync(join(empty, 'pages-4.img')).size).toBe(0);
  });

  it('leaves a dump untouched when there is little to gain, it uses parent images, or its pages file is the wrong size', async () => {
    const cases: Array<[Proc, RegExp, ((dir: string) => void)?]> = [
      [{ pid: 30, ppid: 0, pagesId: 5, vmas: [vma(A, 4, ANON)], map: [[A, [1, 0, 0, 0]]] }, /^only 12288 bytes of zero pages$/],
      [{ pid: 31, ppid: 0, pagesId: 6, vmas: [vma(A, 4, ANON)], map: [[A, [0, 0], PagemapFlags.PARENT]] }, /parent images/],
      [{ pid: 32, ppid: 0, pagesId: 7, vmas: [vma(A, 4, ANON)], map: [[A, [0, 0]]] }, /pages-7\.img has 4096 bytes, its pagemap says 8192/, (d) => writeFileSync(join(d, 'pages-7.img'), page(0))],
      [{ pid: 33, ppid: 0, pagesId: 8, vmas: [vma(A, 4, FILE)], map: [[A, [0, 0]]] }, /no private anonymous mapping/],
    ];
    for (const [proc, reason, spoil] of cases) {
      const dir = writeImages([proc]);
      spoil?.(dir);
      const before = readdirSync(dir).map((f) => [f, readFileSync(join(dir, f))] as const);
      const r = await dropZeroPages(dir, { minDropBytes: proc.pid === 30 ? 4 * P : 0 });
      expect(r.rewritten).toEqual([]);
      expect(r.skipped).toHaveLength(1);
      expect(r.skipped[0]!.reason).toMatch(reason);
      for (const [f, bytes] of before) expect(readFileSync(join(dir, f)).equals(bytes), f).toBe(true);
      // Only the (empty) list of dropped ranges is new: the memory fill knows there are none.
      expect(readdirSync(dir).sort()).toEqual([...before.map(([f]) => f), ZERO_PAGES_FILE].sort());
      expect(JSON.parse(readFileSync(join(dir, ZERO_PAGES_FILE), 'utf8'))).toEqual({ v: 1, processes: {} });
    }
  });

  it('a truncated image is CRIU_PROTOCOL and no file is changed or left behind', async () => {
    const dir = writeImages([
      { pid: 40, ppid: 0, pagesId: 9, vmas: [vma(A, 2, ANON)], map: [[A, [0, 0]]] },
      { pid: 41, ppid: 40, pagesId: 10, vmas: [vma(D, 2, ANON)], map: [[D, [0, 1]]] },
    ]);
    const pm = readFileSync(join(dir, 'pagemap-41.img'));
    writeFileSync(join(dir, 'pagemap-41.img'), pm.subarray(0, pm.length - 3));
    const before = readdirSync(dir).map((f) => [f, readFileSync(join(dir, f))] as const);
    await expect(dropZeroPages(dir, { minDropBytes: 0 })).rejects.toMatchObject({ code: 'CRIU_PROTOCOL' });
    for (const [f, bytes] of before) expect(readFileSync(join(dir, f)).equals(bytes), f).toBe(true);
    expect(readdirSync(dir).sort()).toEqual(before.map(([f]) => f).sort());
  });

  it('droppableRanges: private anonymous only, minus what the parent has at the same range', () => {
    const vmas = [vma(D, 1, ANON), vma(A, 1, ANON), vma(B, 1, FILE), vma(C, 1, SHARED), vma(0x50000000, 1, VmaStatus.ANON_PRIVATE)];
    expect(droppableRanges(vmas, undefined)).toEqual([{ start: A, end: A + P }, { start: D, end: D + P }]);
    expect(droppableRanges(vmas, [vma(A, 1, ANON)])).toEqual([{ start: D, end: D + P }]);
    expect(droppableRanges(vmas, [vma(A, 1, FILE)])).toEqual([{ start: A, end: A + P }, { start: D, end: D + P }]);
  });
});
