/**
 * The memory fill through userfaultfd (src/restore-engine/memory-fill.ts, native/thaw-fill.c) against the real CRIU
 * of thaw's node stack and this kernel's userfaultfd: a Python process holding a known pattern (and a region of
 * zero pages the checkpoint drops) is dumped, restored with lazy pages while thaw-fill places its memory, and checks
 * every page itself. The process's reads, its madvise(DONTNEED) and a fork are driven while the fill is known to be
 * unfinished: thaw-fill's sweep is held (its --hold-sweep-until seam) until the process has acted, so every page it
 * touches comes through a fault and every call of it through an event.
 *
 * Runs as root; the stack's CRIU and native/build/thaw-fill must exist (their absence fails).
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import { createCollectingLogger } from '../../src/log.js';
import { CriuClient } from '../../src/restore-engine/criu/client.js';
import { CriuImageCodec, decodePagemapEntryRaw, PagemapFlags, parseImageFile } from '../../src/restore-engine/criu/images.js';
import { nativeDepsPaths } from '../../src/node-stack/native-deps.js';
import { COMPRESSED_PAGES_IMAGE, compressLazyPages, hasCompressedPages } from '../../src/restore-engine/compressed-pages.js';
import { restoreLazyMarks } from '../../src/restore-engine/lazy-marks.js';
import { buildFillPlan, criuPageReads, FILL_PLAN_IMAGE, startMemoryFill, writeFillPlanImage, type FillPlan, type FillStats, type RunningFill } from '../../src/restore-engine/memory-fill.js';
import { RestoreErrorCode } from '../../src/restore-engine/restore-errors.js';
import { dropZeroPages, ZERO_PAGES_FILE } from '../../src/restore-engine/zero-pages.js';

/** Both stacks' CRIU: 1.7's is 4.1.1, 2.1's is 4.2.1 (whose pagemap entries carry their count in another field). */
const CRIUS = { '1.7': '/opt/thaw/stack/1.7/bin/criu', '2.1': '/opt/thaw/stack/2.1/bin/criu' } as const;
const FILL = resolve(dirname(fileURLToPath(import.meta.url)), '../../native/build/thaw-fill');
const PACK = resolve(dirname(fileURLToPath(import.meta.url)), '../../native/build/thaw-pack');
/** Debian's zstd (scripts/setup.sh provisions it with the static library thaw-pack links). */
const ZSTD = nativeDepsPaths().zstd;
const root = mkdtempSync('/tmp/thaw-fill-');
const codec = CriuImageCodec.load();
const clientFor = (criuPath: string): CriuClient =>
  new CriuClient({ criuPath, logger: createCollectingLogger(), env: { ...process.env, PATH: `${dirname(criuPath)}:${process.env.PATH ?? '/usr/bin:/bin'}` } });
const started = new Set<number>();
const fills: RunningFill[] = [];

/** Pages of the pattern region and of the zero region (written, then zeroed: the checkpoint drops them). */
const PATTERN_PAGES = 24 * 1024; // 96 MiB
const ZERO_PAGES = 8 * 1024; // 32 MiB
const DROPPED = [1000, 1400]; // the pages the process madvise(DONTNEED)s after the restore

/**
 * The victim: a page i of the pattern region holds (i, i * 2654435761 mod 2^64) in its first 16 bytes, zeros
 * after. It says `ready`, then blocks on its FIFO; the word it reads is the scenario, after which it checks every
 * page and writes `ok` or the first bad page to its result file.
 */
const VICTIM = String.raw`
import mmap, os, struct, sys, threading, time
P, Z, D0, D1 = (int(x) for x in sys.argv[3:7])
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
a = mmap.mmap(-1, P * 4096, flags=flags)
for i in range(P):
    a[i * 4096:i * 4096 + 16] = struct.pack('<QQ', i, (i * 2654435761) % (1 << 64))
z = mmap.mmap(-1, Z * 4096, flags=flags)
for i in range(Z):
    z[i * 4096] = 1
    z[i * 4096] = 0
# Scratch pages the churn scenario drops over and over (each drop an event the filler must read).
s = mmap.mmap(-1, 64 * 4096, flags=flags)
for i in range(64):
    s[i * 4096] = 1
def churn():
    while True:
        s.madvise(mmap.MADV_DONTNEED, 0, 64 * 4096)
        time.sleep(0)
open(sys.argv[1] + '.ready', 'w').close()
dropped = False
zero = bytes(4096)
for n in range(1, 100):
    word = open(sys.argv[2]).read().strip()
    if word == 'dontneed':
        a.madvise(mmap.MADV_DONTNEED, D0 * 4096, (D1 - D0) * 4096)
        dropped = True
    elif word == 'churn':
        threading.Thread(target=churn, daemon=True).start()
    elif word == 'fork':
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    bad = None
    for i in range(P):
        page = a[i * 4096:(i + 1) * 4096]
        want = zero if (dropped and D0 <= i < D1) else struct.pack('<QQ', i, (i * 2654435761) % (1 << 64)) + bytes(4080)
        if page != want:
            bad = 'pattern page %d' % i
            break
    if bad is None:
        for i in range(Z):
            if z[i * 4096:(i + 1) * 4096] != zero:
                bad = 'zero page %d' % i
                break
    with open('%s.%d.tmp' % (sys.argv[1], n), 'w') as f:
        f.write(bad or 'ok')
    os.rename('%s.%d.tmp' % (sys.argv[1], n), '%s.%d' % (sys.argv[1], n))
`;

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

interface Dumped {
  dir: string;
  imagesDir: string;
  workDir: string;
  result: string;
  fifo: string;
}

/** The pages of `imagesDir`'s pagemaps marked PE_LAZY. */
function lazyPagesOf(imagesDir: string): number {
  let pages = 0;
  for (const name of readdirSync(imagesDir).filter((n) => /^pagemap-\d+\.img$/.test(n))) {
    const [, ...entries] = parseImageFile(readFileSync(join(imagesDir, name)), name).entries;
    for (const raw of entries) {
      const e = decodePagemapEntryRaw(raw, name);
      if (((e.flags ?? PagemapFlags.PRESENT) & PagemapFlags.LAZY) !== 0) pages += e.nrPages;
    }
  }
  return pages;
}

/** A dump's directories under the test root: its own, the images' and CRIU's work directory. */
function dumpDirs(name: string): { dir: string; imagesDir: string; workDir: string } {
  const dir = join(root, name);
  const imagesDir = join(dir, 'images');
  const workDir = join(dir, 'work');
  mkdirSync(imagesDir, { recursive: true });
  mkdirSync(workDir, { recursive: true });
  return { dir, imagesDir, workDir };
}

/**
 * Starts the victim, dumps it (it stops), drops its zero pages and puts back the lazy marks CRIU's stack-pointer slip
 * leaves off (lazy-marks.ts), as a checkpoint does: the pattern region's pages are then lazy in every dump.
 */
async function dumpVictimWith(client: CriuClient, name: string): Promise<Dumped> {
  const { dir, imagesDir, workDir } = dumpDirs(name);
  const script = join(dir, 'victim.py');
  writeFileSync(script, VICTIM);
  const result = join(dir, 'result');
  const fifo = join(dir, 'go.fifo');
  execFileSync('mkfifo', [fifo]);
  const out = openSync(join(dir, 'victim.out'), 'a');
  const child = spawn('/usr/bin/python3', [script, result, fifo, String(PATTERN_PAGES), String(ZERO_PAGES), String(DROPPED[0]), String(DROPPED[1])], { detached: true, stdio: ['ignore', out, out] });
  closeSync(out);
  child.unref();
  started.add(child.pid!);
  await waitFor(() => existsSync(`${result}.ready`), 60_000, 'the victim to write its pages');
  // Blocked in open() of its FIFO (no writer yet): a syscall CRIU restarts after the restore.
  await client.dump({ imagesDir, workDir, pid: child.pid! });
  await waitFor(() => !existsSync(`/proc/${child.pid}`), 5_000, 'the dumped victim to be gone');
  const z = await dropZeroPages(imagesDir, { codec });
  expect(z.droppedBytes, 'the zero region is left out of the images').toBeGreaterThanOrEqual(ZERO_PAGES * 4096);
  await restoreLazyMarks(imagesDir, codec);
  expect(lazyPagesOf(imagesDir), pagemapSummary(imagesDir)).toBeGreaterThanOrEqual(PATTERN_PAGES);
  return { dir, imagesDir, workDir, result, fifo };
}

/** test/fixtures/aligned-stack-victim.c, built in beforeAll: PAGES pages of a pattern, parked with a chosen stack pointer. */
const ALIGNED_VICTIM_SRC = resolve(dirname(fileURLToPath(import.meta.url)), '../fixtures/aligned-stack-victim.c');
const ALIGNED_VICTIM = join(root, 'aligned-stack-victim');
const ALIGNED_VICTIM_PAGES = 4096;
/** Reads page i of the region at argv[2] through /proc/<pid>/mem and checks its first u64 (the victim's pattern). */
const CHECK_ALIGNED_VICTIM = String.raw`
import struct, sys
f = open(sys.argv[1], 'rb', buffering=0)
base, n = int(sys.argv[2], 16), int(sys.argv[3])
for i in range(n):
    f.seek(base + i * 4096)
    if struct.unpack('<Q', f.read(8))[0] != (i * 2654435761 + 7) % (1 << 64):
        print('bad page %d' % i)
        sys.exit(1)
print('ok')
`;

/** Starts the C victim (its stack pointer page-aligned or not), dumps it, drops its zero pages as a checkpoint does. */
async function dumpAlignedVictim(client: CriuClient, name: string, aligned: boolean): Promise<Dumped & { region: string }> {
  const { dir, imagesDir, workDir } = dumpDirs(name);
  const ready = join(dir, 'ready');
  const child = spawn(ALIGNED_VICTIM, [ready, aligned ? '1' : '0'], { detached: true, stdio: 'ignore' });
  child.unref();
  started.add(child.pid!);
  await waitFor(() => existsSync(ready), 30_000, 'the C victim to write its pages');
  const region = readFileSync(ready, 'utf8').trim();
  await sleep(50); // past the write of the file: parked in pause()
  await client.dump({ imagesDir, workDir, pid: child.pid! });
  await waitFor(() => !existsSync(`/proc/${child.pid}`), 5_000, 'the dumped C victim to be gone');
  await dropZeroPages(imagesDir, { codec });
  return { dir, imagesDir, workDir, result: join(dir, 'result'), fifo: '', region };
}

/** The stack pointers of every thread of `imagesDir`'s tasks, from their core images. */
function stackPointersOf(imagesDir: string): bigint[] {
  return readdirSync(imagesDir)
    .filter((n) => /^core-\d+\.img$/.test(n))
    .map((n) => codec.decodeStackPointer(parseImageFile(readFileSync(join(imagesDir, n)), n).entries[0]!))
    .filter((sp): sp is bigint => sp !== undefined);
}

/** Per pagemap of `imagesDir`: its entries counted by flags, and the pages of each (for a failure's message). */
function pagemapSummary(imagesDir: string): string {
  const out: string[] = [];
  for (const name of readdirSync(imagesDir).filter((n) => /^pagemap-\d+\.img$/.test(n))) {
    const [, ...entries] = parseImageFile(readFileSync(join(imagesDir, name)), name).entries;
    const byFlags = new Map<number, { entries: number; pages: number }>();
    for (const raw of entries) {
      const e = decodePagemapEntryRaw(raw, name);
      const k = byFlags.get(e.flags ?? -1) ?? { entries: 0, pages: 0 };
      k.entries += 1;
      k.pages += e.nrPages;
      byFlags.set(e.flags ?? -1, k);
    }
    out.push(`${name}: ${[...byFlags].map(([f, k]) => `flags ${f}: ${k.entries} entries, ${k.pages} pages`).join('; ')}`);
  }
  return out.join('\n');
}

async function planOf(d: Dumped): Promise<FillPlan> {
  const plan = await buildFillPlan(d.imagesDir, codec);
  if ('none' in plan) throw new Error(`no fill plan: ${plan.none}`);
  return plan;
}

/** Restores `d` lazily with thaw-fill's sweep held until release() (page faults are served from the start). */
async function restoreLazilyWith(client: CriuClient, d: Dumped, plan: FillPlan, threads: number, stored = false): Promise<{ fill: RunningFill; pid: number; fillPid: number; release(): void }> {
  const hold = join(d.dir, 'sweep');
  const fill = await startMemoryFill({ binary: FILL, workDir: d.workDir, source: stored ? { planFile: join(d.imagesDir, FILL_PLAN_IMAGE), imagesDir: d.imagesDir } : { plan }, threads, timeoutMs: 60_000, holdSweepUntil: hold });
  fills.push(fill);
  const fillPid = Number(execFileSync('pgrep', ['-n', '-f', `thaw-fill --plan ${stored ? join(d.imagesDir, FILL_PLAN_IMAGE) : join(d.workDir, 'fill-plan.txt')}`], { encoding: 'utf8' }).trim());
  const res = await client.restore({ imagesDir: d.imagesDir, workDir: d.workDir, lazyPages: true });
  started.add(res.pid);
  return { fill, pid: res.pid, fillPid, release: () => writeFileSync(hold, '') };
}

/**
 * The victim runs `scenario` and checks every page while the sweep is held (faults only), then checks again once
 * the fill is done; the fill's account.
 */
async function checkBeforeAndAfterSweep(d: Dumped, fill: RunningFill, release: () => void, scenario = 'check'): Promise<FillStats> {
  trigger(d.fifo, scenario);
  await waitFor(() => existsSync(`${d.result}.1`), 60_000, 'the victim\'s check');
  expect(readFileSync(`${d.result}.1`, 'utf8')).toBe('ok');
  release();
  const stats = await fill.done;
  trigger(d.fifo, 'check');
  await waitFor(() => existsSync(`${d.result}.2`), 60_000, 'the victim\'s check after the fill');
  expect(readFileSync(`${d.result}.2`, 'utf8')).toBe('ok');
  return stats;
}

/** Writes the scenario word into the FIFO from a child (the open blocks until the victim opens it). */
function trigger(fifo: string, word: string): void {
  spawn('/bin/sh', ['-c', `printf '%s\\n' "$1" > "$2"`, 'sh', word, fifo], { stdio: 'ignore' }).unref();
}

beforeAll(() => {
  for (const p of Object.values(CRIUS)) if (!existsSync(p)) throw new Error(`CRIU not found at ${p}: provision thaw's node stacks first`);
  for (const bin of [FILL, PACK]) if (!existsSync(bin)) throw new Error(`${bin} is not built: make -C native`);
  if (!existsSync(ZSTD)) throw new Error(`${ZSTD} is missing: bash scripts/setup.sh provisions it`);
  if (process.getuid?.() !== 0) throw new Error('the memory-fill tests must run as root');
  execFileSync('cc', ['-O2', '-Wall', '-o', ALIGNED_VICTIM, ALIGNED_VICTIM_SRC]);
});
afterAll(() => {
  for (const f of fills) f.stop();
  for (const pid of started) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  if (process.env.THAW_TEST_KEEP === undefined) rmSync(root, { recursive: true, force: true });
});

describe.each(Object.entries(CRIUS))('thaw-fill: a lazy CRIU restore whose memory a filler places (the %s stack\'s CRIU)', (flavor, criuPath) => {
  const client = clientFor(criuPath);
  const dumpVictim = (name: string): Promise<Dumped> => dumpVictimWith(client, `${flavor}-${name}`);
  const restoreLazily = (d: Dumped, plan: FillPlan, threads: number, stored = false) => restoreLazilyWith(client, d, plan, threads, stored);

  it('the plan: the lazy pages from the pages file, and the dropped zero pages as zero ranges', async () => {
    const d = await dumpVictim('plan');
    const plan = await planOf(d);
    expect(existsSync(join(d.imagesDir, ZERO_PAGES_FILE))).toBe(true);
    expect(plan.copyBytes).toBeGreaterThanOrEqual(PATTERN_PAGES * 4096);
    expect(plan.zeroBytes).toBeGreaterThanOrEqual(ZERO_PAGES * 4096);
    const t = plan.tasks[0]!;
    expect(t.pagesFile).toMatch(/pages-\d+\.img$/);
    // Sorted, page-aligned, disjoint, and no zero range over a copied page.
    const spans = [...t.copies.map((c) => ({ s: c.addr, e: c.addr + c.pages * 4096 })), ...t.zeros.map((z) => ({ s: z.addr, e: z.addr + z.pages * 4096 }))].sort((x, y) => (x.s < y.s ? -1 : 1));
    for (let i = 1; i < spans.length; i++) expect(spans[i]!.s >= spans[i - 1]!.e).toBe(true);
    // What CRIU reads itself (the prefetch's first ranges) and what the fill copies are the pages file, once.
    const reads = await criuPageReads(d.imagesDir, codec);
    expect(reads.length).toBeGreaterThan(0);
    const pagesBytes = statSync(t.pagesFile!).size;
    expect(reads.every((r) => r.path === t.pagesFile && r.start < r.end && r.end <= pagesBytes)).toBe(true);
    expect(reads.reduce((n, r) => n + r.end - r.start, 0) + plan.copyBytes).toBe(pagesBytes);
  });

  it('every page comes back exact while the process reads them (faults served beside the sweep)', async () => {
    const d = await dumpVictim('exact');
    const { fill, pid, release } = await restoreLazily(d, await planOf(d), 2);
    const stats = await checkBeforeAndAfterSweep(d, fill, release);
    expect(stats.copiedBytes).toBeGreaterThanOrEqual(PATTERN_PAGES * 4096 - DROPPED.length * 4096);
    expect(stats.zeroedBytes).toBeGreaterThanOrEqual(ZERO_PAGES * 4096);
    // Each fault places a window of 32 pages: the victim's reads of 96 MiB took at least that many.
    expect(stats.faults, 'the victim read its pages before the sweep').toBeGreaterThanOrEqual(PATTERN_PAGES / 32);
    expect(stats.existing, 'the sweep found the faulted pages there and left them').toBeGreaterThanOrEqual(1);
    expect(existsSync(`/proc/${pid}`)).toBe(true);
  });

  it('a process that drops pages over and over while it is filled (an event each): every page comes back exact', async () => {
    // Each drop blocks its thread until the filler has read the event, and refuses every fill meanwhile
    // (EAGAIN): faults are retried after the events, sweepers wait for them (native/thaw-fill.c, EVENT_WAIT_NS).
    const d = await dumpVictim('churn');
    const { fill, release } = await restoreLazily(d, await planOf(d), 4);
    const stats = await checkBeforeAndAfterSweep(d, fill, release, 'churn');
    expect(stats.events, JSON.stringify(stats)).toBeGreaterThanOrEqual(10);
    expect(stats.copiedBytes).toBeGreaterThanOrEqual(PATTERN_PAGES * 4096 - DROPPED.length * 4096);
  });

  it('a read of a page not placed yet from outside the process (/proc/<pid>/mem) fails at once, and succeeds once it is placed', async () => {
    // What the fake libcuda's token reads and writes meet (native/fake-libcuda/fake-common.h retries them): the
    // kernel cannot wait on the uffd for another process's access, where the process's own access would wait.
    const d = await dumpVictim('remote');
    const plan = await planOf(d);
    const { fill, pid, release } = await restoreLazily(d, plan, 2);
    const widest = [...plan.tasks[0]!.copies].sort((a, b) => b.pages - a.pages)[0]!;
    const addr = widest.addr + Math.floor(widest.pages / 2) * 4096;
    const readPage = (): { status: number | null; out: string } => {
      const r = spawnSync('/usr/bin/python3', ['-c', 'import os,sys\nfd=os.open(sys.argv[1], os.O_RDONLY)\ntry:\n  print(len(os.pread(fd, 4096, int(sys.argv[2]))))\nexcept OSError as e:\n  print("errno", e.errno); sys.exit(3)', `/proc/${pid}/mem`, String(addr)], { encoding: 'utf8', timeout: 20_000 });
      return { status: r.status, out: r.stdout.trim() };
    };
    const before = readPage();
    expect(before.status, `a read before the page is placed: ${before.out}`).toBe(3);
    expect(before.out).toMatch(/^errno (5|14)$/); // EIO or EFAULT, not a wait
    release();
    await fill.done;
    expect(readPage()).toEqual({ status: 0, out: '4096' });
  });

  it('pages the process drops (madvise DONTNEED) while they are missing stay dropped (the plan stored with the images)', async () => {
    const d = await dumpVictim('dontneed');
    // The plan a checkpoint stores beside its images (pages files by name, opened in --images-dir).
    expect(await writeFillPlanImage(d.imagesDir, codec)).toMatchObject({ copyBytes: expect.any(Number) });
    // A plan without a pages file would be a dump without a PE_LAZY entry; the pagemap's flags in the message say
    // whose they were (CRIU's, or thaw's rewrites).
    expect(readFileSync(join(d.imagesDir, FILL_PLAN_IMAGE), 'utf8'), pagemapSummary(d.imagesDir)).toMatch(/^thaw-fill-plan 1\ntask \d+ pages-\d+\.img\n/);
    const { fill, release } = await restoreLazily(d, await planOf(d), 2, true);
    // The sweep after the drop must not bring the dropped pages back: the victim checks them again after it.
    await checkBeforeAndAfterSweep(d, fill, release, 'dontneed');
  });

  it('a thread stopped with its stack pointer on a page boundary: CRIU marks no page lazy, thaw puts the marks back, and the fill places every page', async () => {
    const aligned = await dumpAlignedVictim(client, `${flavor}-aligned`, true);
    expect(stackPointersOf(aligned.imagesDir).some((sp) => sp % 4096n === 0n)).toBe(true);
    expect(lazyPagesOf(aligned.imagesDir), 'CRIU\'s is_stack slip: no page of the dump lazy').toBe(0);
    // The same process 16 bytes off the boundary: CRIU marks its pages, and thaw leaves the dump as it is.
    const control = await dumpAlignedVictim(client, `${flavor}-unaligned`, false);
    expect(stackPointersOf(control.imagesDir).every((sp) => sp % 4096n !== 0n)).toBe(true);
    expect(lazyPagesOf(control.imagesDir)).toBeGreaterThanOrEqual(ALIGNED_VICTIM_PAGES);
    expect(await restoreLazyMarks(control.imagesDir, codec)).toEqual({ tasks: [], lazyPages: 0 });

    const marked = await restoreLazyMarks(aligned.imagesDir, codec);
    expect(marked.tasks).toHaveLength(1);
    expect(marked.lazyPages).toBeGreaterThanOrEqual(ALIGNED_VICTIM_PAGES);
    const plan = await planOf(aligned);
    expect(plan.copyBytes).toBeGreaterThanOrEqual(ALIGNED_VICTIM_PAGES * 4096);
    const { fill, pid, release } = await restoreLazilyWith(client, aligned, plan, 2);
    release();
    const stats = await fill.done;
    expect(stats.copiedBytes).toBeGreaterThanOrEqual(ALIGNED_VICTIM_PAGES * 4096);
    const check = spawnSync('/usr/bin/python3', ['-c', CHECK_ALIGNED_VICTIM, `/proc/${pid}/mem`, aligned.region, String(ALIGNED_VICTIM_PAGES)], { encoding: 'utf8', timeout: 30_000 });
    expect(check.stdout.trim(), check.stderr).toBe('ok');
    expect(existsSync(`/proc/${pid}`), 'the restored victim is still parked').toBe(true);
    process.kill(pid, 'SIGKILL');
  });

  it('compressed pages: the lazy pages leave the pages file for zstd frames (Debian\'s zstd reads them back), and the fill places every page from them', async () => {
    const d = await dumpVictim('zstd');
    await writeFillPlanImage(d.imagesDir, codec);
    const plain = await planOf(d);
    const t = plain.tasks[0]!;
    const original = readFileSync(t.pagesFile!);
    const lazy = Buffer.concat(t.copies.map((c) => original.subarray(c.offset, c.offset + c.pages * 4096)));
    expect(await hasCompressedPages(d.imagesDir)).toBe(false);
    const packed = await compressLazyPages(d.imagesDir, { binary: PACK, threads: 2, level: 1, codec });
    if ('none' in packed) throw new Error(`not compressed: ${packed.none}`);
    expect(packed).toMatchObject({ inBytes: plain.copyBytes, tasks: [t.pid] });
    expect(packed.frames).toBeGreaterThanOrEqual(PATTERN_PAGES / 256);
    // 16 bytes of pattern per page, zeros after: the frames are a small fraction of the pages.
    expect(packed.outBytes).toBeLessThan(packed.inBytes / 10);
    const zpages = join(d.imagesDir, COMPRESSED_PAGES_IMAGE);
    expect(statSync(zpages).size).toBe(packed.outBytes);
    // A peer's reading of the frames: one zstd stream whose content is the lazy pages in plan order.
    expect(execFileSync(ZSTD, ['-dc', zpages], { maxBuffer: 512 * 1024 * 1024 }).equals(lazy)).toBe(true);
    // What is left for CRIU: the pages file without the lazy bytes, the pagemap without a lazy entry.
    expect(statSync(t.pagesFile!).size).toBe(original.length - plain.copyBytes);
    expect(lazyPagesOf(d.imagesDir)).toBe(0);
    expect(await hasCompressedPages(d.imagesDir)).toBe(true);
    expect(readFileSync(join(d.imagesDir, FILL_PLAN_IMAGE), 'utf8')).toMatch(/^thaw-fill-plan 2\nzpages thaw-pages\.zst\ntask \d+ -\nx [0-9a-f]+ \d+ 0 \d+\n/);
    expect(await compressLazyPages(d.imagesDir, { binary: PACK, threads: 2, level: 1, codec })).toEqual({ none: 'the pages are compressed already' });

    // Faults first (from the frames), then the sweep: the victim reads every page right both times.
    const { fill, pid, release } = await restoreLazily(d, plain, 2, true);
    const stats = await checkBeforeAndAfterSweep(d, fill, release);
    expect(stats.copiedBytes).toBeGreaterThanOrEqual(PATTERN_PAGES * 4096 - 2 * 256 * 4096);
    expect(stats.faults, 'the victim read its pages before the sweep').toBeGreaterThanOrEqual(PATTERN_PAGES / 256);
    // A frame is decompressed whole for its first fault and placed whole: one fault per frame, not one per
    // 32-page window (the zero ranges still fault a window at a time), and the sweep skips those frames.
    expect(stats.faultFrames, JSON.stringify(stats)).toBeGreaterThanOrEqual(PATTERN_PAGES / 256 - 2);
    expect(stats.faults, JSON.stringify(stats)).toBeLessThanOrEqual(stats.faultFrames + ZERO_PAGES / 32 + 16);
    expect(existsSync(`/proc/${pid}`)).toBe(true);
  });

  it('a compressed frame that does not decompress to its pages (one byte flipped): RESTORE_MEMORY_FILL (FRAME), and the filler holds the process', async () => {
    const d = await dumpVictim('zstd-bad');
    await writeFillPlanImage(d.imagesDir, codec);
    const packed = await compressLazyPages(d.imagesDir, { binary: PACK, threads: 2, level: 1, codec });
    if ('none' in packed) throw new Error(`not compressed: ${packed.none}`);
    const zpages = join(d.imagesDir, COMPRESSED_PAGES_IMAGE);
    const bytes = readFileSync(zpages);
    const at = Math.floor(bytes.length / 2);
    bytes[at] = bytes[at]! ^ 0x5a;
    writeFileSync(zpages, bytes);
    const { fill, pid, fillPid, release } = await restoreLazily(d, await planOf(d), 2, true);
    release();
    const err = await fill.done.then(() => undefined, (e: unknown) => e);
    expect(isThawError(err, RestoreErrorCode.MEMORY_FILL), String(err)).toBe(true);
    expect((err as { evidence?: { fillCode?: string } }).evidence?.fillCode).toBe('FRAME');
    // The pages of that frame are not there, and no zeros stand in for them: the filler keeps the uffd open.
    expect(existsSync(`/proc/${fillPid}`), 'the filler keeps its uffds open after an error').toBe(true);
    process.kill(pid, 'SIGKILL');
    fill.stop();
  });

  it('a fork while the memory is being filled is refused: RESTORE_MEMORY_FILL (FORK), and the filler holds the process', async () => {
    const d = await dumpVictim('fork');
    const { fill, pid, fillPid } = await restoreLazily(d, await planOf(d), 1);
    trigger(d.fifo, 'fork');
    const err = await fill.done.then(() => undefined, (e: unknown) => e);
    expect(isThawError(err, RestoreErrorCode.MEMORY_FILL)).toBe(true);
    expect((err as { evidence?: { fillCode?: string } }).evidence?.fillCode).toBe('FORK');
    // Neither finished nor running on zeros: the process waits (it never wrote a result) until it is killed.
    await sleep(300);
    expect(existsSync(`${d.result}.1`)).toBe(false);
    expect(existsSync(`/proc/${fillPid}`), 'the filler keeps its uffds open after an error').toBe(true);
    process.kill(pid, 'SIGKILL');
    fill.stop();
  });
});
