import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import type { PageCache } from '../../src/sys/page-cache.js';
import { prefetchFiles } from '../../src/sys/prefetch.js';

describe('prefetchFiles order', () => {
  let dir: string | undefined;
  afterEach(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('reads the small files first, then the ranges asked for first, then the large file in file order, advising it only then', async () => {
    dir = mkdtempSync(join(tmpdir(), 'thaw-prefetch-order-'));
    const sizes: Record<string, number> = { 'pages-1.img': 5 * 1024 * 1024, 'core-7.img': 3000, 'mm-7.img': 900, 'pagemap-7.img': 70_000 };
    for (const [name, size] of Object.entries(sizes)) writeFileSync(join(dir, name), Buffer.alloc(size, 1));
    const events: string[] = [];
    // Nothing cached: every file is read. The advice is recorded in the order the prefetch gives it.
    const pageCache: PageCache = {
      residentBytes: () => 0,
      adviseWillNeed: async (fd) => (events.push(`advise ${names.get(fd) ?? fd}`), 0),
      startWriteback: async () => 0,
    };
    const names = new Map<number, string>();
    const recordingOpen = async (path: string): Promise<FileHandle> => {
      const fh = await open(path, 'r');
      names.set(fh.fd, basename(path));
      const read = fh.read.bind(fh) as (...a: unknown[]) => Promise<{ bytesRead: number }>;
      (fh as unknown as { read: (...a: unknown[]) => Promise<{ bytesRead: number }> }).read = (...a: unknown[]) => {
        events.push(`read ${basename(path)} @${String(a[3])}`);
        return read(...a);
      };
      return fh;
    };
    const files = Object.entries(sizes).map(([name, size]) => ({ path: join(dir as string, name), size }));
    const result = await prefetchFiles(files, pageCache, { open: recordingOpen, step: 'test prefetch', concurrency: 1, segmentBytes: 2 * 1024 * 1024 });
    expect(result).toEqual({ bytes: 5 * 1024 * 1024 + 3000 + 900 + 70_000, bytesRead: 5 * 1024 * 1024 + 3000 + 900 + 70_000 });
    expect(events.filter((e) => e.startsWith('advise'))).toEqual(['advise mm-7.img', 'advise core-7.img', 'advise pagemap-7.img', 'advise pages-1.img']);
    const reads = events.filter((e) => e.startsWith('read'));
    expect(reads.slice(0, 3)).toEqual(['read mm-7.img @0', 'read core-7.img @0', 'read pagemap-7.img @0']);
    expect(reads.slice(3).map((e) => Number(e.split('@')[1]))).toEqual([...reads.slice(3)].map((e) => Number(e.split('@')[1])).sort((a, b) => a - b));
    expect(reads.slice(3).every((e) => e.startsWith('read pages-1.img'))).toBe(true);

    // The ranges a restore wants first: after the small files, before the large file is advised or read in
    // segments; a range of a file not prefetched is left out, and they are not counted as read twice.
    events.length = 0;
    const first = [
      { path: join(dir, 'pages-1.img'), start: 4 * 1024 * 1024, end: 4 * 1024 * 1024 + 8192 },
      { path: join(dir, 'pages-1.img'), start: 1024 * 1024, end: 1024 * 1024 + 4096 },
      { path: join(dir, 'pages-9.img'), start: 0, end: 4096 },
    ];
    const again = await prefetchFiles(files, pageCache, { open: recordingOpen, step: 'test prefetch', concurrency: 1, segmentBytes: 2 * 1024 * 1024, first });
    expect(again).toEqual(result);
    expect(events).toEqual([
      'advise mm-7.img', 'advise core-7.img', 'advise pagemap-7.img',
      'read mm-7.img @0', 'read core-7.img @0', 'read pagemap-7.img @0',
      'read pages-1.img @4194304', 'read pages-1.img @1048576',
      'advise pages-1.img',
      'read pages-1.img @0', 'read pages-1.img @2097152', 'read pages-1.img @4194304',
    ]);
  });
});
