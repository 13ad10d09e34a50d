/**
 * Weight sources are named by the worker and read by root: sourceOpener resolves them inside the rootfs
 * (or below an allowed model dir) and never follows a path out of it (attacked here with links to a canary).
 */
import { execFileSync } from 'node:child_process';
import { constants, openSync, closeSync } from 'node:fs';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { FsAt } from '../../src/sys/fs-at.js';
import { sourceOpener } from '../../src/restore-engine/weights/sources.js';

describe('sourceOpener', () => {
  let dir: string;
  let rootFd: number;
  let modelsFd: number;
  const fsAt = FsAt.load();

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-weights-src-'));
    await mkdir(join(dir, 'rootfs/models'), { recursive: true });
    await mkdir(join(dir, 'hostmodels'));
    await writeFile(join(dir, 'canary'), 'host secret');
    await writeFile(join(dir, 'rootfs/models/a.safetensors'), 'in root');
    await writeFile(join(dir, 'hostmodels/b.safetensors'), 'host model');
    await symlink(join(dir, 'canary'), join(dir, 'rootfs/models/abs-link'));
    await symlink('../../../canary', join(dir, 'rootfs/models/rel-link'));
    await symlink(join(dir, 'canary'), join(dir, 'hostmodels/link'));
    execFileSync('mkfifo', [join(dir, 'rootfs/models/fifo')]);
    rootFd = openSync(join(dir, 'rootfs'), constants.O_RDONLY | constants.O_DIRECTORY);
    modelsFd = openSync(join(dir, 'hostmodels'), constants.O_RDONLY | constants.O_DIRECTORY);
  });

  afterEach(async () => {
    closeSync(rootFd);
    closeSync(modelsFd);
    await rm(dir, { recursive: true, force: true });
  });

  async function contents(open: (p: string) => Promise<{ read: (b: Buffer, o: number, l: number, p: number) => Promise<{ bytesRead: number }>; close: () => Promise<void> }>, path: string): Promise<string> {
    const f = await open(path);
    const buf = Buffer.alloc(64);
    const { bytesRead } = await f.read(buf, 0, 64, 0);
    await f.close();
    return buf.subarray(0, bytesRead).toString();
  }

  it('opens inside the rootfs and below allowed model dirs', async () => {
    const open = sourceOpener(fsAt, rootFd, [{ prefix: '/host-models', dirFd: modelsFd }]);
    expect(await contents(open, '/models/a.safetensors')).toBe('in root');
    expect(await contents(open, '/host-models/b.safetensors')).toBe('host model');
  });

  it('never reaches the canary outside: links and .. stay in the root, links under a model dir are refused', async () => {
    const open = sourceOpener(fsAt, rootFd, [{ prefix: '/host-models', dirFd: modelsFd }]);
    for (const p of ['/models/abs-link', '/models/rel-link', '/../canary', '/models/../../canary', '/host-models/link', '/host-models/../canary']) {
      const got = await contents(open, p).catch(() => 'refused');
      expect(got, p).not.toBe('host secret');
    }
  });

  it('refuses a FIFO without blocking on it', async () => {
    const open = sourceOpener(fsAt, rootFd);
    await expect(open('/models/fifo')).rejects.toThrow(/not a regular file/);
  });
});
