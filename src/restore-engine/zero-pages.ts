/**
 * Leaves pages that hold only zeros out of a CRIU dump, between the dump and the publication.
 *
 * Why: CRIU dumps every resident page, and a GPU worker's process holds many that were written with zeros
 * (a third of the reference worker's 3.2 GB on the H200: mostly the CUDA driver's host copy of the device
 * state). CRIU's restorer copies every dumped page into a fresh page-faulted mapping, ~1.8 GB/s there, so each
 * zero page costs restore time, disk and registry bytes for nothing.
 *
 * Why it is exact: a page of a private anonymous mapping that is absent from the pagemap is restored as an
 * untouched page, and an untouched anonymous page reads as zeros. So only pages of VMAs that are private and
 * anonymous (CRIU's VMA_ANON_PRIVATE, no file behind them whose content would show through, not shared memory,
 * System V IPC, memfd, AIO rings or shadow stacks) are dropped. Conservative where CRIU's restore may inherit a
 * child's private mapping from its parent (copy-on-write premap): a VMA with the same range as a private
 * anonymous VMA of the parent keeps all its pages. Processes whose pagemap uses parent images or absent pages,
 * or whose pages file does not have the size its pagemap says, are left as they are.
 *
 * All rewritten files are written next to the originals and renamed over them only when every process is
 * done; any error before that leaves the dump untouched (the caller then publishes it as CRIU wrote it); an
 * error while renaming carries `imagesChanged: true` (the dump must not be published).
 */
import { open, readFile, rename, rm, stat, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { CRIU_PAGE_BYTES, CriuImageCodec, encodeImageFile, PagemapFlags, parseImageFile, VmaStatus, type PagemapEntry, type VmaEntry } from './criu/images.js';

/** Read size of the pages scan: whole pages, large enough that a syscall per read costs nothing. */
export const ZERO_PAGE_SCAN_READ_BYTES = 8 * 1024 * 1024;
/**
 * A process's pages are rewritten only when at least this much (and ZERO_PAGES_MIN_SHARE of them) is zero:
 * below that the copy costs the checkpoint more than the restore saves.
 */
export const ZERO_PAGES_MIN_BYTES = 16 * 1024 * 1024;
export const ZERO_PAGES_MIN_SHARE = 0.02;
const NEW_FILE_SUFFIX = '.thaw-zero-pages';
/**
 * Beside the images: the address ranges whose pages were dropped, per process ({"v":1,"processes":{"<pid>":
 * [["<hex address>", pages], ...]}}). CRIU never reads it; the memory fill places zeros there up front
 * (memory-fill.ts), where the process would otherwise fault each page in alone. A hint only: whatever it says,
 * an absent page of a private anonymous mapping is zeros, and the fill never overwrites a page that is there.
 */
export const ZERO_PAGES_FILE = 'thaw-zero-pages.json';

/** The ranges of a ZERO_PAGES_FILE by pid, in bytes (user addresses are below 2^53); throws on a file that is not one. */
export function parseZeroPagesFile(text: string): Map<number, Array<{ start: number; end: number }>> {
  const doc = JSON.parse(text) as { v?: unknown; processes?: unknown };
  if (doc.v !== 1 || typeof doc.processes !== 'object' || doc.processes === null) throw new Error(`${ZERO_PAGES_FILE}: not version 1`);
  const out = new Map<number, Array<{ start: number; end: number }>>();
  for (const [pid, ranges] of Object.entries(doc.processes as Record<string, unknown>)) {
    if (!/^[1-9]\d*$/.test(pid) || !Array.isArray(ranges)) throw new Error(`${ZERO_PAGES_FILE}: bad entry for ${pid}`);
    out.set(Number(pid), ranges.map((r: unknown) => {
      const start = Array.isArray(r) && typeof r[0] === 'string' && /^[0-9a-f]{1,13}$/.test(r[0]) ? Number.parseInt(r[0], 16) : Number.NaN;
      const pages = Array.isArray(r) ? (r[1] as unknown) : undefined;
      if (Number.isNaN(start) || !Number.isSafeInteger(pages) || (pages as number) <= 0) throw new Error(`${ZERO_PAGES_FILE}: bad range for ${pid}`);
      return { start, end: start + (pages as number) * CRIU_PAGE_BYTES };
    }));
  }
  return out;
}

const NOT_DROPPABLE =
  VmaStatus.ANON_SHARED | VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED | VmaStatus.AREA_SYSVIPC | VmaStatus.AREA_SOCKET |
  VmaStatus.AREA_VVAR | VmaStatus.AREA_AIORING | VmaStatus.AREA_MEMFD | VmaStatus.AREA_SHSTK;

export interface ZeroPagesResult {
  /** Bytes of pages read (every dumped page of every process that was scanned). */
  scannedBytes: number;
  /** Bytes of all-zero pages left out. */
  droppedBytes: number;
  /** Processes whose images were rewritten. */
  rewritten: number[];
  /** Processes left as CRIU wrote them, and why. */
  skipped: Array<{ pid: number; reason: string }>;
  ms: number;
}

interface Range {
  start: number;
  end: number;
}

/** The address ranges whose zero pages may be dropped, sorted (pure; exported for tests). */
export function droppableRanges(vmas: readonly VmaEntry[], parentVmas: readonly VmaEntry[] | undefined): Range[] {
  const inherited = new Set((parentVmas ?? []).filter((v) => v.status & VmaStatus.ANON_PRIVATE).map((v) => `${v.start}-${v.end}`));
  return vmas
    .filter((v) => (v.status & VmaStatus.AREA_REGULAR) !== 0 && (v.status & VmaStatus.ANON_PRIVATE) !== 0 && (v.status & NOT_DROPPABLE) === 0)
    .filter((v) => !inherited.has(`${v.start}-${v.end}`))
    .map((v) => ({ start: Number(v.start), end: Number(v.end) }))
    .sort((a, b) => a.start - b.start);
}

/** Appends a run of kept pages to the new pagemap, extending the last entry when the run continues it. */
function appendRun(out: PagemapEntry[], vaddr: number, pages: number, like: PagemapEntry): void {
  const last = out[out.length - 1];
  if (last !== undefined && last.flags === like.flags && last.inParent === like.inParent && Number(last.vaddr) + last.nrPages * CRIU_PAGE_BYTES === vaddr) {
    last.nrPages += pages;
    return;
  }
  out.push({ vaddr: BigInt(vaddr), nrPages: pages, ...(like.inParent !== undefined ? { inParent: like.inParent } : {}), ...(like.flags !== undefined ? { flags: like.flags } : {}) });
}

interface ProcessPlan {
  pid: number;
  pagemapFile: string;
  pagesFile: string;
  header: Buffer;
  headEntry: Buffer;
  entries: PagemapEntry[];
  ranges: Range[];
}

async function planProcess(dir: string, codec: CriuImageCodec, pid: number, vmas: readonly VmaEntry[], parentVmas: readonly VmaEntry[] | undefined): Promise<ProcessPlan | string> {
  const pagemapFile = join(dir, `pagemap-${pid}.img`);
  const image = parseImageFile(await readFile(pagemapFile), `pagemap-${pid}.img`);
  const [headEntry, ...rest] = image.entries;
  if (headEntry === undefined) return 'pagemap has no head';
  const { pagesId } = codec.decodePagemapHead(headEntry);
  const entries = rest.map((e) => codec.decodePagemapEntry(e));
  // PE_LAZY marks pages a lazy restore may fetch later; they are in the pages file all the same (CRIU sets it
  // on private anonymous pages of every dump). Pages in a parent image (pre-dumps) or not present are not.
  const inPagesFile = (e: PagemapEntry): boolean => e.inParent !== true && ((e.flags ?? PagemapFlags.PRESENT) & PagemapFlags.PARENT) === 0 && ((e.flags ?? PagemapFlags.PRESENT) & PagemapFlags.PRESENT) !== 0;
  if (!entries.every(inPagesFile)) return 'pagemap refers to parent images or absent pages';
  const pagesFile = join(dir, `pages-${pagesId}.img`);
  const expected = entries.reduce((n, e) => n + e.nrPages, 0) * CRIU_PAGE_BYTES;
  const actual = (await stat(pagesFile)).size;
  if (actual !== expected) return `pages-${pagesId}.img has ${actual} bytes, its pagemap says ${expected}`;
  const ranges = droppableRanges(vmas, parentVmas);
  if (ranges.length === 0) return 'no private anonymous mapping';
  return { pid, pagemapFile, pagesFile, header: image.header, headEntry, entries, ranges };
}

/** Reads `length` bytes at `position` into `buf` (from 0), or throws at an early end of file. */
async function readFully(fh: FileHandle, buf: Buffer, length: number, position: number, name: string): Promise<void> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, position + got);
    if (bytesRead === 0) throw new Error(`${name}: unexpected end at byte ${position + got}`);
    got += bytesRead;
  }
}

/** Writes `parts` at `position` (writev; the rest again after a short write); returns the bytes written. */
async function writeAllv(fh: FileHandle, parts: Buffer[], position: number): Promise<number> {
  const total = parts.reduce((n, b) => n + b.length, 0);
  let done = 0;
  let rest = parts;
  while (done < total) {
    const { bytesWritten } = await fh.writev(rest, position + done);
    if (bytesWritten === 0) throw new Error('writev wrote nothing');
    done += bytesWritten;
    if (done < total) {
      // Drop what was written: whole buffers, then the front of the one it stopped in.
      let skip = bytesWritten;
      const left: Buffer[] = [];
      for (const b of rest) {
        if (skip >= b.length) skip -= b.length;
        else {
          left.push(skip > 0 ? b.subarray(skip) : b);
          skip = 0;
        }
      }
      rest = left;
    }
  }
  return total;
}

/** A stretch of consecutive pages of one pagemap entry, at most `maxPages`, and where it lies in the pages file. */
interface Chunk {
  entry: PagemapEntry;
  /** Address of its first page. */
  vaddr: number;
  /** Index of its first page in the pages file. */
  page: number;
  pages: number;
}

/** The pagemap's pages in file order, cut into chunks that fit the read buffer (both passes walk it so). */
function* chunksOf(entries: readonly PagemapEntry[], maxPages: number): Generator<Chunk> {
  let page = 0;
  for (const entry of entries) {
    for (let done = 0; done < entry.nrPages; ) {
      const pages = Math.min(entry.nrPages - done, maxPages);
      yield { entry, vaddr: Number(entry.vaddr) + done * CRIU_PAGE_BYTES, page, pages };
      page += pages;
      done += pages;
    }
  }
}

/**
 * Pass 1: which pages of the pages file are droppable zero pages (one byte per page, 1 = drop). Only reads
 * and compares: most dumps have few zero pages, and then nothing is written at all.
 */
async function findZeroPages(plan: ProcessPlan, input: FileHandle, buf: Buffer, signal: AbortSignal | undefined): Promise<{ drop: Uint8Array; dropped: number; scanned: number }> {
  const zero = Buffer.alloc(CRIU_PAGE_BYTES);
  const totalPages = plan.entries.reduce((n, e) => n + e.nrPages, 0);
  const drop = new Uint8Array(totalPages);
  let dropped = 0;
  let rangeIndex = 0;
  for (const { vaddr, page, pages: n } of chunksOf(plan.entries, buf.length / CRIU_PAGE_BYTES)) {
    signal?.throwIfAborted();
    // Skip the read where no page of this stretch may be dropped (file-backed, shared, inherited).
    while (rangeIndex < plan.ranges.length && plan.ranges[rangeIndex]!.end <= vaddr) rangeIndex += 1;
    const first = plan.ranges[rangeIndex];
    if (first === undefined || first.start >= vaddr + n * CRIU_PAGE_BYTES) continue;
    await readFully(input, buf, n * CRIU_PAGE_BYTES, page * CRIU_PAGE_BYTES, plan.pagesFile);
    let r = rangeIndex;
    for (let i = 0; i < n; i += 1) {
      const a = vaddr + i * CRIU_PAGE_BYTES;
      while (r < plan.ranges.length && plan.ranges[r]!.end <= a) r += 1;
      const range = plan.ranges[r];
      if (range !== undefined && range.start <= a && zero.compare(buf, i * CRIU_PAGE_BYTES, (i + 1) * CRIU_PAGE_BYTES) === 0) {
        drop[page + i] = 1;
        dropped += 1;
      }
    }
  }
  return { drop, dropped: dropped * CRIU_PAGE_BYTES, scanned: totalPages * CRIU_PAGE_BYTES };
}

/** Pass 2: the kept pages into a new pages file (runs written straight from the read buffer) and the new pagemap. */
async function writeKeptPages(plan: ProcessPlan, codec: CriuImageCodec, input: FileHandle, buf: Buffer, drop: Uint8Array, signal: AbortSignal | undefined): Promise<Array<[string, number]>> {
  const kept: PagemapEntry[] = [];
  const dropped: Array<[string, number]> = [];
  let runStart = -1;
  let runPages = 0;
  const output = await open(plan.pagesFile + NEW_FILE_SUFFIX, 'wx', 0o600);
  try {
    let writeAt = 0;
    for (const { entry, vaddr, page, pages: n } of chunksOf(plan.entries, buf.length / CRIU_PAGE_BYTES)) {
      signal?.throwIfAborted();
      await readFully(input, buf, n * CRIU_PAGE_BYTES, page * CRIU_PAGE_BYTES, plan.pagesFile);
      // One writev per chunk of the kept runs (views of the read buffer): zero pages come interleaved with
      // data, and a write per run would be a syscall per few pages.
      const runs: Buffer[] = [];
      for (let i = 0; i < n; ) {
        if (drop[page + i] === 1) {
          const a = vaddr + i * CRIU_PAGE_BYTES;
          if (runStart >= 0 && runStart + runPages * CRIU_PAGE_BYTES === a) runPages += 1;
          else {
            if (runStart >= 0) dropped.push([runStart.toString(16), runPages]);
            runStart = a;
            runPages = 1;
          }
          i += 1;
          continue;
        }
        let j = i;
        while (j < n && drop[page + j] !== 1) j += 1;
        runs.push(buf.subarray(i * CRIU_PAGE_BYTES, j * CRIU_PAGE_BYTES));
        appendRun(kept, vaddr + i * CRIU_PAGE_BYTES, j - i, entry);
        i = j;
      }
      writeAt += await writeAllv(output, runs, writeAt);
    }
  } finally {
    await output.close();
  }
  const pagemap = encodeImageFile({ header: plan.header, entries: [plan.headEntry, ...kept.map((e) => codec.encodePagemapEntry(e))] });
  const pm = await open(plan.pagemapFile + NEW_FILE_SUFFIX, 'wx', 0o600);
  try {
    await pm.write(pagemap, 0, pagemap.length, 0);
  } finally {
    await pm.close();
  }
  if (runStart >= 0) dropped.push([runStart.toString(16), runPages]);
  return dropped;
}

/**
 * Drops the all-zero pages of private anonymous mappings from the CRIU images in `dir`. Throws (leaving the
 * images as CRIU wrote them) on unreadable images or I/O errors; the caller decides whether that matters.
 */
export async function dropZeroPages(
  dir: string,
  options: { codec?: CriuImageCodec; signal?: AbortSignal; /** Default ZERO_PAGES_MIN_BYTES. */ minDropBytes?: number } = {},
): Promise<ZeroPagesResult> {
  const started = performance.now();
  const codec = options.codec ?? CriuImageCodec.load();
  const pstree = parseImageFile(await readFile(join(dir, 'pstree.img')), 'pstree.img').entries.map((e) => codec.decodePstree(e));
  const vmasOf = new Map<number, VmaEntry[]>();
  for (const p of pstree) {
    const mm = parseImageFile(await readFile(join(dir, `mm-${p.pid}.img`)), `mm-${p.pid}.img`);
    vmasOf.set(p.pid, mm.entries[0] !== undefined ? codec.decodeVmas(mm.entries[0]) : []);
  }
  const result: ZeroPagesResult = { scannedBytes: 0, droppedBytes: 0, rewritten: [], skipped: [], ms: 0 };
  const minDropBytes = options.minDropBytes ?? ZERO_PAGES_MIN_BYTES;
  const buf = Buffer.allocUnsafe(ZERO_PAGE_SCAN_READ_BYTES);
  const plans: ProcessPlan[] = [];
  const droppedRanges: Record<string, Array<[string, number]>> = {};
  try {
    for (const p of pstree) {
      const plan = await planProcess(dir, codec, p.pid, vmasOf.get(p.pid) ?? [], vmasOf.get(p.ppid));
      if (typeof plan === 'string') {
        result.skipped.push({ pid: p.pid, reason: plan });
        continue;
      }
      const input = await open(plan.pagesFile, 'r');
      try {
        const { drop, dropped, scanned } = await findZeroPages(plan, input, buf, options.signal);
        result.scannedBytes += scanned;
        if (dropped < Math.max(minDropBytes, scanned * ZERO_PAGES_MIN_SHARE)) {
          result.skipped.push({ pid: p.pid, reason: `only ${dropped} bytes of zero pages` });
          continue;
        }
        plans.push(plan);
        droppedRanges[String(p.pid)] = await writeKeptPages(plan, codec, input, buf, drop, options.signal);
        result.droppedBytes += dropped;
      } finally {
        await input.close();
      }
    }
    await writeFile(join(dir, ZERO_PAGES_FILE + NEW_FILE_SUFFIX), JSON.stringify({ v: 1, processes: droppedRanges }), { mode: 0o600, flag: 'wx' });
  } catch (err) {
    await Promise.all([
      ...plans.flatMap((p) => [rm(p.pagesFile + NEW_FILE_SUFFIX, { force: true }), rm(p.pagemapFile + NEW_FILE_SUFFIX, { force: true })]),
      rm(join(dir, ZERO_PAGES_FILE + NEW_FILE_SUFFIX), { force: true }),
    ]);
    throw err;
  }
  // Every process is rewritten: only now replace CRIU's files. A rename that fails here (same directory: next
  // to impossible) leaves a pages file and its pagemap out of step, so the error says the images changed.
  try {
    for (const p of plans) {
      await rename(p.pagesFile + NEW_FILE_SUFFIX, p.pagesFile);
      await rename(p.pagemapFile + NEW_FILE_SUFFIX, p.pagemapFile);
      result.rewritten.push(p.pid);
    }
    // Last: a dump whose renames stopped half way has no list (the fill then leaves zeros to the faults).
    await rename(join(dir, ZERO_PAGES_FILE + NEW_FILE_SUFFIX), join(dir, ZERO_PAGES_FILE));
  } catch (err) {
    throw Object.assign(err instanceof Error ? err : new Error(String(err)), { imagesChanged: true });
  }
  result.ms = Math.round(performance.now() - started);
  return result;
}
