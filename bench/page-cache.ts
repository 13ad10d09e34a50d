import { execFileSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';

/** Drops the page cache (clean pages only; dirty ones are written first). Needs root. Shared by the benchmarks. */
export async function dropPageCache(): Promise<void> {
  execFileSync('sync');
  await writeFile('/proc/sys/vm/drop_caches', '3\n');
}
