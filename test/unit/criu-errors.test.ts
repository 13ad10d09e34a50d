/** How a CRIU failure is shown: the log's Error lines with context, and its tail, from a fake log file. */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { excerptCriuLog, renderCriuLogExcerpt } from '../../src/restore-engine/criu/errors.js';
import { readCriuLogExcerpt } from '../../src/restore-engine/criu/swrk.js';

const dir = mkdtempSync('/tmp/thaw-criu-err-');
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A restore log shaped like CRIU 4.1.1's, with the harmless rlimit error first and the real cause later. */
function fakeLog(): string {
  const lines: string[] = [];
  for (let i = 1; i <= 40; i++) lines.push(`(00.0000${String(i).padStart(2, '0')}) info line ${i}`);
  lines[9] = "(00.000010) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted";
  lines[29] = '(00.000030) Error (criu/image.c:882): Unexpected EOF';
  lines[30] = "(00.000031) Error (criu/cr-restore.c:510): Can't open core data for 1234";
  lines[35] = '(00.000036) Error (criu/cr-restore.c:2320): Restoring FAILED.';
  return `${lines.join('\n')}\n`;
}

describe('CRIU log evidence', () => {
  it('quotes each Error line with five lines before it, like grep -n -B5 Error, groups split by --', () => {
    const ex = excerptCriuLog('/w/restore.log', fakeLog());
    expect(ex.errorLines).toEqual([
      '5: (00.000005) info line 5',
      '6: (00.000006) info line 6',
      '7: (00.000007) info line 7',
      '8: (00.000008) info line 8',
      '9: (00.000009) info line 9',
      "10: (00.000010) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
      '--',
      '25: (00.000025) info line 25',
      '26: (00.000026) info line 26',
      '27: (00.000027) info line 27',
      '28: (00.000028) info line 28',
      '29: (00.000029) info line 29',
      '30: (00.000030) Error (criu/image.c:882): Unexpected EOF',
      "31: (00.000031) Error (criu/cr-restore.c:510): Can't open core data for 1234",
      '32: (00.000032) info line 32',
      '33: (00.000033) info line 33',
      '34: (00.000034) info line 34',
      '35: (00.000035) info line 35',
      '36: (00.000036) Error (criu/cr-restore.c:2320): Restoring FAILED.',
    ]);
  });

  it('keeps the last 30 lines as the tail', () => {
    const ex = excerptCriuLog('/w/restore.log', fakeLog());
    expect(ex.tail).toHaveLength(30);
    expect(ex.tail[0]).toBe('(00.000011) info line 11');
    expect(ex.tail.at(-1)).toBe('(00.000040) info line 40');
  });

  it('names the first Error line that is not the harmless rlimit one as the cause', () => {
    expect(excerptCriuLog('/w/restore.log', fakeLog()).firstError).toBe('Error (criu/image.c:882): Unexpected EOF');
  });

  it('renders the Error lines when there are some, the tail otherwise', () => {
    const withErrors = renderCriuLogExcerpt(excerptCriuLog('/w/restore.log', fakeLog()));
    expect(withErrors.split('\n')[0]).toBe('CRIU log /w/restore.log, Error lines:');
    expect(withErrors).toContain('  30: (00.000030) Error (criu/image.c:882): Unexpected EOF');
    const clean = renderCriuLogExcerpt(excerptCriuLog('/w/dump.log', 'a\nb\n'));
    expect(clean).toBe('CRIU log /w/dump.log, last 2 lines:\n  a\n  b');
  });

  it('reads a log file from disk, and reports an unreadable one instead of throwing', async () => {
    const path = join(dir, 'restore.log');
    writeFileSync(path, fakeLog());
    const ex = await readCriuLogExcerpt(path);
    expect(ex.firstError).toBe('Error (criu/image.c:882): Unexpected EOF');
    const missing = await readCriuLogExcerpt(join(dir, 'nope.log'));
    expect(missing.unreadable).toMatch(/ENOENT/);
    expect(renderCriuLogExcerpt(missing)).toMatch(/^CRIU log .*nope\.log: unreadable \(ENOENT/);
  });
});
