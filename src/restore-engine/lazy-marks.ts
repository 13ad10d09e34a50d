/**
 * PE_LAZY put back where CRIU's dump leaves it off by a slip. CRIU marks a present page of a mapping that can be
 * lazy (private anonymous, not locked, not the vDSO) PE_LAZY unless it is "the stack page" of a thread, and its test
 * (criu/mem.c is_stack, CRIU 4.1 and 4.2) masks the XOR of the thread's stack pointer and the page's address with
 * ~PAGE_MASK: it compares their offsets within a page, not their pages. The page's address has offset 0, so the
 * test holds for every page exactly when the stack pointer is page-aligned, and for none otherwise. A task one of
 * whose threads stopped with its stack pointer on a page boundary thus gets no lazy page at all (a main thread's
 * stack starts at a random 16-byte step: about one dump in 256), and in every other dump the stack page is lazy
 * like the rest. A restore of such a dump is correct, but CRIU then reads all of its memory itself: the slow fill
 * that thaw-fill replaces (memory-fill.ts).
 *
 * What CRIU writes without the slip, which every other dump already is: PE_LAZY on each present page of a mapping
 * that can be lazy (vmaCanBeLazy, CRIU's rule or stricter). Only a task with the slip's signature is rewritten: not
 * one PE_LAZY entry, and a thread whose stack pointer is page-aligned. Entries keep their order and sizes (split
 * where a mapping ends), so the pages file is untouched, and they keep PE_PRESENT, so a restore without lazy pages
 * reads the same bytes as before. Each rewritten pagemap replaces CRIU's by a rename: a failure leaves CRIU's.
 */
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CRIU_PAGE_BYTES, encodeImageFile, PagemapFlags, parseImageFile, type CriuImageCodec, type PagemapEntry } from './criu/images.js';
import { vmaCanBeLazy } from './memory-fill.js';

export interface LazyMarksResult {
  /** The tasks whose pagemap was rewritten. */
  tasks: number[];
  /** The pages marked lazy in them. */
  lazyPages: number;
}

interface Span {
  start: number;
  end: number;
}

/**
 * `entries` with PE_LAZY added to every present part inside one of the sorted, disjoint `lazy` spans (pure;
 * exported for tests). An entry that crosses a span's end is split there.
 */
export function markLazy(entries: readonly PagemapEntry[], lazy: readonly Span[]): { entries: PagemapEntry[]; lazyPages: number } {
  const out: PagemapEntry[] = [];
  let lazyPages = 0;
  const push = (like: PagemapEntry, start: number, end: number, isLazy: boolean): void => {
    const flags = isLazy ? (like.flags ?? PagemapFlags.PRESENT) | PagemapFlags.LAZY : like.flags;
    out.push({ vaddr: BigInt(start), nrPages: (end - start) / CRIU_PAGE_BYTES, ...(like.inParent !== undefined ? { inParent: like.inParent } : {}), ...(flags !== undefined ? { flags } : {}) });
    if (isLazy) lazyPages += (end - start) / CRIU_PAGE_BYTES;
  };
  for (const e of entries) {
    const start = Number(e.vaddr);
    const end = start + e.nrPages * CRIU_PAGE_BYTES;
    let at = start;
    for (const s of lazy) {
      if (s.end <= at) continue;
      if (s.start >= end) break;
      if (s.start > at) push(e, at, s.start, false);
      const to = Math.min(s.end, end);
      push(e, Math.max(s.start, at), to, true);
      at = to;
    }
    if (at < end) push(e, at, end, false);
  }
  return { entries: out, lazyPages };
}

/** Puts PE_LAZY back in the pagemaps of `dir` where CRIU's is_stack slip left a task without it (module comment). */
export async function restoreLazyMarks(dir: string, codec: CriuImageCodec): Promise<LazyMarksResult> {
  const result: LazyMarksResult = { tasks: [], lazyPages: 0 };
  const pstree = parseImageFile(await readFile(join(dir, 'pstree.img')), 'pstree.img').entries.map((e) => codec.decodePstree(e));
  for (const p of pstree) {
    const threads = p.threads !== undefined && p.threads.length > 0 ? p.threads : [p.pid];
    const sps = await Promise.all(threads.map(async (tid) => parseImageFile(await readFile(join(dir, `core-${tid}.img`)), `core-${tid}.img`).entries.map((e) => codec.decodeStackPointer(e))[0]));
    if (!sps.some((sp) => sp !== undefined && sp % BigInt(CRIU_PAGE_BYTES) === 0n)) continue;
    const name = `pagemap-${p.pid}.img`;
    const image = parseImageFile(await readFile(join(dir, name)), name);
    const [head, ...rest] = image.entries;
    if (head === undefined) continue;
    const entries = rest.map((raw) => codec.decodePagemapEntry(raw));
    const flagsOf = (e: PagemapEntry): number => e.flags ?? PagemapFlags.PRESENT;
    // Not the slip's signature (some page is lazy), or pages that are not in this pages file (pre-dump chains).
    if (entries.some((e) => (flagsOf(e) & PagemapFlags.LAZY) !== 0)) continue;
    if (entries.some((e) => e.inParent === true || (flagsOf(e) & PagemapFlags.PARENT) !== 0 || (flagsOf(e) & PagemapFlags.PRESENT) === 0)) continue;
    const mm = parseImageFile(await readFile(join(dir, `mm-${p.pid}.img`)), `mm-${p.pid}.img`);
    const vmas = mm.entries[0] !== undefined ? codec.decodeVmas(mm.entries[0]) : [];
    const lazy = vmas.filter(vmaCanBeLazy).map((v) => ({ start: Number(v.start), end: Number(v.end) })).sort((a, b) => a.start - b.start);
    const marked = markLazy(entries, lazy);
    if (marked.lazyPages === 0) continue;
    const file = join(dir, name);
    const tmp = `${file}.thaw-lazy`;
    try {
      await writeFile(tmp, encodeImageFile({ header: image.header, entries: [head, ...marked.entries.map((e) => codec.encodePagemapEntry(e))] }), { mode: 0o600, flag: 'wx' });
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    result.tasks.push(p.pid);
    result.lazyPages += marked.lazyPages;
  }
  return result;
}
