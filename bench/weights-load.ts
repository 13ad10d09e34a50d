/**
 * npm run bench:weights — the weights service's load rate against what the machine reads the same files at,
 * in the same run: a parallel page-cache read (bench/read-rate.ts, as many readers as the load), then the
 * load (restore-engine/weights/loader.ts: reader threads, pinned buffers, copies to shareable GPU memory)
 * of the same files twice: not hashed on this node yet (one reader per file, sha256 inline with the copy) and
 * stamped (every reader on chunks of every file). Prints one JSON line.
 *
 * Without a GPU it runs on the fake driver (native/fake-libcuda: "GPU memory" is memfds, a copy is a
 * memcpy), so the figure is the host side's; THAW_LIBCUDA=/path/to/libcuda.so.1 measures a real GPU.
 * Env: BENCH_WEIGHTS_FILES (4), BENCH_WEIGHTS_MIB (256 per file), BENCH_WEIGHTS_READERS (8), BENCH_WEIGHTS_DIR
 * (files kept there between runs; default a temporary dir removed at the end).
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CudaVmm, loadCuda } from '../src/cuda/index.js';
import { loadWeights, SourceDigests } from '../src/restore-engine/index.js';
import { PACKAGE_ROOT } from '../src/node-stack/index.js';
import { parallelReadRate } from './read-rate.js';

const MiB = 1 << 20;
const GRANULE = 2 * MiB;

/** A file of `mib` MiB shaped like a safetensors file: an 8-byte header length, a header, the data. */
async function makeFile(path: string, mib: number): Promise<void> {
  const dataBytes = mib * MiB;
  const header = Buffer.from(JSON.stringify({ w: { dtype: 'U8', shape: [dataBytes], data_offsets: [0, dataBytes] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  const fh = await open(path, 'w');
  try {
    await fh.write(Buffer.concat([len, header]));
    const block = randomBytes(16 * MiB);
    for (let done = 0; done < dataBytes; done += block.length) await fh.write(block.subarray(0, Math.min(block.length, dataBytes - done)));
  } finally {
    await fh.close();
  }
}

async function main(): Promise<void> {
  const nFiles = Number(process.env['BENCH_WEIGHTS_FILES'] ?? 4);
  const mib = Number(process.env['BENCH_WEIGHTS_MIB'] ?? 256);
  const readers = Number(process.env['BENCH_WEIGHTS_READERS'] ?? 8);
  const libcuda = process.env['THAW_LIBCUDA'] ?? join(PACKAGE_ROOT, 'native/fake-libcuda/build/libcuda.so.1');
  if (!process.env['THAW_LIBCUDA'] && !existsSync(libcuda)) execFileSync('make', ['-s', '-C', join(PACKAGE_ROOT, 'native/fake-libcuda')]);
  const keep = process.env['BENCH_WEIGHTS_DIR'];
  const dir = keep ?? (await mkdtemp(join(tmpdir(), 'thaw-bench-weights-')));
  await mkdir(dir, { recursive: true });
  try {
    const files = Array.from({ length: nFiles }, (_, i) => join(dir, `model-${String(i + 1).padStart(5, '0')}.safetensors`));
    for (const f of files) if (!existsSync(f) || (await stat(f)).size < mib * MiB) await makeFile(f, mib);
    // The regions as a worker's weights file records them (the load reserves its own addresses; VA unused).
    let offset = 0;
    const allocations = [];
    for (const f of files) {
      const body = await readFile(f);
      const fileOffset = 8 + Number(body.readBigUInt64LE(0));
      const length = body.length - fileOffset;
      const size = Math.ceil(length / GRANULE) * GRANULE;
      allocations.push({ offset, size, kind: 'file' as const, source: { path: f, fileOffset, length, fileSize: body.length, sha256: createHash('sha256').update(body).digest('hex') } });
      offset += size;
    }
    const regions = [{ name: 'weights', device: 0, va: 0x7f0000000000n, size: offset, granularity: GRANULE, allocations }];
    const bytes = allocations.reduce((a, x) => a + x.source.length, 0);
    const vmm = new CudaVmm(loadCuda({ path: libcuda }));
    const openSource = (p: string) => open(p, 'r');
    const loadOnce = async (digests: SourceDigests): Promise<{ ms: number; copyMs: number }> => {
      const t0 = performance.now();
      const loaded = await loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests, readers });
      const ms = performance.now() - t0;
      loaded.release();
      return { ms, copyMs: loaded.copyMs };
    };
    await parallelReadRate(files, { readers }); // into the page cache
    const pageCache = await parallelReadRate(files, { readers });
    const digests = new SourceDigests();
    const inline = await loadOnce(digests);
    const stamped = await loadOnce(digests);
    const rate = (ms: number): number => Number((bytes / 1e6 / ms).toFixed(2));
    const result = {
      bench: 'weights-load',
      driver: process.env['THAW_LIBCUDA'] ? libcuda : 'fake (native/fake-libcuda)',
      files: nFiles,
      bytes,
      readers,
      pageCacheReadGBps: pageCache.gbPerS,
      // Whole load (allocations included: the fake's cuMemCreate fills its memfd, a real one is fast), and
      // the read/hash/copy phase alone.
      loadInlineHashGBps: rate(inline.ms),
      loadStampedGBps: rate(stamped.ms),
      copyInlineHashGBps: rate(inline.copyMs),
      copyStampedGBps: rate(stamped.copyMs),
      stampedCopyOverPageCache: Number((rate(stamped.copyMs) / pageCache.gbPerS).toFixed(2)),
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    if (!keep) await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:weights failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
