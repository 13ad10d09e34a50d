/**
 * The short run of the decoder fuzz (`npm run fuzz` runs >= 10^6 inputs; bench/fuzz-decoders.ts says what
 * is checked): 20 000 inputs, no untyped throw, no slow input, bounded heap. And the checks themselves can
 * fail: a decoder that throws a plain Error is reported.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeTarHeaders, fuzzTargets, runFuzz, tarCorpus } from '../../bench/fuzz-decoders.js';
import { readTarEntries } from '../../src/restore-engine/rootfs-diff.js';

const dir = mkdtempSync(join(tmpdir(), 'thaw-fuzz-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('decoder fuzz (short run)', () => {
  it('the tar corpus is valid archives (so mutations start from what the decoder accepts)', async () => {
    for (const [i, tar] of tarCorpus().entries()) {
      const file = join(dir, `corpus-${i}.tar`);
      writeFileSync(file, tar);
      expect((await readTarEntries(file)).length).toBeGreaterThan(0);
    }
  });

  it('20 000 random and mutated inputs: only typed errors, none slow, heap bounded', async () => {
    const report = await runFuzz({
      inputs: 20_000,
      seed: 20_000,
      targets: fuzzTargets({ tarFile: join(dir, 'diff.tar'), tarCorpus: tarCorpus() }),
      perInputCapMs: 2_000,
      heapCapMiB: 512,
    });
    expect(report.findings).toEqual([]);
    expect(report.inputs).toBe(20_000);
    for (const [name, s] of Object.entries(report.perTarget)) {
      expect(s.inputs, name).toBe(2_500);
      // Some inputs are refused and some decode: the fuzz reaches both sides of every decoder.
      expect(s.typedErrors, name).toBeGreaterThan(0);
      expect(s.typedErrors, name).toBeLessThan(s.inputs);
    }
  }, 120_000);

  it('reports an untyped throw as a finding, with the input that replays it', async () => {
    const report = await runFuzz({
      inputs: 10,
      seed: 1,
      targets: [{ name: 'broken', run: (r) => { if (r() < 0.5) throw new Error('plain'); } }],
      perInputCapMs: 2_000,
      heapCapMiB: 512,
    });
    expect(report.findings.length).toBeGreaterThan(0);
    expect(report.findings[0]).toMatchObject({ target: 'broken', kind: 'untyped-throw' });
    const replay = await runFuzz({ inputs: 10, seed: 1, only: report.findings[0]!.index, targets: [{ name: 'broken', run: (r) => { if (r() < 0.5) throw new Error('plain'); } }], perInputCapMs: 2_000, heapCapMiB: 512 });
    expect(replay.findings).toHaveLength(1);
  });

  it('decodeTarHeaders is the one entry point of the tar target', async () => {
    expect(await decodeTarHeaders(join(dir, 'one.tar'), tarCorpus()[0]!)).toHaveLength(3);
  });
});
