import { spawn, execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import { applyRootfsDiff, captureRootfsDiff } from '../../src/restore-engine/rootfs-diff/index.js';
import { rejection } from '../helpers/rejection.js';
import { ustar } from '../helpers/rootfs-tree.js';

// Attacks on the filesystem sync (security audit C4, C5): archives a source pod could make thaw apply, and a
// source pod that changes its upperdir while thaw captures it. Host canaries outside the rootfs must stay as
// they were, and no canary byte may reach an archive.

function pax(records: Record<string, string>): Buffer {
  return Buffer.concat(
    Object.entries(records).map(([k, v]) => {
      const body = ` ${k}=${v}\n`;
      let len = body.length + 1;
      while (String(len).length + body.length !== len) len = String(len).length + body.length;
      return Buffer.from(`${len}${body}`);
    }),
  );
}

async function treeOf(dir: string): Promise<string[]> {
  const out: string[] = [];
  const visit = async (rel: string): Promise<void> => {
    for (const e of (await readdir(join(dir, rel), { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
      const r = join(rel, e.name);
      out.push(e.isFile() ? `${r}=${await readFile(join(dir, r), 'utf8')}` : r);
      if (e.isDirectory()) await visit(r);
    }
  };
  await visit('');
  return out;
}

describe('crafted rootfs diffs leave the host alone', () => {
  let dir: string;
  let rootfs: string;
  let canary: string;
  let canaryBefore: string[];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-attack-'));
    rootfs = join(dir, 'rootfs');
    canary = join(dir, 'host-canary');
    await mkdir(join(rootfs, 'etc'), { recursive: true });
    await mkdir(canary);
    await writeFile(join(canary, 'secret'), 'host secret');
    // The image's own symlink to the host's root, as an absolute symlink is when seen from the host.
    await symlink('/', join(rootfs, 'h'));
    canaryBefore = await treeOf(canary);
  });
  afterAll(async () => {
    expect(await treeOf(canary)).toEqual(canaryBefore);
    await rm(dir, { recursive: true, force: true });
  });

  async function apply(tar: Buffer, deleted = '[]'): Promise<unknown> {
    await writeFile(join(dir, 'a.tar'), tar);
    await writeFile(join(dir, 'a.json'), deleted);
    const err = await rejection(applyRootfsDiff({ rootfs, tarFile: join(dir, 'a.tar'), deletedFilesFile: join(dir, 'a.json') }));
    expect(await treeOf(canary)).toEqual(canaryBefore);
    return err;
  }

  it('refuses a child before its parent written through an image symlink /h -> / (ROOTFS_DIFF_ORDER)', async () => {
    const err = await apply(ustar([{ name: `h${canary}/planted`, type: '0', data: 'owned' }, { name: 'h', type: '5' }]));
    expect(isThawError(err, 'ROOTFS_DIFF_ORDER'), String(err)).toBe(true);
    expect((err as Error).message).toMatch(/entry "h" comes after entries below it/);
  });

  it('refuses a global pax header that renames or resizes later entries (ROOTFS_DIFF_GLOBAL_PAX)', async () => {
    for (const records of [{ path: `h${canary}/secret` }, { size: "0" }] as Array<Record<string, string>>) {
      const err = await apply(ustar([{ name: 'pax_global_header', type: 'g', data: pax(records) }, { name: 'etc/x', type: '0', data: 'x' }]));
      expect(isThawError(err, 'ROOTFS_DIFF_GLOBAL_PAX'), String(err)).toBe(true);
    }
  });

  it('refuses GNU long names and two pax headers for one entry (readers would disagree on the name)', async () => {
    const long = await apply(ustar([{ name: '././@LongLink', type: 'L', data: `h${canary}/secret\0` }, { name: 'etc/x', type: '0', data: 'x' }]));
    expect(isThawError(long, 'ROOTFS_DIFF_INVALID'), String(long)).toBe(true);
    const twice = await apply(
      ustar([
        { name: 'p1', type: 'x', data: pax({ path: 'etc/a' }) },
        { name: 'p2', type: 'x', data: pax({ path: `h${canary}/secret` }) },
        { name: 'etc/x', type: '0', data: 'x' },
      ]),
    );
    expect(isThawError(twice, 'ROOTFS_DIFF_INVALID'), String(twice)).toBe(true);
  });

  it('refuses device nodes and hard links out of the archive, and writes through no image symlink', async () => {
    expect(isThawError(await apply(ustar([{ name: 'etc/null', type: '3' }])), 'ROOTFS_DIFF_UNSAFE')).toBe(true);
    expect(isThawError(await apply(ustar([{ name: 'etc/hl', type: '1', linkname: `h${canary}/secret` }])), 'ROOTFS_DIFF_UNSAFE')).toBe(true);
    expect(isThawError(await apply(ustar([{ name: `h${canary}/secret`, type: '0', data: 'owned' }])), 'ROOTFS_DIFF_UNSAFE')).toBe(true);
    // Deletions through the image symlink are skipped, never followed.
    await writeFile(join(dir, 'ok.tar'), ustar([{ name: 'etc/ok', type: '0', data: 'ok' }]));
    await writeFile(join(dir, 'ok.json'), JSON.stringify([`h${canary}/secret`, `h${canary}`]));
    const r = await applyRootfsDiff({ rootfs, tarFile: join(dir, 'ok.tar'), deletedFilesFile: join(dir, 'ok.json') });
    expect(r.skipped).toEqual([`h${canary}/secret`, `h${canary}`]);
  });
});

// renameat2(RENAME_EXCHANGE) of a directory and a symlink to the canary, as fast as Python can, while thaw
// captures the tree again and again. Each capture either succeeds without a canary byte or is refused.
const FLIPPER = `
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]
a, b = os.path.join(d, 'dir').encode(), os.path.join(d, 'link').encode()
print('ready', flush=True)
while True:
    libc.renameat2(-100, a, -100, b, 2)
`;

describe('a capture while the tree flips a directory and a symlink to a host canary', () => {
  it('never archives a canary byte, and leaves the canary untouched', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-flip-'));
    const upper = join(dir, 'upper');
    const canary = join(dir, 'canary');
    await mkdir(join(upper, 'dir', 'sub'), { recursive: true });
    await writeFile(join(upper, 'dir', 'sub', 'own'), 'own data');
    await mkdir(join(canary, 'sub'), { recursive: true });
    await writeFile(join(canary, 'sub', 'own'), 'CANARY-BYTES');
    await writeFile(join(canary, 'secret'), 'CANARY-BYTES');
    await symlink(canary, join(upper, 'link'));
    const flipper = spawn('python3', ['-c', FLIPPER, upper], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve) => flipper.stdout.once('data', () => resolve()));
      let refused = 0;
      let captured = 0;
      for (let round = 0; round < 200; round++) {
        const tarFile = join(dir, `r.tar`);
        try {
          await captureRootfsDiff({ upperdir: upper, tarFile, deletedFilesFile: join(dir, 'r.json') });
          captured++;
          expect((await readFile(tarFile)).includes('CANARY-BYTES')).toBe(false);
        } catch (err) {
          expect(isThawError(err, 'ROOTFS_DIFF_UNSAFE') || isThawError(err, 'ROOTFS_IO'), String(err)).toBe(true);
          refused++;
        }
      }
      expect(captured + refused).toBe(200);
    } finally {
      flipper.kill('SIGKILL');
    }
    expect(await readFile(join(canary, 'secret'), 'utf8')).toBe('CANARY-BYTES');
    expect(await readdir(canary)).toEqual(['secret', 'sub']);
    execFileSync('rm', ['-rf', dir]);
  }, 120_000);
});
