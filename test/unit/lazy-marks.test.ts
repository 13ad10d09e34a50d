/**
 * PE_LAZY put back where CRIU's is_stack slip left a task without it (src/restore-engine/lazy-marks.ts), on CRIU
 * images built here with the image codec: which tasks are rewritten (no lazy entry, a thread stopped with a
 * page-aligned stack pointer), what the entries become (lazy inside lazy mappings, split at their ends, present kept,
 * the same pages in the same order), and what is left alone. test/integration/memory-fill.test.ts makes CRIU commit
 * the slip on a real process and restores the marked dump.
 */
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CRIU_PAGE_BYTES as P, encodeImageFile, PagemapFlags, parseImageFile, VmaStatus } from '../../src/restore-engine/criu/images.js';
import { markLazy, restoreLazyMarks } from '../../src/restore-engine/lazy-marks.js';

import { A, codec, FILE_PRIVATE, HEADER, LAZY, MAP_LOCKED, PRESENT, PRIVATE_ANON, vma, writeImages } from '../helpers/criu-images.js';

const ALIGNED_SP = 0x7ffd16979000n;
const UNALIGNED_SP = 0x7ffd16978ff0n;

function pagemapOf(dir: string, pid: number): Array<[number, number, number | undefined]> {
  const [, ...rest] = parseImageFile(readFileSync(join(dir, `pagemap-${pid}.img`)), 'pagemap').entries;
  return rest.map((raw) => codec.decodePagemapEntry(raw)).map((e) => [Number(e.vaddr), e.nrPages, e.flags]);
}

describe('markLazy', () => {
  it('marks the parts inside lazy spans, splits an entry at a span end, keeps order, sizes and the other flags', () => {
    const entries = [
      { vaddr: BigInt(A), nrPages: 4, flags: PRESENT },
      { vaddr: BigInt(A + 6 * P), nrPages: 6, flags: PRESENT }, // crosses the first span's end and the second's start
      { vaddr: BigInt(A + 20 * P), nrPages: 2, flags: PRESENT }, // outside every span
    ];
    const spans = [{ start: A, end: A + 8 * P }, { start: A + 10 * P, end: A + 11 * P }];
    const r = markLazy(entries, spans);
    expect(r.entries.map((e) => [Number(e.vaddr) - A, e.nrPages, e.flags])).toEqual([
      [0, 4, LAZY],
      [6 * P, 2, LAZY],
      [8 * P, 2, PRESENT],
      [10 * P, 1, LAZY],
      [11 * P, 1, PRESENT],
      [20 * P, 2, PRESENT],
    ]);
    expect(r.lazyPages).toBe(7);
    // The same pages in the same order: the pages file stays as it is.
    expect(r.entries.reduce((n, e) => n + e.nrPages, 0)).toBe(12);
  });
});

describe('restoreLazyMarks', () => {
  it('a task with a page-aligned stack pointer and no lazy entry: lazy marks inside private anonymous mappings only', async () => {
    const dir = writeImages([{
      pid: 10,
      sps: [UNALIGNED_SP, ALIGNED_SP], // the second thread stopped on a page boundary
      vmas: [vma(A, 8, FILE_PRIVATE, VmaStatus.AREA_REGULAR), vma(A + 8 * P, 16), vma(A + 24 * P, 4, PRIVATE_ANON | MAP_LOCKED)],
      map: [[A, 2, PRESENT], [A + 6 * P, 12, PRESENT], [A + 24 * P, 4, PRESENT]],
    }]);
    expect(await restoreLazyMarks(dir, codec)).toEqual({ tasks: [10], lazyPages: 10 });
    expect(pagemapOf(dir, 10)).toEqual([
      [A, 2, PRESENT],
      [A + 6 * P, 2, PRESENT],
      [A + 8 * P, 10, LAZY],
      [A + 24 * P, 4, PRESENT],
    ]);
    // No file but the pagemap changed, and no temporary file is left.
    expect(readdirSync(dir).sort()).toEqual(['core-10.img', 'core-11.img', 'mm-10.img', 'pagemap-10.img', 'pages-10.img', 'pstree.img']);
  });

  it('leaves alone: a dump with a lazy entry, threads off page boundaries, pages in a parent image; rewrites only the task that has the slip', async () => {
    const anon = [vma(A, 16)];
    const dir = writeImages([
      { pid: 20, sps: [ALIGNED_SP], vmas: anon, map: [[A, 4, PRESENT], [A + 4 * P, 4, LAZY]] }, // some page is lazy
      { pid: 30, sps: [UNALIGNED_SP, undefined], vmas: anon, map: [[A, 8, PRESENT]] }, // no aligned thread
      { pid: 40, sps: [ALIGNED_SP], vmas: anon, map: [[A, 8, PRESENT | PagemapFlags.PARENT]] }, // a pre-dump chain
      { pid: 50, sps: [ALIGNED_SP], vmas: anon, map: [[A, 8, PRESENT]] },
    ]);
    const before = (pid: number): Buffer => readFileSync(join(dir, `pagemap-${pid}.img`));
    const kept = [20, 30, 40].map(before);
    expect(await restoreLazyMarks(dir, codec)).toEqual({ tasks: [50], lazyPages: 8 });
    expect([20, 30, 40].map(before)).toEqual(kept);
    expect(pagemapOf(dir, 50)).toEqual([[A, 8, LAZY]]);
  });

  it('a second run changes nothing (the marks are there), and an unreadable core image fails with the pagemap as it was', async () => {
    const dir = writeImages([{ pid: 60, sps: [ALIGNED_SP], vmas: [vma(A, 8)], map: [[A, 8, PRESENT]] }]);
    await restoreLazyMarks(dir, codec);
    const marked = readFileSync(join(dir, 'pagemap-60.img'));
    expect(await restoreLazyMarks(dir, codec)).toEqual({ tasks: [], lazyPages: 0 });
    expect(readFileSync(join(dir, 'pagemap-60.img'))).toEqual(marked);

    const broken = writeImages([{ pid: 70, sps: [ALIGNED_SP], vmas: [vma(A, 8)], map: [[A, 8, PRESENT]] }]);
    const original = readFileSync(join(broken, 'pagemap-70.img'));
    writeFileSync(join(broken, 'core-70.img'), encodeImageFile({ header: HEADER, entries: [Buffer.from([0xff, 0xff, 0xff])] }));
    await expect(restoreLazyMarks(broken, codec)).rejects.toThrow(/core_entry/);
    expect(readFileSync(join(broken, 'pagemap-70.img'))).toEqual(original);
  });
});
