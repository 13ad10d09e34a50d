/**
 * startMemoryFill's reading of thaw-fill's stdout (src/restore-engine/memory-fill.ts), with a stand-in filler (a
 * shell script) in place of native/build/thaw-fill: its account is the last line it writes before it exits 0, so
 * the fill is over only once that line was read, whichever of the process's exit and its stdout's end Node reports
 * first. test/integration/memory-fill.test.ts runs the real filler on a real CRIU restore.
 */
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startMemoryFill } from '../../src/restore-engine/memory-fill.js';

const dir = mkdtempSync(join(tmpdir(), 'thaw-fill-start-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const ACCOUNT = { copiedBytes: 4096, zeroedBytes: 0, faults: 1, existing: 0, retried: 0, waited: 0, events: 0, faultFrames: 0, threads: 1, chunks: 1, fillMs: 1, totalMs: 2 };

function standIn(name: string, body: string): string {
  const path = join(dir, name);
  writeFileSync(path, `#!/bin/sh\n${body}\n`);
  chmodSync(path, 0o755);
  return path;
}

describe('startMemoryFill', () => {
  it('a filler that writes its account and exits at once is done, every time (its exit may be seen before the line)', async () => {
    // The account as the last bytes before exit, no newline after it: read only at the end of stdout.
    const binary = standIn('fill-done', `echo ready\nprintf '%s' 'done ${JSON.stringify(ACCOUNT)}'\nexit 0`);
    for (let i = 0; i < 20; i++) {
      const fill = await startMemoryFill({ binary, workDir: dir, source: { planFile: join(dir, 'plan'), imagesDir: dir }, threads: 1, timeoutMs: 5_000 });
      await expect(fill.done).resolves.toEqual(ACCOUNT);
    }
  });

  it('a filler that exits without its account, or says an error, fails the fill with RESTORE_MEMORY_FILL', async () => {
    const early = standIn('fill-early', 'echo ready\nexit 0');
    const f1 = await startMemoryFill({ binary: early, workDir: dir, source: { planFile: join(dir, 'plan'), imagesDir: dir }, threads: 1, timeoutMs: 5_000 });
    await expect(f1.done).rejects.toMatchObject({ code: 'RESTORE_MEMORY_FILL', message: expect.stringContaining('ended before the memory was in (exit 0)') });
    const said = standIn('fill-error', 'echo ready\necho "error FORK the process forked"\nexit 4');
    const f2 = await startMemoryFill({ binary: said, workDir: dir, source: { planFile: join(dir, 'plan'), imagesDir: dir }, threads: 1, timeoutMs: 5_000 });
    await expect(f2.done).rejects.toMatchObject({ code: 'RESTORE_MEMORY_FILL', message: expect.stringContaining('thaw-fill: FORK: the process forked') });
  });
});
