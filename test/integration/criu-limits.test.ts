/**
 * The global bound on CRIU runs, against the real CRIU of thaw's node stack: several CRIU calls at once through
 * one client and limiter never have more swrk processes alive than the bound. Counted from the client's own log
 * lines in the order they happened (`criu swrk started` ... `criu version done`), not timed.
 */
import { existsSync } from 'node:fs';
import { dirname } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { CriuClient } from '../../src/restore-engine/criu/client.js';
import { Limiter } from '../../src/sys/concurrency.js';

const CRIU_PATH = process.env.THAW_TEST_CRIU_PATH ?? '/opt/thaw/stack/1.7/bin/criu';

/** The most swrk processes alive at once, by the started/done lines of one step. */
function mostAtOnce(lines: ReadonlyArray<{ msg: string; fields: Record<string, unknown> }>, step: string): number {
  let alive = 0;
  let most = 0;
  for (const l of lines) {
    if (l.msg === 'criu swrk started' && l.fields['step'] === step) most = Math.max(most, ++alive);
    if (l.msg === `${step} done`) alive--;
  }
  return most;
}

describe('CRIU runs bounded by a limiter', () => {
  it.each([1, 2])('at most %i CRIU at once over 5 concurrent calls, and every call answered', async (max) => {
    if (!existsSync(CRIU_PATH)) throw new Error(`CRIU not found at ${CRIU_PATH}: provision thaw's node stack first (scripts/setup.sh)`);
    const logger = createCollectingLogger();
    const limiter = new Limiter(max);
    const client = new CriuClient({ criuPath: CRIU_PATH, logger, limiter, env: { PATH: `${dirname(CRIU_PATH)}:/usr/bin:/bin` } });
    const versions = await Promise.all(Array.from({ length: 5 }, () => client.version()));
    expect(versions.every((v) => v.major >= 3)).toBe(true);
    const lines = logger.lines.map((l) => ({ msg: l.msg, fields: l.fields }));
    expect(lines.filter((l) => l.msg === 'criu swrk started')).toHaveLength(5);
    expect(mostAtOnce(lines, 'criu version')).toBe(max);
    expect([limiter.peak, limiter.running, limiter.waiting]).toEqual([max, 0, 0]);
  });

  it('without a limiter the same calls do run together (the count above can tell)', async () => {
    if (!existsSync(CRIU_PATH)) throw new Error(`CRIU not found at ${CRIU_PATH}`);
    const logger = createCollectingLogger();
    const client = new CriuClient({ criuPath: CRIU_PATH, logger, env: { PATH: `${dirname(CRIU_PATH)}:/usr/bin:/bin` } });
    await Promise.all(Array.from({ length: 5 }, () => client.version()));
    expect(mostAtOnce(logger.lines.map((l) => ({ msg: l.msg, fields: l.fields })), 'criu version')).toBeGreaterThan(2);
  });
});
