/**
 * The worker's weights file as thaw reads it (src/restore-engine/weights/regions-file.ts): everything in it
 * is the pod's, so each field is checked and a file that breaks one rule is refused whole.
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  WEIGHTS_FILE,
  WEIGHTS_FILE_MAX_BYTES,
  WEIGHTS_SCHEMA,
  parseWeightsRegions,
  readWeightsFile,
} from '../../src/restore-engine/weights/regions-file.js';
import { WeightsErrorCode } from '../../src/restore-engine/weights/errors.js';

const MiB = 1 << 20;
const SHA = 'ab'.repeat(32);

function doc(): any {
  return {
    schema: WEIGHTS_SCHEMA,
    regions: [
      {
        name: 'weights',
        device: 0,
        va: '0x7f0000000000',
        size: 6 * MiB,
        granularity: 2 * MiB,
        allocations: [
          { offset: 0, size: 2 * MiB, kind: 'file', source: { path: '/models/a.safetensors', fileOffset: 120, length: 16384, fileSize: 16504, sha256: SHA } },
          { offset: 2 * MiB, size: 2 * MiB, kind: 'raw' },
        ],
      },
    ],
  };
}

function refused(mutate: (d: any) => void): void {
  const d = doc();
  mutate(d);
  expect(() => parseWeightsRegions(d)).toThrow(expect.objectContaining({ code: WeightsErrorCode.FILE_INVALID }));
}

describe('parseWeightsRegions', () => {
  it('accepts what the SDK writes and gives the VA as a bigint', () => {
    const [r] = parseWeightsRegions(doc());
    expect(r!.va).toBe(0x7f0000000000n);
    expect(r!.allocations.map((a) => a.kind)).toEqual(['file', 'raw']);
    expect(r!.allocations[0]!.source!.path).toBe('/models/a.safetensors');
  });

  it('refuses paths that are relative, not normal, or carry NUL', () => {
    for (const p of ['models/a', '/models/../etc/shadow', '/models//a', '/models/a/', '/models/./a', '/a\0b', '']) {
      refused((d) => (d.regions[0].allocations[0].source.path = p));
    }
  });

  it('refuses allocations that overlap, are unaligned or leave their region', () => {
    refused((d) => (d.regions[0].allocations[1].offset = MiB));
    refused((d) => (d.regions[0].allocations[1].offset = 0));
    refused((d) => (d.regions[0].allocations[1].offset = 6 * MiB));
    refused((d) => (d.regions[0].allocations[1].size = 3 * MiB));
    refused((d) => (d.regions[0].allocations = []));
  });

  it('refuses a source range past the file, a length past the allocation, a bad digest', () => {
    refused((d) => (d.regions[0].allocations[0].source.fileSize = 100));
    refused((d) => (d.regions[0].allocations[0].source.length = 2 * MiB + 1));
    refused((d) => (d.regions[0].allocations[0].source.sha256 = 'AB'.repeat(32)));
    refused((d) => delete d.regions[0].allocations[0].source);
    refused((d) => (d.regions[0].allocations[1].source = d.regions[0].allocations[0].source));
  });

  it('refuses bad regions: VA unaligned, zero, huge; overlapping regions; duplicate names; unknown fields; schema', () => {
    refused((d) => (d.regions[0].va = '0x7f0000001000'));
    refused((d) => (d.regions[0].va = '0x0'));
    refused((d) => (d.regions[0].va = '0xffffffffffff0000'));
    refused((d) => (d.regions[0].va = 12345));
    refused((d) => (d.regions[0].granularity = 3 * MiB));
    refused((d) => d.regions.push({ ...doc().regions[0], name: 'other', va: '0x7f0000200000' }));
    refused((d) => d.regions.push({ ...doc().regions[0] , va: '0x7f1000000000' }));
    refused((d) => (d.regions[0].extra = 1));
    refused((d) => (d.schema = 'thaw.dev/weights-regions/v2'));
    refused((d) => (d.regions[0].size = 2 ** 60));
    refused((d) => (d.regions[0].device = -1));
  });

  it('accepts the same VA on different GPUs', () => {
    const d = doc();
    d.regions.push({ ...doc().regions[0], name: 'gpu1', device: 1 });
    expect(parseWeightsRegions(d)).toHaveLength(2);
  });
});

describe('readWeightsFile', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-weights-file-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads a valid file and says undefined when there is none', async () => {
    expect(await readWeightsFile(dir)).toBeUndefined();
    await writeFile(join(dir, WEIGHTS_FILE), JSON.stringify(doc()));
    expect((await readWeightsFile(dir))![0]!.name).toBe('weights');
  });

  it('does not follow a link, block on a FIFO, or read past the cap', async () => {
    const target = join(dir, 'elsewhere.json');
    await writeFile(target, JSON.stringify(doc()));
    await symlink(target, join(dir, WEIGHTS_FILE));
    await expect(readWeightsFile(dir)).rejects.toMatchObject({ code: WeightsErrorCode.FILE_INVALID });
    await rm(join(dir, WEIGHTS_FILE));
    execFileSync('mkfifo', [join(dir, WEIGHTS_FILE)]);
    await expect(readWeightsFile(dir)).rejects.toMatchObject({ code: WeightsErrorCode.FILE_INVALID });
    await rm(join(dir, WEIGHTS_FILE));
    await writeFile(join(dir, WEIGHTS_FILE), ' '.repeat(WEIGHTS_FILE_MAX_BYTES + 1));
    await expect(readWeightsFile(dir)).rejects.toMatchObject({ code: WeightsErrorCode.FILE_INVALID });
  });
});
