/**
 * Compressed lazy pages (src/restore-engine/compressed-pages.ts) on CRIU images built here, with the real thaw-pack
 * (native/build/thaw-pack) and Debian's zstd reading what it wrote: the frames (one per thaw-fill chunk, in plan
 * order), what stays for CRIU (the non-lazy entries and exactly their bytes, in order), the stored plan (version 2,
 * every lazy page a frame), when nothing is compressed, and that a failed step leaves the dump as it was. thaw-fill's
 * reading of such a plan is checked here too (what it refuses); test/integration/memory-fill.test.ts restores a
 * compressed CRIU dump through it.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { nativeDepsPaths } from '../../src/node-stack/native-deps.js';
import { COMPRESS_PAGES_MIN_BYTES, COMPRESS_PAGES_SAMPLE_STEP, COMPRESSED_FRAME_PAGES, COMPRESSED_PAGES_IMAGE, compressLazyPages, framesOf, hasCompressedPages, packJobOf, sampleOf } from '../../src/restore-engine/compressed-pages.js';
import { CRIU_PAGE_BYTES as P, decodePagemapEntryRaw, parseImageFile, VmaStatus } from '../../src/restore-engine/criu/images.js';
import { buildFillPlan, encodeFillPlan, FILL_PLAN_IMAGE, writeFillPlanImage, type FillPlan } from '../../src/restore-engine/memory-fill.js';
import { A, B, codec, FILE_PRIVATE, LAZY, PRESENT, pageMark, vma, writeImages } from '../helpers/criu-images.js';

const NATIVE = resolve(dirname(fileURLToPath(import.meta.url)), '../../native/build');
const PACK = join(NATIVE, 'thaw-pack');
const FILL = join(NATIVE, 'thaw-fill');
const ZSTD = nativeDepsPaths().zstd;
const pack = { binary: PACK, threads: 2, level: 1, codec, minBytes: 0 };

function pagemapOf(dir: string, pid: number): Array<[number, number, number | undefined]> {
  const name = `pagemap-${pid}.img`;
  const [, ...rest] = parseImageFile(readFileSync(join(dir, name)), name).entries;
  return rest.map((raw) => decodePagemapEntryRaw(raw, name)).map((e) => [e.vaddr, e.nrPages, e.flags]);
}

/** The bytes of the files in `dir`, by name. */
function snapshot(dir: string): Record<string, string> {
  return Object.fromEntries(readdirSync(dir).sort().map((n) => [n, readFileSync(join(dir, n)).toString('base64')]));
}

/** A task whose lazy pages cross a frame boundary and a VMA end, between non-lazy ones; and one with no lazy page. */
function twoTasks(): string {
  return writeImages([
    {
      pid: 7, pagesId: 3,
      vmas: [vma(A, 300), vma(A + 300 * P, 300), vma(B, 8, FILE_PRIVATE, VmaStatus.AREA_REGULAR | VmaStatus.FILE_PRIVATE)],
      // file order: 2 of CRIU's, 500 lazy (crossing the VMA end at A+300), 1 of CRIU's, 20 lazy
      map: [[B, 2, PRESENT], [A, 500, LAZY], [B + 4 * P, 1, PRESENT], [A + 520 * P, 20, LAZY]],
    },
    { pid: 8, pagesId: 4, vmas: [vma(B, 4, FILE_PRIVATE, VmaStatus.AREA_REGULAR | VmaStatus.FILE_PRIVATE)], map: [[B, 4, PRESENT]] },
  ], { zeros: {}, pages: 'marked' });
}

async function planOf(dir: string): Promise<FillPlan> {
  const p = await buildFillPlan(dir, codec);
  if ('none' in p) throw new Error(p.none);
  return p;
}

describe('packJobOf', () => {
  it('one frame per thaw-fill chunk of each copy, in plan order, offsets in the task\'s pages file; tasks without copies name no file', async () => {
    const plan = await planOf(twoTasks());
    const frames = framesOf(plan);
    const pages3 = plan.tasks[0]!.pagesFile!;
    // Copies: A..A+300 at 2P, A+300..A+500 at 302P (cut at the VMA end), A+520..A+540 at 503P.
    expect(packJobOf(frames)).toBe(`file ${pages3}\nr ${2 * P} 256\nr ${258 * P} 44\nr ${302 * P} 200\nr ${503 * P} 20\n`);
    expect(frames).toEqual([
      { task: 0, addr: A, pages: 256, file: pages3, offset: 2 * P },
      { task: 0, addr: A + 256 * P, pages: 44, file: pages3, offset: 258 * P },
      { task: 0, addr: A + 300 * P, pages: 200, file: pages3, offset: 302 * P },
      { task: 0, addr: A + 520 * P, pages: 20, file: pages3, offset: 503 * P },
    ]);
    expect(frames.every((f) => f.pages <= COMPRESSED_FRAME_PAGES)).toBe(true);
    // The sample: every n-th frame from the first; a job names each file once before its frames.
    expect(sampleOf(frames, 3)).toEqual([frames[0], frames[3]]);
    expect(packJobOf([frames[0]!, { ...frames[1]!, file: '/other' }, frames[2]!])).toBe(`file ${pages3}\nr ${2 * P} 256\nfile /other\nr ${258 * P} 44\nfile ${pages3}\nr ${302 * P} 200\n`);
    expect(packJobOf([])).toBe('');
  });
});

describe('compressLazyPages', () => {
  it('the lazy pages become zstd frames (Debian\'s zstd reads them back in plan order); CRIU keeps exactly its entries and their bytes; the plan places every frame', async () => {
    const dir = twoTasks();
    expect(await writeFillPlanImage(dir, codec)).toMatchObject({ copyBytes: 520 * P });
    const before = readFileSync(join(dir, 'pages-3.img'));
    const untouched = readFileSync(join(dir, 'pages-4.img'));
    const r = await compressLazyPages(dir, pack);
    if ('none' in r) throw new Error(r.none);
    expect(r).toMatchObject({ inBytes: 520 * P, frames: 4, tasks: [7] });
    expect(await hasCompressedPages(dir)).toBe(true);

    // The frames: the lazy pages in plan order (file order here), read by a peer.
    const lazy = Buffer.concat([before.subarray(2 * P, 502 * P), before.subarray(503 * P, 523 * P)]);
    const zpages = join(dir, COMPRESSED_PAGES_IMAGE);
    expect(execFileSync(ZSTD, ['-dc', zpages], { maxBuffer: 16 * 1024 * 1024 }).equals(lazy)).toBe(true);
    expect(readFileSync(zpages).length).toBe(r.outBytes);
    // Marked pages compress far (8 bytes of mark, zeros after).
    expect(r.outBytes).toBeLessThan(r.inBytes / 20);

    // What CRIU reads: its three pages, in order, and its entries only; the other task as it was.
    const after = readFileSync(join(dir, 'pages-3.img'));
    expect(after.length).toBe(3 * P);
    expect([0, 1, 2].map((i) => after.subarray(i * P, i * P + 8))).toEqual([pageMark(3, 0), pageMark(3, 1), pageMark(3, 502)]);
    expect(pagemapOf(dir, 7)).toEqual([[B, 2, PRESENT], [B + 4 * P, 1, PRESENT]]);
    expect(readFileSync(join(dir, 'pages-4.img')).equals(untouched)).toBe(true);

    // The stored plan: version 2, the frames' file by name, each frame at the end of the one before.
    const stored = readFileSync(join(dir, FILL_PLAN_IMAGE), 'utf8').split('\n');
    expect(stored.slice(0, 3)).toEqual(['thaw-fill-plan 2', `zpages ${COMPRESSED_PAGES_IMAGE}`, 'task 7 -']);
    const x = stored.filter((l) => l.startsWith('x ')).map((l) => l.split(' ').slice(1));
    expect(x.map(([addr, pages]) => [Number.parseInt(addr!, 16), Number(pages)])).toEqual([[A, 256], [A + 256 * P, 44], [A + 300 * P, 200], [A + 520 * P, 20]]);
    let zoff = 0;
    for (const [, , off, len] of x) {
      expect(Number(off)).toBe(zoff);
      zoff += Number(len);
    }
    expect(zoff).toBe(r.outBytes);
    expect(stored).toContain('task 8 -');
    expect(stored.some((l) => l.startsWith('c '))).toBe(false);
    // Once is enough: a second run changes nothing.
    const done = snapshot(dir);
    expect(await compressLazyPages(dir, pack)).toEqual({ none: 'the pages are compressed already' });
    expect(snapshot(dir)).toEqual(done);
  });

  it('nothing worth compressing, or no plan: the images stay as they are', async () => {
    const small = twoTasks();
    const before = snapshot(small);
    expect(await compressLazyPages(small, { ...pack, minBytes: COMPRESS_PAGES_MIN_BYTES })).toEqual({ none: `only ${520 * P} bytes of lazy pages` });
    const noZeroList = writeImages([{ pid: 1, vmas: [vma(A, 2)], map: [[A, 2, LAZY]] }], { pages: 'marked' });
    expect(await compressLazyPages(noZeroList, pack)).toMatchObject({ none: expect.stringMatching(/no thaw-zero-pages\.json/) });
    expect(snapshot(small)).toEqual(before);
    expect(await hasCompressedPages(small)).toBe(false);
  });

  it('pages that do not compress (random bytes): the frames are dropped, the pages stay plain', async () => {
    const dir = twoTasks();
    writeFileSync(join(dir, 'pages-3.img'), randomBytes(523 * P));
    await writeFillPlanImage(dir, codec);
    const before = snapshot(dir);
    expect(await compressLazyPages(dir, pack)).toMatchObject({ none: expect.stringMatching(/^the lazy pages compress only to \d+ of 2129920 bytes$/) });
    expect(snapshot(dir)).toEqual(before);
    expect(await hasCompressedPages(dir)).toBe(false);
  });

  it('many frames that do not compress: a sample of them decides, before the rest is compressed', async () => {
    const frames = 2 * COMPRESS_PAGES_SAMPLE_STEP;
    const dir = writeImages([{ pid: 5, vmas: [vma(A, frames * 256)], map: [[A, frames * 256, LAZY]] }], { zeros: {} });
    writeFileSync(join(dir, 'pages-5.img'), randomBytes(frames * 256 * P));
    await writeFillPlanImage(dir, codec);
    const before = snapshot(dir);
    // 32 MiB is less than the product samples from: the whole decides.
    expect(await compressLazyPages(dir, pack)).toMatchObject({ none: expect.stringMatching(/^the lazy pages compress only to \d+ of \d+ bytes$/) });
    // The sample is frames 0 and 16 of the 32: 2 x 256 pages.
    expect(await compressLazyPages(dir, { ...pack, sampleFromBytes: 0 })).toMatchObject({ none: expect.stringMatching(new RegExp(`^a sample of the lazy pages \\(1 frame in ${COMPRESS_PAGES_SAMPLE_STEP}\\) compress only to \\d+ of ${2 * 256 * P} bytes$`)) });
    expect(snapshot(dir)).toEqual(before);
  });

  it('thaw-pack failing (or missing): an error, and the dump exactly as it was, nothing of the step left', async () => {
    const dir = twoTasks();
    await writeFillPlanImage(dir, codec);
    // A stand-in that fails as thaw-pack does (in the images directory: removed with it).
    const failing = join(dir, 'failing-pack');
    writeFileSync(failing, '#!/bin/sh\ncat > /dev/null\necho "error READ the disk is gone"\nexit 1\n');
    chmodSync(failing, 0o755);
    const before = snapshot(dir);
    await expect(compressLazyPages(dir, { ...pack, binary: failing })).rejects.toThrow(/thaw-pack: error READ the disk is gone/);
    expect(snapshot(dir)).toEqual(before);
    await expect(compressLazyPages(dir, { ...pack, binary: join(dir, 'no-such-pack') })).rejects.toThrow(/ENOENT/);
    expect(snapshot(dir)).toEqual(before);
  });
});

describe('thaw-pack', () => {
  it('refuses a bad job (a frame larger than a chunk, before any file, off a page) and an existing output; writes nothing then', () => {
    const dir = twoTasks();
    const pages = join(dir, 'pages-3.img');
    const out = join(dir, 'out.zst');
    const cases: Array<[string, RegExp]> = [
      [`file ${pages}\nr 0 257\n`, /^error JOB line 2: bad frame/],
      [`r 0 1\n`, /^error JOB line 1: a frame before any file/],
      [`file ${pages}\nr 100 1\n`, /^error JOB line 2: bad frame/],
      [`file ${pages}\nr ${600 * P} 1\n`, /^error READ .*the pages file ends/],
      [`file ${join(dir, 'nope')}\n`, /^error JOB cannot open/],
    ];
    for (const [job, want] of cases) {
      const r = spawnSync(PACK, ['--out', out, '--threads', '2'], { input: job, encoding: 'utf8', timeout: 10_000 });
      expect([r.status, r.stdout], job).toEqual([1, expect.stringMatching(want)]);
      expect(existsSync(out), job).toBe(false);
    }
    writeFileSync(out, 'mine');
    const r = spawnSync(PACK, ['--out', out], { input: `file ${pages}\nr 0 1\n`, encoding: 'utf8', timeout: 10_000 });
    expect([r.status, r.stdout]).toEqual([1, expect.stringMatching(/^error WRITE cannot create/)]);
    expect(readFileSync(out, 'utf8')).toBe('mine');
  });
});

describe('thaw-fill reading a plan with compressed pages', () => {
  it('encodeFillPlan writes version 2 with the frames\' file and x lines; thaw-fill refuses frames in a version 1 plan, without a zpages file, larger than a chunk, and a zpages line after a task', () => {
    const plan: FillPlan = { tasks: [{ pid: 7, copies: [], zeros: [{ addr: A + 8 * P, pages: 2 }], frames: [{ addr: A, pages: 4, zoff: 0, zlen: 99 }] }], copyBytes: 0, zeroBytes: 2 * P, zpagesFile: '/x/thaw-pages.zst' };
    expect(encodeFillPlan(plan, { relative: true })).toBe(`thaw-fill-plan 2\nzpages thaw-pages.zst\ntask 7 -\nx ${A.toString(16)} 4 0 99\nz ${(A + 8 * P).toString(16)} 2\n`);
    const dir = twoTasks();
    writeFileSync(join(dir, 'z.zst'), Buffer.alloc(64));
    const x = `x ${A.toString(16)} 4 0 64`;
    const cases: Array<[string, RegExp]> = [
      [`thaw-fill-plan 1\ntask 7 -\n${x}\n`, /^error PLAN .*unknown line/],
      [`thaw-fill-plan 2\ntask 7 -\n${x}\n`, /^error PLAN .*a compressed range without a zpages file/],
      [`thaw-fill-plan 2\nzpages z.zst\ntask 7 -\nx ${A.toString(16)} 257 0 64\n`, /^error PLAN .*bad compressed range/],
      [`thaw-fill-plan 2\nzpages z.zst\ntask 7 -\nx ${A.toString(16)} 4 0 0\n`, /^error PLAN .*bad compressed range/],
      [`thaw-fill-plan 2\ntask 7 -\nzpages z.zst\n`, /^error PLAN .*zpages once, before any task/],
      [`thaw-fill-plan 2\nzpages ../z.zst\ntask 7 -\n`, /^error PLAN .*is not a name in the images directory/],
      [`thaw-fill-plan 3\n`, /^error PLAN .*not a thaw-fill-plan 1 or 2/],
    ];
    for (const [text, want] of cases) {
      writeFileSync(join(dir, 'plan.txt'), text);
      const r = spawnSync(FILL, ['--plan', join(dir, 'plan.txt'), '--images-dir', dir, '--timeout-ms', '2000'], { cwd: dir, encoding: 'utf8', timeout: 5_000 });
      expect([r.status, r.stdout], text).toEqual([3, expect.stringMatching(want)]);
    }
  });
});
