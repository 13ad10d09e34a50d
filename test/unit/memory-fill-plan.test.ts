/**
 * The memory fill's plan (src/restore-engine/memory-fill.ts buildFillPlan, encodeFillPlan) from CRIU images built
 * here with the image codec: which pages thaw-fill copies (PE_LAZY entries, cut at VMA boundaries, located in the
 * pages file past the non-lazy ones), which zero ranges it places (the dropped ones, within lazy mappings, never
 * over a copied page), and the checkpoints that get no plan (CRIU then fills their memory).
 * test/integration/memory-fill.test.ts runs thaw-fill on a real CRIU restore.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { CRIU_PAGE_BYTES as P, decodePagemapEntryRaw, PagemapFlags, VmaStatus } from '../../src/restore-engine/criu/images.js';
import { buildFillPlan, criuPageReads, encodeFillPlan, FILL_MAX_ZERO_FACTOR, FILL_MAX_ZERO_SLACK_BYTES, vmaCanBeLazy, type FillPlan } from '../../src/restore-engine/memory-fill.js';
import { A, ANON, B, codec, FILE_PRIVATE, LAZY, PRIVATE_ANON, vma, writeImages } from '../helpers/criu-images.js';

async function plan(dir: string): Promise<FillPlan> {
  const p = await buildFillPlan(dir, codec);
  if ('none' in p) throw new Error(p.none);
  return p;
}

describe('decodePagemapEntryRaw', () => {
  it('CRIU 4.2\'s entries: the count in nr_pages (field 5), 0 in compat_nr_pages (field 2); both decoders read it, the encoder writes both', () => {
    // vaddr 0x1000, compat_nr_pages 0, flags LAZY|PRESENT, nr_pages 300 (varint 0xac 0x02).
    const v42 = Buffer.from([0x08, 0x80, 0x20, 0x10, 0x00, 0x20, LAZY, 0x28, 0xac, 0x02]);
    expect(decodePagemapEntryRaw(v42, 'test')).toEqual({ vaddr: 0x1000, nrPages: 300, inParent: false, flags: LAZY });
    expect(codec.decodePagemapEntry(v42)).toEqual({ vaddr: 0x1000n, nrPages: 300, flags: LAZY });
    // What thaw writes (zero-pages.ts rewrites pagemaps) carries both, for CRIU before 4.2 and after.
    const written = codec.encodePagemapEntry({ vaddr: 0x1000n, nrPages: 300, flags: LAZY });
    expect(written.includes(Buffer.from([0x10, 0xac, 0x02]))).toBe(true);
    expect(written.includes(Buffer.from([0x28, 0xac, 0x02]))).toBe(true);
  });

  it('reads what protobufjs writes, flags or not, high addresses too; refuses truncated bytes', () => {
    for (const e of [
      { vaddr: 0x7fffe0000000n, nrPages: 3, flags: LAZY },
      { vaddr: 0x1000n, nrPages: 1 },
      { vaddr: 0x555555554000n, nrPages: 262144, inParent: true, flags: PagemapFlags.PARENT },
    ]) {
      const bytes = codec.encodePagemapEntry(e);
      const viaProtobufjs = codec.decodePagemapEntry(bytes);
      const raw = decodePagemapEntryRaw(bytes, 'test');
      expect(raw.vaddr).toBe(Number(viaProtobufjs.vaddr));
      expect(raw.nrPages).toBe(viaProtobufjs.nrPages);
      expect(raw.inParent).toBe(viaProtobufjs.inParent === true);
      expect(raw.flags).toBe(viaProtobufjs.flags);
      expect(() => decodePagemapEntryRaw(bytes.subarray(0, bytes.length - 1), 'test')).toThrow(/truncated|without|past its end/);
    }
  });
});

describe('buildFillPlan', () => {
  it('copies the lazy entries at their offsets past non-lazy ones, cut at VMA ends; zeros only where nothing is copied', async () => {
    const dir = writeImages(
      [{
        pid: 7, pagesId: 3,
        // Two lazy VMAs that touch; a file mapping in between the entries' file order.
        vmas: [vma(A, 4), vma(A + 4 * P, 4), vma(B, 2, FILE_PRIVATE, VmaStatus.AREA_REGULAR | VmaStatus.FILE_PRIVATE)],
        map: [[A, 2, PagemapFlags.PRESENT], [A + 2 * P, 4, LAZY], [B, 2, PagemapFlags.PRESENT]],
      }],
      // Dropped: A+6..A+8 (in the second VMA) and a range that overlaps the copied A+3..A+4, and one in the file mapping.
      { zeros: { '7': [[(A + 6 * P).toString(16), 2], [(A + 3 * P).toString(16), 2], [B.toString(16), 1]] } },
    );
    const p = await plan(dir);
    const t = p.tasks[0]!;
    expect(t.pagesFile).toBe(join(dir, 'pages-3.img'));
    // The lazy entry A+2..A+6 crosses the VMA end at A+4: two copies, offsets past the 2 non-lazy pages.
    expect(t.copies).toEqual([
      { addr: A + 2 * P, pages: 2, offset: 2 * P },
      { addr: A + 4 * P, pages: 2, offset: 4 * P },
    ]);
    // A+3..A+5 is copied: nothing zeroed there; B is a file mapping: never; A+6..A+8 is.
    expect(t.zeros).toEqual([{ addr: A + 6 * P, pages: 2 }]);
    expect(p.copyBytes).toBe(4 * P);
    expect(p.zeroBytes).toBe(2 * P);
    expect(encodeFillPlan(p)).toBe(
      `thaw-fill-plan 1\ntask 7 ${join(dir, 'pages-3.img')}\nc ${(A + 2 * P).toString(16)} 2 ${2 * P}\nc ${(A + 4 * P).toString(16)} 2 ${4 * P}\nz ${(A + 6 * P).toString(16)} 2\n`,
    );
  });

  it('the stored plan names pages files in the images directory; thaw-fill refuses one that is not a plain name there', async () => {
    const dir = writeImages([{ pid: 7, pagesId: 3, vmas: [vma(A, 2)], map: [[A, 2, LAZY]] }], { zeros: {} });
    expect(encodeFillPlan(await plan(dir), { relative: true })).toBe(`thaw-fill-plan 1\ntask 7 pages-3.img\nc ${A.toString(16)} 2 0\n`);
    const fill = resolve(dirname(fileURLToPath(import.meta.url)), '../../native/build/thaw-fill');
    for (const name of ['../pages-3.img', '/etc/passwd', '..']) {
      writeFileSync(join(dir, 'bad-plan.txt'), `thaw-fill-plan 1\ntask 7 ${name}\n`);
      const r = spawnSync(fill, ['--plan', join(dir, 'bad-plan.txt'), '--images-dir', dir, '--timeout-ms', '2000'], { cwd: dir, encoding: 'utf8', timeout: 5_000 });
      expect(r.stdout, name).toMatch(/^error PLAN .*is not a name in the images directory/);
    }
  });

  it('a task without lazy pages gets a line and no pages file (CRIU sends its uffd all the same)', async () => {
    const dir = writeImages([
      { pid: 1, pagesId: 1, vmas: [vma(A, 2)], map: [[A, 2, LAZY]] },
      { pid: 2, pagesId: 2, vmas: [vma(A, 2, FILE_PRIVATE, VmaStatus.AREA_REGULAR | VmaStatus.FILE_PRIVATE)], map: [[A, 2, PagemapFlags.PRESENT]] },
    ], { zeros: {} });
    const p = await plan(dir);
    expect(p.tasks.map((t) => [t.pid, t.pagesFile !== undefined, t.copies.length])).toEqual([[1, true, 1], [2, false, 0]]);
    expect(encodeFillPlan(p)).toContain('\ntask 2 -\n');
  });

  it('no plan: a checkpoint without the list of dropped pages, parent images, lazy pages outside a lazy mapping, a pages file its pagemap does not account for', async () => {
    const cases: Array<[string, RegExp]> = [
      [writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 2)], map: [[A, 2, LAZY]] }]), /no thaw-zero-pages\.json/],
      [writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 2)], map: [[A, 2, PagemapFlags.PARENT | PagemapFlags.LAZY]] }], { zeros: {} }), /parent image/],
      [writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 2, FILE_PRIVATE)], map: [[A, 2, LAZY]] }], { zeros: {} }), /outside a private anonymous mapping/],
      [writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 2)], map: [[A, 2, PagemapFlags.LAZY]] }], { zeros: {} }), /not in its pages file/],
    ];
    // A pagemap that does not account for its pages file (a CRIU image format this decoder misreads).
    const short = writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 4)], map: [[A, 2, LAZY]] }], { zeros: {} });
    truncateSync(join(short, 'pages-1.img'), 4 * P);
    cases.push([short, /pages-1\.img has 16384 bytes, pagemap-1\.img accounts for 8192/]);
    for (const [dir, reason] of cases) {
      const p = await buildFillPlan(dir, codec);
      expect('none' in p ? p.none : 'a plan').toMatch(reason);
    }
  });

  it('a pagemap fragmented by dropped zero pages (every other page, 40 000 entries): every page once, zeros between', async () => {
    const n = 40_000;
    const map: Array<[number, number, number]> = [];
    const zeros: Array<[string, number]> = [];
    for (let i = 0; i < n; i++) {
      map.push([A + 2 * i * P, 1, LAZY]);
      zeros.push([(A + (2 * i + 1) * P).toString(16), 1]);
    }
    const p = await plan(writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 2 * n)], map }], { zeros: { '1': zeros } }));
    const t = p.tasks[0]!;
    expect(t.copies).toHaveLength(n);
    expect(t.copies[n - 1]).toEqual({ addr: A + 2 * (n - 1) * P, pages: 1, offset: (n - 1) * P });
    expect(t.zeros).toHaveLength(n);
    expect(p.copyBytes + p.zeroBytes).toBe(2 * n * P);
  });

  it('a list of dropped pages far larger than the pages (not one thaw writes) places no zeros', async () => {
    const huge = Math.ceil((FILL_MAX_ZERO_FACTOR * 2 * P + FILL_MAX_ZERO_SLACK_BYTES) / P) + 1;
    const dir = writeImages([{ pid: 1, pagesId: 1, vmas: [vma(A, 2), vma(B, huge)], map: [[A, 2, LAZY]] }], { zeros: { '1': [[B.toString(16), huge]] } });
    const p = await plan(dir);
    expect(p.zeroBytes).toBe(0);
    expect(p.tasks[0]!.zeros).toEqual([]);
  });

  it('lazy mappings are CRIU\'s: private anonymous, not locked, not huge-TLB, not the vDSO', () => {
    expect(vmaCanBeLazy({ flags: PRIVATE_ANON, status: ANON })).toBe(true);
    expect(vmaCanBeLazy({ flags: 0x21, status: ANON })).toBe(false); // MAP_SHARED | MAP_ANONYMOUS
    expect(vmaCanBeLazy({ flags: PRIVATE_ANON | 0x2000, status: ANON })).toBe(false); // MAP_LOCKED
    expect(vmaCanBeLazy({ flags: PRIVATE_ANON | 0x40000, status: ANON })).toBe(false); // MAP_HUGETLB
    expect(vmaCanBeLazy({ flags: PRIVATE_ANON, status: ANON | (1 << 3) })).toBe(false); // VMA_AREA_VDSO
  });
});

describe('criuPageReads', () => {
  it('the non-lazy present entries of each task\'s pages file, adjacent ones merged, in file order; lazy and absent pages are not CRIU\'s', async () => {
    const PRESENT = PagemapFlags.PRESENT;
    const dir = writeImages([
      {
        pid: 1,
        pagesId: 3,
        vmas: [vma(A, 64, FILE_PRIVATE, VmaStatus.AREA_REGULAR), vma(B, 64)],
        // offsets: 0..4P CRIU's, 4P..12P lazy, 12P..14P + 14P..17P CRIU's (one read), 17P..22P lazy, 22P..23P CRIU's
        map: [[A, 4, PRESENT], [B, 8, LAZY], [A + 8 * P, 2, PRESENT], [A + 10 * P, 3, PRESENT], [B + 20 * P, 5, LAZY], [A + 30 * P, 1, PRESENT]],
      },
      { pid: 2, pagesId: 4, vmas: [vma(B, 16)], map: [[B, 2, 0], [B + 4 * P, 3, PRESENT], [B + 8 * P, 2, LAZY]] },
    ]);
    expect(await criuPageReads(dir, codec)).toEqual([
      { path: join(dir, 'pages-3.img'), start: 0, end: 4 * P },
      { path: join(dir, 'pages-3.img'), start: 12 * P, end: 17 * P },
      { path: join(dir, 'pages-3.img'), start: 22 * P, end: 23 * P },
      { path: join(dir, 'pages-4.img'), start: 0, end: 3 * P },
    ]);
  });
});
