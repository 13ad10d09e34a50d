/**
 * Compressed lazy pages (docs/performance.md, "Compressed pages"): at checkpoint, the pages thaw-fill places (the
 * fill plan's copies, memory-fill.ts) move out of CRIU's pages files into one file of zstd frames, one frame per
 * thaw-fill chunk, written by native/build/thaw-pack on several threads. thaw-fill decompresses a frame where it
 * would have read the chunk. What a restore reads from disk shrinks by the ratio of the worker's memory (the GPU
 * reference worker's host pages, mostly what the CUDA driver moved there, compress ~4x; bench/RESULTS.md).
 *
 * The images then say less than CRIU's own restore needs: the lazy entries leave the pagemaps and their bytes the
 * pages files, so CRIU alone (without thaw-fill) would restore those pages as zeros. A checkpoint holding
 * COMPRESSED_PAGES_IMAGE is therefore restored through thaw-fill or not at all: restore-flow.ts refuses it
 * (RESTORE_MEMORY_FILL_REQUIRED, a cold start) where thaw-fill is off, missing or does not start, and
 * fillSourceOf never plans one from its images. Only the stored plan, rewritten here with the frames, places it.
 *
 * What stays exact: each frame decompresses to exactly its chunk's pages, checked by thaw-fill (size, and zstd's
 * checksum of the content); what remains in the pages files is exactly the non-lazy entries, in order; and the
 * files are rewritten beside the originals and renamed over them only when all are written, the plan last. Any
 * error before the renames leaves the dump as it was (plain lazy pages); one during them carries
 * `imagesChanged: true` (the dump must not be published).
 */
import { spawn } from 'node:child_process';
import { open, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { errorMessage } from '../errors.js';
import { COMPRESSED_PAGES_FILE_NAME } from '../store/index.js';
import { CRIU_PAGE_BYTES, CriuImageCodec, encodeImageFile } from './criu/images.js';
import { isLazyRecord, readPagemap } from './criu/pagemap.js';
import { buildFillPlan, encodeFillPlan, FILL_PLAN_IMAGE, type FillPlan } from './memory-fill.js';

/**
 * The frames' file beside the images; its presence means the checkpoint restores only through thaw-fill (and its
 * manifest is schema 2, which a thaw without this module refuses: store/manifest.ts).
 */
export const COMPRESSED_PAGES_IMAGE = COMPRESSED_PAGES_FILE_NAME;
/** Pages of one frame: thaw-fill's chunk (native/thaw-fill.c CHUNK_PAGES), so that a chunk is one frame. */
export const COMPRESSED_FRAME_PAGES = 256;
/** Below this many lazy bytes the pages stay plain: the rewrite costs the checkpoint more than a restore saves. */
export const COMPRESS_PAGES_MIN_BYTES = 16 * 1024 * 1024;
/**
 * Frames larger than this share of the pages they hold (random data, already compressed data) are dropped and the
 * pages stay plain: the restore would read nearly as much, and decompress it besides.
 */
export const COMPRESS_PAGES_MAX_RATIO = 0.9;
/**
 * Above COMPRESS_PAGES_SAMPLE_MIN_BYTES of lazy pages a sample decides first: every this-many-th frame. Below it the
 * whole is cheap to compress (tens of ms), and a sample of few frames would judge a mix of pages by chance.
 */
export const COMPRESS_PAGES_SAMPLE_STEP = 16;
export const COMPRESS_PAGES_SAMPLE_MIN_BYTES = 256 * 1024 * 1024;
const NEW_FILE_SUFFIX = '.thaw-compress';

export interface CompressPagesOptions {
  /** native/build/thaw-pack. */
  binary: string;
  threads: number;
  /** zstd level (1..19). */
  level: number;
  codec?: CriuImageCodec;
  signal?: AbortSignal;
  /** Default COMPRESS_PAGES_MIN_BYTES. */
  minBytes?: number;
  /** Default COMPRESS_PAGES_SAMPLE_MIN_BYTES. */
  sampleFromBytes?: number;
  /** The plan writeFillPlanImage made of these images just before (default: made from them again). */
  plan?: FillPlan;
}

export interface CompressPagesResult {
  /** Bytes of pages compressed, and the frames' bytes. */
  inBytes: number;
  outBytes: number;
  frames: number;
  /** Processes whose pagemap and pages file were rewritten. */
  tasks: number[];
  /** thaw-pack's own time, and the whole step's. */
  packMs: number;
  ms: number;
}

/** Whether the checkpoint's images in `dir` hold compressed pages (and so restore only through thaw-fill). */
export async function hasCompressedPages(dir: string): Promise<boolean> {
  return stat(join(dir, COMPRESSED_PAGES_IMAGE)).then(() => true, (err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return false;
    throw err;
  });
}

/** One frame: `pages` pages at `addr` of the plan's task `task`, from byte `offset` of `file`. */
export interface Frame {
  task: number;
  addr: number;
  pages: number;
  file: string;
  offset: number;
}

/** The frames of the plan's copies, one per thaw-fill chunk, in plan order. Pure. */
export function framesOf(plan: FillPlan): Frame[] {
  const frames: Frame[] = [];
  for (const [i, t] of plan.tasks.entries()) {
    if (t.pagesFile === undefined) continue;
    for (const c of t.copies) {
      for (let done = 0; done < c.pages; done += COMPRESSED_FRAME_PAGES) {
        const pages = Math.min(COMPRESSED_FRAME_PAGES, c.pages - done);
        frames.push({ task: i, addr: c.addr + done * CRIU_PAGE_BYTES, pages, file: t.pagesFile, offset: c.offset + done * CRIU_PAGE_BYTES });
      }
    }
  }
  return frames;
}

/** thaw-pack's job (its top comment) for `frames`, in their order. Pure. */
export function packJobOf(frames: readonly Frame[]): string {
  const lines: string[] = [];
  let file: string | undefined;
  for (const f of frames) {
    if (f.file !== file) lines.push(`file ${(file = f.file)}`);
    lines.push(`r ${f.offset} ${f.pages}`);
  }
  return lines.length > 0 ? `${lines.join('\n')}\n` : '';
}

/** Every `step`-th of `frames`, from the first: a sample spread over all of them. Pure. */
export function sampleOf<T>(frames: readonly T[], step: number): T[] {
  return frames.filter((_, i) => i % step === 0);
}

/** Runs thaw-pack on `job`, writing `out`; the frames' lengths in job order and its account. */
async function runPack(o: CompressPagesOptions, job: string, out: string): Promise<{ lengths: number[]; stats: { inBytes: number; outBytes: number; ms: number } }> {
  const child = spawn(o.binary, ['--out', out, '--threads', String(o.threads), '--level', String(o.level)], { stdio: ['pipe', 'pipe', 'pipe'], ...(o.signal ? { signal: o.signal } : {}) });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    if (stderr.length < 4096) stderr += d;
  });
  const lengths: number[] = [];
  let stats: { inBytes: number; outBytes: number; ms: number } | undefined;
  let error: string | undefined;
  const lines = createInterface({ input: child.stdout });
  lines.on('line', (line) => {
    if (/^\d+$/.test(line)) lengths.push(Number(line));
    else if (line.startsWith('done ')) stats = JSON.parse(line.slice(5)) as typeof stats;
    else error ??= line;
  });
  const closed = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code) => resolve(code));
  });
  child.stdin.on('error', () => undefined); // a thaw-pack that failed early closes its stdin: its own error says why
  child.stdin.end(job);
  const code = await closed;
  if (code !== 0 || stats === undefined) throw new Error(`thaw-pack: ${error ?? `exit ${code}`}${stderr !== '' ? ` (${stderr.trim()})` : ''}`);
  return { lengths, stats };
}

/** Copies the byte ranges `keep` (in order) of `from` into the new file `to`. */
async function copyRanges(from: string, to: string, keep: ReadonlyArray<{ start: number; end: number }>, signal: AbortSignal | undefined): Promise<void> {
  const input = await open(from, 'r');
  const output = await open(to, 'wx', 0o600);
  try {
    const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
    let at = 0;
    for (const r of keep) {
      for (let off = r.start; off < r.end; ) {
        signal?.throwIfAborted();
        const want = Math.min(buf.length, r.end - off);
        const { bytesRead } = await input.read(buf, 0, want, off);
        if (bytesRead === 0) throw new Error(`${from} ends at ${off}, its pagemap says ${r.end}`);
        let written = 0;
        while (written < bytesRead) written += (await output.write(buf, written, bytesRead - written, at + written)).bytesWritten;
        at += bytesRead;
        off += bytesRead;
      }
    }
    await output.sync();
  } finally {
    await Promise.all([input.close(), output.close()]);
  }
}

/**
 * Moves the lazy pages of the images in `dir` into COMPRESSED_PAGES_IMAGE and rewrites the stored plan to place
 * them from there. Runs after the plan was written (writeFillPlanImage); returns why not when there is nothing
 * worth compressing or no plan can be made. Throws on I/O or thaw-pack errors (see the top for what then holds).
 */
export async function compressLazyPages(dir: string, o: CompressPagesOptions): Promise<CompressPagesResult | { none: string }> {
  const started = performance.now();
  const codec = o.codec ?? CriuImageCodec.load();
  if (await hasCompressedPages(dir)) return { none: 'the pages are compressed already' };
  const plan = o.plan ?? (await buildFillPlan(dir, codec));
  if ('none' in plan) return plan;
  if (plan.copyBytes < (o.minBytes ?? COMPRESS_PAGES_MIN_BYTES)) return { none: `only ${plan.copyBytes} bytes of lazy pages` };
  const frames = framesOf(plan);
  const zpages = join(dir, COMPRESSED_PAGES_IMAGE);
  const written: string[] = [zpages + NEW_FILE_SUFFIX];
  const renames: Array<[string, string]> = [];
  let packed: Awaited<ReturnType<typeof runPack>>;
  try {
    // A sample first: pages that do not compress (random or compressed data) cost the checkpoint only the sample.
    const too = (p: { inBytes: number; outBytes: number }, what: string): { none: string } | undefined =>
      p.outBytes > p.inBytes * COMPRESS_PAGES_MAX_RATIO ? { none: `${what} compress only to ${p.outBytes} of ${p.inBytes} bytes` } : undefined;
    if (plan.copyBytes >= (o.sampleFromBytes ?? COMPRESS_PAGES_SAMPLE_MIN_BYTES) && frames.length >= 2 * COMPRESS_PAGES_SAMPLE_STEP) {
      const sample = await runPack(o, packJobOf(sampleOf(frames, COMPRESS_PAGES_SAMPLE_STEP)), zpages + NEW_FILE_SUFFIX);
      await rm(zpages + NEW_FILE_SUFFIX, { force: true });
      const refused = too(sample.stats, `a sample of the lazy pages (1 frame in ${COMPRESS_PAGES_SAMPLE_STEP})`);
      if (refused) return refused;
    }
    packed = await runPack(o, packJobOf(frames), zpages + NEW_FILE_SUFFIX);
    if (packed.lengths.length !== frames.length) throw new Error(`thaw-pack wrote ${packed.lengths.length} frames of ${frames.length}`);
    const refused = too(packed.stats, 'the lazy pages');
    if (refused) {
      await rm(zpages + NEW_FILE_SUFFIX, { force: true });
      return refused;
    }
    const rewritten: number[] = [];
    for (const t of plan.tasks) {
      if (t.copies.length === 0 || t.pagesFile === undefined) continue;
      const pagemap = await readPagemap(dir, t.pid, codec);
      if (pagemap === undefined) throw new Error(`pagemap-${t.pid}.img has no head`);
      // The non-lazy entries stay, with their bytes, in the order CRIU reads them; the lazy ones are the frames now.
      // (A plan exists only for a pagemap whose every entry is in its pages file: each has an offset.)
      const kept: Buffer[] = [];
      const keep: Array<{ start: number; end: number }> = [];
      for (const r of pagemap.records) {
        if (isLazyRecord(r) || r.offset === undefined) continue;
        kept.push(r.raw);
        const end = r.offset + r.nrPages * CRIU_PAGE_BYTES;
        const last = keep[keep.length - 1];
        if (last !== undefined && last.end === r.offset) last.end = end;
        else keep.push({ start: r.offset, end });
      }
      written.push(t.pagesFile + NEW_FILE_SUFFIX, pagemap.file + NEW_FILE_SUFFIX);
      await copyRanges(t.pagesFile, t.pagesFile + NEW_FILE_SUFFIX, keep, o.signal);
      await writeFile(pagemap.file + NEW_FILE_SUFFIX, encodeImageFile({ header: pagemap.header, entries: [pagemap.head, ...kept] }), { mode: 0o600, flag: 'wx' });
      renames.push([t.pagesFile + NEW_FILE_SUFFIX, t.pagesFile], [pagemap.file + NEW_FILE_SUFFIX, pagemap.file]);
      rewritten.push(t.pid);
    }
    // The plan: every copy is a frame now, placed from the frames' file (thaw-fill-plan 2).
    const framed: FillPlan = { ...plan, tasks: plan.tasks.map((t) => ({ ...t, copies: [], frames: [] })), zpagesFile: zpages };
    let zoff = 0;
    for (const [k, f] of frames.entries()) {
      const zlen = packed.lengths[k]!;
      framed.tasks[f.task]!.frames!.push({ addr: f.addr, pages: f.pages, zoff, zlen });
      zoff += zlen;
    }
    for (const t of framed.tasks) if (t.frames!.length > 0) delete t.pagesFile;
    const zbytes = await stat(zpages + NEW_FILE_SUFFIX).then((s) => s.size);
    if (zbytes !== zoff) throw new Error(`${COMPRESSED_PAGES_IMAGE} has ${zbytes} bytes, its frames ${zoff}`);
    written.push(join(dir, FILL_PLAN_IMAGE) + NEW_FILE_SUFFIX);
    await writeFile(join(dir, FILL_PLAN_IMAGE) + NEW_FILE_SUFFIX, encodeFillPlan(framed, { relative: true }), { mode: 0o600, flag: 'wx' });
    renames.unshift([zpages + NEW_FILE_SUFFIX, zpages]);
    renames.push([join(dir, FILL_PLAN_IMAGE) + NEW_FILE_SUFFIX, join(dir, FILL_PLAN_IMAGE)]);
    try {
      for (const [from, to] of renames) await rename(from, to);
    } catch (err) {
      throw Object.assign(new Error(`renaming the compressed images: ${errorMessage(err)}`), { imagesChanged: true, cause: err });
    }
    return { inBytes: packed.stats.inBytes, outBytes: packed.stats.outBytes, frames: frames.length, tasks: rewritten, packMs: Math.round(packed.stats.ms), ms: Math.round(performance.now() - started) };
  } catch (err) {
    if ((err as { imagesChanged?: boolean }).imagesChanged !== true) await Promise.all(written.map((f) => rm(f, { force: true })));
    throw err;
  }
}
