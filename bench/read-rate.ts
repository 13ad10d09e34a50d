/**
 * The rate a node reads files at with several readers in parallel (one shared queue of chunks over all the
 * files, each reader with its own buffer): the reference a weights load is set against in the same run
 * (bench:gpu, bench:weights). Warm: the files in the page cache; cold: after dropping it (page-cache.ts).
 */
import { open, stat, type FileHandle } from 'node:fs/promises';

export interface ReadRate {
  bytes: number;
  ms: number;
  /** Decimal GB per second. */
  gbPerS: number;
  readers: number;
}

export async function parallelReadRate(files: readonly string[], options: { readers?: number; chunkBytes?: number } = {}): Promise<ReadRate> {
  const readers = Math.max(1, options.readers ?? 8);
  const chunk = Math.max(1 << 20, options.chunkBytes ?? 16 << 20);
  const handles: FileHandle[] = [];
  try {
    const jobs: Array<{ fh: FileHandle; at: number; n: number }> = [];
    let bytes = 0;
    for (const f of files) {
      const size = (await stat(f)).size;
      const fh = await open(f, 'r');
      handles.push(fh);
      for (let at = 0; at < size; at += chunk) jobs.push({ fh, at, n: Math.min(chunk, size - at) });
      bytes += size;
    }
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: Math.min(readers, Math.max(1, jobs.length)) }, async () => {
        const buf = Buffer.allocUnsafe(chunk);
        for (let job = jobs[next++]; job !== undefined; job = jobs[next++]) {
          let got = 0;
          while (got < job.n) {
            const { bytesRead } = await job.fh.read(buf, 0, job.n - got, job.at + got);
            if (bytesRead === 0) break;
            got += bytesRead;
          }
        }
      }),
    );
    const ms = performance.now() - t0;
    return { bytes, ms: Math.round(ms), gbPerS: ms > 0 ? Number((bytes / 1e6 / ms).toFixed(2)) : 0, readers };
  } finally {
    await Promise.all(handles.map((h) => h.close().catch(() => undefined)));
  }
}
