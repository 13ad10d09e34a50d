/**
 * The memory fill of a restore through userfaultfd (docs/performance.md, "Memory fill"): CRIU restores the
 * process tree with `lazy_pages`, leaving out the pages of private anonymous mappings, and thaw-fill
 * (native/thaw-fill.c) places them from the pages files on several threads while the tree runs, serving its page
 * faults first. CRIU's own restorer reads every page on one thread before the process exists; here the skeleton
 * is up at once and the CUDA restore overlaps the fill.
 *
 * The contract with the restore flow: the fill's `done` must resolve before the tree is let run its own code
 * (before thaw-pause adopts it and restore-complete is written); on any error the tree is killed first and the
 * filler after it (killRestoredTree, then stop()), because a filler gone before its work is done would leave the
 * pages it had not placed reading as zeros. thaw-fill keeps its uffds open after an error for that reason.
 *
 * The plan comes from the checkpoint's verified images only: per task its pagemap's PE_LAZY entries (the pages
 * CRIU leaves to the fill), cut at VMA boundaries (UFFDIO_COPY works within one VMA) and located in the pages
 * file, and the all-zero pages the checkpoint dropped (thaw-zero-pages.json, zero-pages.ts), which the process
 * would otherwise fault in one page at a time. A pagemap that refers to parent images has no plan (the fill
 * reads one pages file per task): such a checkpoint restores with CRIU's own fill.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { createInterface } from 'node:readline';
import { errorMessage } from '../errors.js';
import { CRIU_PAGE_BYTES, CriuImageCodec, VmaStatus, parseImageFile, type VmaEntry } from './criu/images.js';
import { isLazyRecord, readPagemap } from './criu/pagemap.js';
import { RestoreError, RestoreErrorCode } from './restore-errors.js';
import { ZERO_PAGES_FILE, parseZeroPagesFile } from './zero-pages.js';

/** The plan's file name in CRIU's work directory (the filler's cwd, where CRIU looks for lazy-pages.socket). */
export const FILL_PLAN_FILE = 'fill-plan.txt';
/**
 * The plan made at checkpoint time, beside the images (digested with them): a restore then hands it to thaw-fill
 * as it is, and plans nothing on CreateContainer's event loop. Its pages files are names in the images directory.
 */
export const FILL_PLAN_IMAGE = 'thaw-fill-plan.txt';
/** The most zero bytes a plan places: FILL_MAX_ZERO_FACTOR × its copied bytes + FILL_MAX_ZERO_SLACK_BYTES. */
export const FILL_MAX_ZERO_FACTOR = 16;
export const FILL_MAX_ZERO_SLACK_BYTES = 1024 ** 3;

/**
 * The mappings CRIU's restorer registers with the uffd (its vma_entry_can_be_lazy, criu/include/vma.h): mmap
 * flags MAP_ANONYMOUS | MAP_PRIVATE without MAP_LOCKED or MAP_HUGETLB, and not the vDSO, vvar or vsyscall page.
 */
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_LOCKED = 0x2000;
const MAP_HUGETLB = 0x40000;
const VMA_AREA_VSYSCALL = 1 << 2;
const VMA_AREA_VDSO = 1 << 3;
export function vmaCanBeLazy(v: Pick<VmaEntry, 'flags' | 'status'>): boolean {
  return (
    (v.flags & MAP_ANONYMOUS) !== 0 && (v.flags & MAP_PRIVATE) !== 0 && (v.flags & (MAP_LOCKED | MAP_HUGETLB)) === 0 &&
    (v.status & (VMA_AREA_VDSO | VmaStatus.AREA_VVAR | VMA_AREA_VSYSCALL)) === 0
  );
}

export interface FillPlanTask {
  pid: number;
  /** The task's pages file; undefined when no page of it is lazy. */
  pagesFile?: string;
  /** Copies: `pages` pages at `addr` from byte `offset` of pagesFile, each within one VMA, sorted. */
  copies: Array<{ addr: number; pages: number; offset: number }>;
  /** Zero ranges inside lazy VMAs that the copies do not cover, sorted. */
  zeros: Array<{ addr: number; pages: number }>;
  /**
   * Compressed pages (compressed-pages.ts): `pages` pages (at most one thaw-fill chunk) at `addr` are the zstd frame
   * of `zlen` bytes at byte `zoff` of the plan's zpagesFile, each within one VMA.
   */
  frames?: Array<{ addr: number; pages: number; zoff: number; zlen: number }>;
}

export interface FillPlan {
  tasks: FillPlanTask[];
  /** The frames' file of a plan with compressed pages (thaw-fill-plan 2). */
  zpagesFile?: string;
  /** Bytes the copies place. */
  copyBytes: number;
  zeroBytes: number;
}

/** [start, end) in bytes. User addresses are below 2^47 on x86-64: a double holds them exactly. */
interface Span {
  start: number;
  end: number;
}

const byStart = (a: Span, b: Span): number => a.start - b.start;

/**
 * The parts of each span (sorted) inside `within` (sorted, disjoint), cut at the ends of `within`'s spans, each
 * with the span it came from. One pass over both lists.
 */
function intersect<T extends Span>(spans: readonly T[], within: readonly Span[]): Array<{ part: Span; of: T }> {
  const out: Array<{ part: Span; of: T }> = [];
  let w = 0;
  for (const s of spans) {
    while (w > 0 && within[w - 1]!.end > s.start) w--; // spans may overlap the previous one's VMA
    while (w < within.length && within[w]!.end <= s.start) w++;
    for (let k = w; k < within.length && within[k]!.start < s.end; k++) {
      const a = Math.max(s.start, within[k]!.start);
      const b = Math.min(s.end, within[k]!.end);
      if (a < b) out.push({ part: { start: a, end: b }, of: s });
    }
  }
  return out;
}

/** `spans` (sorted) less `cut` (sorted by start; may overlap), in one pass over both. */
function subtract(spans: readonly Span[], cut: readonly Span[]): Span[] {
  const out: Span[] = [];
  let c = 0;
  for (const s of spans) {
    let at = s.start;
    while (c < cut.length && cut[c]!.end <= at) c++;
    for (let k = c; k < cut.length && cut[k]!.start < s.end; k++) {
      if (cut[k]!.start > at) out.push({ start: at, end: cut[k]!.start });
      at = Math.max(at, cut[k]!.end);
      if (at >= s.end) break;
    }
    if (at < s.end) out.push({ start: at, end: s.end });
  }
  return out;
}

/**
 * The fill plan of the images in `dir`, or a reason why there is none (the restore then uses CRIU's own fill).
 * Throws only on unreadable or undecodable images (which CRIU would refuse as well). Linear in the pagemap's
 * entries (tens of thousands once zero pages are dropped): it runs at checkpoint (writeFillPlanImage), and on the
 * agent's event loop at prepare only for a checkpoint stored without a plan.
 */
export async function buildFillPlan(dir: string, codec: CriuImageCodec): Promise<FillPlan | { none: string }> {
  const pstree = parseImageFile(await readFile(join(dir, 'pstree.img')), 'pstree.img').entries.map((e) => codec.decodePstree(e));
  const zeroFile = await readFile(join(dir, ZERO_PAGES_FILE), 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
  // A checkpoint from before the file existed may have dropped zero pages thaw no longer knows of: every one of
  // them would be a fault of its own, so such a checkpoint keeps CRIU's fill.
  if (zeroFile === undefined) return { none: `no ${ZERO_PAGES_FILE} (a checkpoint of an earlier thaw)` };
  const dropped = parseZeroPagesFile(zeroFile);
  const plan: FillPlan = { tasks: [], copyBytes: 0, zeroBytes: 0 };
  for (const p of pstree) {
    const mm = parseImageFile(await readFile(join(dir, `mm-${p.pid}.img`)), `mm-${p.pid}.img`);
    const vmas: VmaEntry[] = mm.entries[0] !== undefined ? codec.decodeVmas(mm.entries[0]) : [];
    const lazy: Span[] = vmas.filter(vmaCanBeLazy).map((v) => ({ start: Number(v.start), end: Number(v.end) })).sort(byStart);
    const pagemap = await readPagemap(dir, p.pid, codec);
    if (pagemap === undefined) return { none: `pagemap-${p.pid}.img has no head` };
    const task: FillPlanTask = { pid: p.pid, copies: [], zeros: [] };
    const covered: Span[] = [];
    const lazyEntries: Array<Span & { offset: number }> = [];
    for (const r of pagemap.records) {
      if (r.inParent) return { none: `${pagemap.name} refers to a parent image` };
      if (r.offset === undefined) return { none: `${pagemap.name} has pages that are not in its pages file` };
      const span = { start: r.vaddr, end: r.vaddr + r.nrPages * CRIU_PAGE_BYTES };
      covered.push(span);
      if (isLazyRecord(r)) lazyEntries.push({ ...span, offset: r.offset });
    }
    // Every byte of the pages file is some entry's: a pagemap this decoder misreads (a CRIU of another image
    // format) would otherwise plan too little, and the pages it left out would read as zeros.
    const pagesFile = pagemap.pagesFile;
    const pagesBytes = await stat(pagesFile).then((st) => st.size, () => 0);
    if (pagemap.pagesBytes !== pagesBytes) return { none: `pages-${pagemap.pagesId}.img has ${pagesBytes} bytes, ${pagemap.name} accounts for ${pagemap.pagesBytes}` };
    lazyEntries.sort(byStart);
    covered.sort(byStart);
    // CRIU leaves exactly the lazy entries to the fill, cut at VMA ends (UFFDIO_COPY works within one VMA); a lazy
    // entry outside every lazy VMA would be a broken image.
    let placed = 0;
    for (const { part, of } of intersect(lazyEntries, lazy)) {
      task.copies.push({ addr: part.start, pages: (part.end - part.start) / CRIU_PAGE_BYTES, offset: of.offset + (part.start - of.start) });
      placed += part.end - part.start;
    }
    const lazyBytes = lazyEntries.reduce((n, e) => n + e.end - e.start, 0);
    if (placed !== lazyBytes) return { none: `pagemap-${p.pid}.img: lazy pages outside a private anonymous mapping` };
    if (lazyEntries.length > 0) task.pagesFile = pagesFile;
    plan.copyBytes += lazyBytes;
    const zeroSpans = [...(dropped.get(p.pid) ?? [])].sort(byStart);
    for (const free of subtract(intersect(zeroSpans, lazy).map((x) => x.part), covered)) {
      task.zeros.push({ addr: free.start, pages: (free.end - free.start) / CRIU_PAGE_BYTES });
      plan.zeroBytes += free.end - free.start;
    }
    plan.tasks.push(task);
  }
  // Zero ranges cost page tables, not pages: a list far larger than the pages (not one thaw writes) is ignored.
  if (plan.zeroBytes > FILL_MAX_ZERO_FACTOR * plan.copyBytes + FILL_MAX_ZERO_SLACK_BYTES) {
    for (const t of plan.tasks) t.zeros = [];
    plan.zeroBytes = 0;
  }
  return plan;
}

/** A byte range of one pages file: [start, end). */
export interface PagesFileRange {
  path: string;
  start: number;
  end: number;
}

/**
 * The byte ranges of the pages files that CRIU reads itself in a restore with lazy pages: every present entry
 * without PE_LAZY (dirty pages of private file mappings, shared memory, what cannot be lazy), adjacent ones merged,
 * per task in file order. CRIU reads them one synchronous preadv at a time, so with the page cache cold each waits
 * for whatever the disk has queued; the prefetch reads them before the bulk. From the images in `dir` only;
 * throws on an unreadable or undecodable one.
 */
export async function criuPageReads(dir: string, codec: CriuImageCodec): Promise<PagesFileRange[]> {
  const out: PagesFileRange[] = [];
  const pstree = parseImageFile(await readFile(join(dir, 'pstree.img')), 'pstree.img').entries.map((e) => codec.decodePstree(e));
  for (const p of pstree) {
    const pagemap = await readPagemap(dir, p.pid, codec);
    if (pagemap === undefined) continue;
    const path = pagemap.pagesFile;
    for (const r of pagemap.records) {
      // Pages in a parent image, or not dumped at all, take no bytes of this pages file.
      if (r.offset === undefined || isLazyRecord(r)) continue;
      const end = r.offset + r.nrPages * CRIU_PAGE_BYTES;
      const last = out[out.length - 1];
      if (last !== undefined && last.path === path && last.end === r.offset) last.end = end;
      else out.push({ path, start: r.offset, end });
    }
  }
  return out;
}

/**
 * The plan as thaw-fill reads it (native/thaw-fill.c, top comment). `relative`: pages files as names in the images
 * directory (thaw-fill's --images-dir), for the plan stored with the checkpoint.
 */
export function encodeFillPlan(plan: FillPlan, options: { relative?: boolean } = {}): string {
  const name = (file: string): string => (options.relative === true ? basename(file) : file);
  const lines = plan.zpagesFile === undefined ? ['thaw-fill-plan 1'] : ['thaw-fill-plan 2', `zpages ${name(plan.zpagesFile)}`];
  for (const t of plan.tasks) {
    lines.push(`task ${t.pid} ${t.pagesFile === undefined ? '-' : name(t.pagesFile)}`);
    for (const c of t.copies) lines.push(`c ${c.addr.toString(16)} ${c.pages} ${c.offset}`);
    for (const f of t.frames ?? []) lines.push(`x ${f.addr.toString(16)} ${f.pages} ${f.zoff} ${f.zlen}`);
    for (const z of t.zeros) lines.push(`z ${z.addr.toString(16)} ${z.pages}`);
  }
  return lines.join('\n') + '\n';
}

/** thaw-fill's own account (its `done` line). */
export interface FillStats {
  copiedBytes: number;
  zeroedBytes: number;
  faults: number;
  existing: number;
  /** Fills refused while an event of the process was unread (EAGAIN), each retry counted. */
  retried: number;
  /** Times a sweeper slept until the event thread had read such an event. */
  waited: number;
  /** munmap / madvise(DONTNEED) / mremap events of the process read while it was filled. */
  events: number;
  /** Compressed frames a fault decompressed and placed whole (the sweep then skips them). */
  faultFrames: number;
  threads: number;
  chunks: number;
  /** From CRIU's "restore finished" to the last page placed. */
  fillMs: number;
  totalMs: number;
}

export interface RunningFill {
  /** Resolves when every page is in; rejects with RESTORE_MEMORY_FILL (the filler's code in the evidence). */
  done: Promise<FillStats>;
  /** Kills the filler (after the tree, see the top of this file); idempotent. */
  stop(): void;
}

/**
 * Writes the checkpoint's plan beside its images (FILL_PLAN_IMAGE), after its zero pages were dropped. Returns the
 * reason when there is none (nothing is written; a restore of it uses CRIU's fill).
 */
export async function writeFillPlanImage(imagesDir: string, codec: CriuImageCodec): Promise<{ copyBytes: number; zeroBytes: number; plan: FillPlan } | { none: string }> {
  const plan = await buildFillPlan(imagesDir, codec);
  if ('none' in plan) return plan;
  await writeFile(join(imagesDir, FILL_PLAN_IMAGE), encodeFillPlan(plan, { relative: true }), { mode: 0o600, flag: 'wx' });
  return { copyBytes: plan.copyBytes, zeroBytes: plan.zeroBytes, plan };
}

/** What a restore fills from: the checkpoint's stored plan, or one made now (a checkpoint of an earlier thaw). */
export type FillSource = { planFile: string; imagesDir: string } | { plan: FillPlan };

/**
 * The fill source of a checkpoint's images: its stored plan when it has one (a stat), else one made from the images
 * (a reason when there is none).
 */
export async function fillSourceOf(imagesDir: string, codec: CriuImageCodec): Promise<FillSource | { none: string }> {
  const stored = join(imagesDir, FILL_PLAN_IMAGE);
  if (await stat(stored).then((s) => s.isFile(), () => false)) return { planFile: stored, imagesDir };
  const plan = await buildFillPlan(imagesDir, codec);
  return 'none' in plan ? plan : { plan };
}

export interface StartFillOptions {
  binary: string;
  /** CRIU's work directory: the filler binds lazy-pages.socket in it (and a plan made now is written there). */
  workDir: string;
  source: FillSource;
  threads: number;
  timeoutMs: number;
  /** Test seam: thaw-fill starts its sweep only once this path exists (page faults are served meanwhile). */
  holdSweepUntil?: string;
}

/** Writes the plan, starts thaw-fill and waits until its socket listens (CRIU must find it when it starts). */
export async function startMemoryFill(o: StartFillOptions): Promise<RunningFill> {
  const step = 'start the memory fill';
  let planArgs: string[];
  if ('plan' in o.source) {
    const planPath = join(o.workDir, FILL_PLAN_FILE);
    await writeFile(planPath, encodeFillPlan(o.source.plan), { mode: 0o600 });
    planArgs = ['--plan', planPath];
  } else {
    planArgs = ['--plan', o.source.planFile, '--images-dir', o.source.imagesDir];
  }
  const child: ChildProcess = spawn(o.binary, [...planArgs, '--threads', String(o.threads), '--timeout-ms', String(o.timeoutMs), ...(o.holdSweepUntil !== undefined ? ['--hold-sweep-until', o.holdSweepUntil] : [])], {
    cwd: o.workDir,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    if (stderr.length < 4096) stderr += d;
  });
  const lines = createInterface({ input: child.stdout! });
  let stopped = false;
  const stop = (): void => {
    if (stopped) return;
    stopped = true;
    child.kill('SIGKILL');
  };
  const failure = (message: string, evidence: Record<string, unknown>): RestoreError =>
    new RestoreError(RestoreErrorCode.MEMORY_FILL, message, { step: 'fill the restored memory', evidence: { ...evidence, ...(stderr !== '' ? { stderr } : {}) } });
  let ready!: () => void;
  let notReady!: (err: Error) => void;
  const readyP = new Promise<void>((res, rej) => ((ready = res), (notReady = rej)));
  const done = new Promise<FillStats>((resolve, reject) => {
    lines.on('line', (line) => {
      if (line === 'ready') return ready();
      if (line.startsWith('done ')) {
        try {
          return resolve(JSON.parse(line.slice(5)) as FillStats);
        } catch (err) {
          return reject(failure(`thaw-fill's account is not JSON: ${errorMessage(err)}`, { line }));
        }
      }
      const m = /^error (\S+) (.*)$/.exec(line);
      const err = failure(m ? `thaw-fill: ${m[1]}: ${m[2]}` : `thaw-fill said: ${line}`, m ? { fillCode: m[1] } : { line });
      notReady(err);
      reject(err);
    });
    child.on('error', (err) => {
      const e = failure(`cannot run ${o.binary}: ${err.message}`, { binary: o.binary });
      notReady(e);
      reject(e);
    });
    // 'close', not 'exit': 'exit' may come before the last lines of stdout were read, and a filler that said
    // `done` and exited 0 would read as one that ended early.
    child.on('close', (code, sig) => {
      const e = failure(`thaw-fill ended before the memory was in (${sig ?? `exit ${code}`})`, { exitCode: code, signal: sig });
      notReady(e);
      reject(e); // no effect after `done`
    });
  });
  done.catch(() => undefined); // the flow awaits it later; an early failure must not go unhandled meanwhile
  try {
    await readyP;
  } catch (err) {
    stop();
    throw err instanceof RestoreError ? err : new RestoreError(RestoreErrorCode.MEMORY_FILL, errorMessage(err), { step, cause: err });
  }
  return { done, stop };
}
