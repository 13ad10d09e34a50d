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
import { restoreSourceOpener } from '../../src/restore-engine/weights/service.js';

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

/**
 * The restore's opener (service.ts): a source on one of the target's bind mounts opens below an allowed host
 * model dir only (the pod chose the mount; root reads through it); anything else waits for the rootfs.
 */
describe('restoreSourceOpener', () => {
  let dir: string;
  let rootFd: number;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-weights-mnt-'));
    await mkdir(join(dir, 'models/qwen'), { recursive: true });
    await mkdir(join(dir, 'other'));
    await mkdir(join(dir, 'rootfs/opt'), { recursive: true });
    await writeFile(join(dir, 'models/qwen/a.safetensors'), 'allowed model');
    await writeFile(join(dir, 'other/secret'), 'host secret');
    await writeFile(join(dir, 'rootfs/opt/b.safetensors'), 'in root');
    await symlink(join(dir, 'other/secret'), join(dir, 'models/qwen/link'));
    rootFd = openSync(join(dir, 'rootfs'), constants.O_RDONLY | constants.O_DIRECTORY);
  });

  afterEach(async () => {
    closeSync(rootFd);
    await rm(dir, { recursive: true, force: true });
  });

  async function contents(file: { read: (b: Buffer, o: number, l: number, p: number) => Promise<{ bytesRead: number }>; close: () => Promise<void> }): Promise<string> {
    const buf = Buffer.alloc(64);
    const { bytesRead } = await file.read(buf, 0, 64, 0);
    await file.close();
    return buf.subarray(0, bytesRead).toString();
  }

  it('opens a mounted source below an allowed dir at once, and a rootfs source once the root is there', async () => {
    let giveRoot: (fd: number) => void = () => undefined;
    const rootReady = new Promise<number>((r) => (giveRoot = r));
    const o = restoreSourceOpener({ mounts: [{ destination: '/weights', source: join(dir, 'models/qwen') }], modelDirs: [join(dir, 'models')], rootReady });
    try {
      expect(await contents(await o.open('/weights/a.safetensors'))).toBe('allowed model');
      const inRoot = o.open('/opt/b.safetensors');
      giveRoot(rootFd);
      expect(await contents(await inRoot)).toBe('in root');
    } finally {
      o.close();
    }
  });

  it('never reads through a mount outside the allowed dirs, a link below one, or a source path that climbs out', async () => {
    const o = restoreSourceOpener({
      mounts: [
        { destination: '/weights', source: join(dir, 'models/qwen') },
        { destination: '/etc-host', source: join(dir, 'other') },
        { destination: '/sneaky', source: `${join(dir, 'models')}/../other` },
      ],
      modelDirs: [join(dir, 'models')],
      rootReady: Promise.resolve(rootFd),
    });
    try {
      for (const p of ['/etc-host/secret', '/sneaky/secret', '/weights/link', '/weights/../etc-host/secret']) {
        const got = await o.open(p).then(contents, () => 'refused');
        expect(got, p).toBe('refused');
      }
    } finally {
      o.close();
    }
  });

  it('finds a source no model dir has in the weights cache, by sha256: a regular file of the recorded size, no link', async () => {
    const cache = join(dir, 'cache');
    await mkdir(cache);
    const sha = (c: string): string => c.repeat(64);
    await writeFile(join(cache, sha('1')), 'cached weights');
    await writeFile(join(cache, sha('2')), 'short');
    await symlink(join(dir, 'other/secret'), join(cache, sha('3')));
    let arrived: () => void = () => undefined;
    const ready = new Promise<void>((r) => (arrived = r));
    const o = restoreSourceOpener({
      mounts: [{ destination: '/weights', source: join(dir, 'models/qwen') }],
      modelDirs: [join(dir, 'models')],
      rootReady: Promise.resolve(rootFd),
      weightsCache: { dir: cache, ready },
    });
    try {
      // The model dir has it: the model dir's file, whatever the cache holds (no wait for the cache).
      expect(await contents(await o.open('/weights/a.safetensors', { sha256: sha('1'), fileSize: 14 }))).toBe('allowed model');
      // Not in the model dir: the cache's entry, once the pull under way is done.
      const pending = o.open('/weights/gone.safetensors', { sha256: sha('1'), fileSize: 14 });
      arrived();
      expect(await contents(await pending)).toBe('cached weights');
      // Not on a mount at all: the cache before the rootfs.
      expect(await contents(await o.open('/opt/b.safetensors', { sha256: sha('1'), fileSize: 14 }))).toBe('cached weights');
      expect(await contents(await o.open('/opt/b.safetensors', { sha256: sha('9'), fileSize: 14 }))).toBe('in root');
      // An entry of another size, a link in the cache, a name that is not a sha256: never used.
      for (const want of [{ sha256: sha('2'), fileSize: 14 }, { sha256: sha('3'), fileSize: 11 }, { sha256: '../other/secret', fileSize: 11 }]) {
        const got = await o.open('/weights/gone.safetensors', want).then(contents, () => 'refused');
        expect(got, want.sha256).toBe('refused');
      }
    } finally {
      o.close();
    }
  });
});
