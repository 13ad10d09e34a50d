/**
 * The control directory is shared with the pod: what its process can plant there (symlinks to host files,
 * hard links, FIFOs, device nodes, huge files) must never turn an agent read or write into a host file
 * access, hang the agent, or swell it. Real files on a real directory, the agent's own functions.
 */
import { execFileSync } from 'node:child_process';
import { link, lstat, mkdtemp, readFile, readdir, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { readHookOutcome, writeHookDone } from '../../src/oci-hooks/records.js';
import { clearStaleMarkers, createControlDir, readReadyPayload, writeMarker } from '../../src/sdk/control-dir.js';
import { CONTROL_DIR_ERROR_CODES } from '../../src/sdk/errors.js';
import { MARKER_MAX_BYTES, readEntry } from '../../src/sdk/marker-files.js';

const ID = 'b'.repeat(64);
let root: string;
let dir: string;
let host: string;
let canary: string;
const CANARY = 'host canary: never to be written by thaw\n';

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'thaw-hostile-'));
  dir = await createControlDir(join(root, 'control'), ID);
  host = join(root, 'host');
  await execFileSync('mkdir', ['-p', host]);
  canary = join(host, 'canary');
  await writeFile(canary, CANARY);
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  }
  return 'resolved';
}

describe('agent writes into a hostile control directory', () => {
  it('a symlink planted at a marker name is replaced, never written through (host canary intact)', async () => {
    for (const name of ['restore-complete', 'restore-failed', 'checkpoint-complete', 'snapshot-complete']) {
      await symlink(canary, join(dir, name));
    }
    await writeMarker(dir, 'restore-complete', { ok: true });
    await writeMarker(dir, 'restore-failed', { reason: 'x' });
    await writeMarker(dir, 'checkpoint-complete');
    expect(await readFile(canary, 'utf8')).toBe(CANARY);
    for (const name of ['restore-complete', 'restore-failed', 'checkpoint-complete', 'snapshot-complete']) {
      expect((await lstat(join(dir, name))).isFile()).toBe(true);
    }
  });

  it('a hard link planted at a marker name is replaced, the linked host file keeps its bytes', async () => {
    await link(canary, join(dir, 'restore-complete'));
    await writeMarker(dir, 'restore-complete', { ok: true });
    expect(await readFile(canary, 'utf8')).toBe(CANARY);
    expect((await lstat(canary)).nlink).toBe(1);
  });

  it('the hook records: a symlink at .thaw-hook.json or at a guessable temporary is replaced, not followed', async () => {
    await symlink(canary, join(dir, '.thaw-hook.json'));
    await symlink(canary, join(dir, `..thaw-hook.json.tmp-${process.pid}`));
    await writeHookDone(dir, { mode: 'args', ms: 1 });
    expect(await readFile(canary, 'utf8')).toBe(CANARY);
    expect((await readHookOutcome(dir)).kind).toBe('done');
  });

  it('temporaries are random names created exclusively: symlinks planted at guessable ones change nothing', async () => {
    for (const pid of [process.pid, process.pid + 1]) {
      await symlink(canary, join(dir, `.restore-complete.tmp-${pid}`));
      await symlink(canary, join(dir, `.tmp-restore-complete-${pid}`));
    }
    await writeMarker(dir, 'restore-complete');
    expect(await readFile(canary, 'utf8')).toBe(CANARY);
    const planted = [process.pid, process.pid + 1].flatMap((pid) => [`.restore-complete.tmp-${pid}`, `.tmp-restore-complete-${pid}`]);
    expect((await readdir(dir)).sort()).toEqual([...planted, 'restore-complete'].sort());
  });

  it('clearStaleMarkers removes a planted symlink itself, not its target', async () => {
    await symlink(canary, join(dir, 'restore-failed'));
    await clearStaleMarkers(dir);
    expect(await readFile(canary, 'utf8')).toBe(CANARY);
    await expect(lstat(join(dir, 'restore-failed'))).rejects.toThrow(/ENOENT/);
  });
});

describe('agent reads from a hostile control directory', () => {
  it('a FIFO at the ready marker is refused at once (no libuv thread blocks on it)', async () => {
    execFileSync('mkfifo', [join(dir, 'ready-for-checkpoint')]);
    expect(await code(readReadyPayload(dir, 'ready-for-checkpoint'))).toBe(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY);
    // Four more than the libuv pool: a blocking open would have left none for this read.
    const more = await Promise.all(Array.from({ length: 8 }, () => code(readReadyPayload(dir, 'ready-for-checkpoint'))));
    expect(new Set(more)).toEqual(new Set([CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY]));
    await writeFile(join(dir, 'ok'), '{}');
    expect(await readEntry(dir, 'ok', 'test')).toBe('{}');
  });

  it('a symlink to /dev/zero or to a host file is refused, never read', async () => {
    await symlink('/dev/zero', join(dir, 'ready-for-checkpoint'));
    await symlink(canary, join(dir, 'ready-for-snapshot'));
    expect(await code(readReadyPayload(dir, 'ready-for-checkpoint'))).toBe(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY);
    expect(await code(readReadyPayload(dir, 'ready-for-snapshot'))).toBe(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY);
  });

  it('a device node (a copy of /dev/zero made with mknod) is refused without being opened', async () => {
    execFileSync('mknod', [join(dir, 'ready-for-checkpoint'), 'c', '1', '5']);
    expect(await code(readReadyPayload(dir, 'ready-for-checkpoint'))).toBe(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY);
  });

  it('a hard link to a host file is refused (its bytes would reach the agent\'s logs)', async () => {
    await link(canary, join(dir, 'ready-for-checkpoint'));
    expect(await code(readReadyPayload(dir, 'ready-for-checkpoint'))).toBe(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY);
  });

  it('a huge (sparse) file is refused by its size, without reading it', async () => {
    await writeFile(join(dir, 'ready-for-checkpoint'), '');
    await truncate(join(dir, 'ready-for-checkpoint'), 64 * 1024 * 1024 * 1024);
    const before = process.memoryUsage().rss;
    expect(await code(readReadyPayload(dir, 'ready-for-checkpoint'))).toBe(CONTROL_DIR_ERROR_CODES.UNSAFE_ENTRY);
    expect(process.memoryUsage().rss - before).toBeLessThan(16 * MARKER_MAX_BYTES * 1024);
  });

  it('a hook record that is a symlink, FIFO or huge file reads as a failed hook (cold start), not as done', async () => {
    await symlink(canary, join(dir, '.thaw-hook.json'));
    const viaLink = await readHookOutcome(dir);
    expect(viaLink.kind).toBe('failed');
    await rm(join(dir, '.thaw-hook.json'));
    execFileSync('mkfifo', [join(dir, 'hook-failed')]);
    const viaFifo = await readHookOutcome(dir);
    expect(viaFifo).toMatchObject({ kind: 'failed', record: { code: 'HOOK_RECORD_UNREADABLE' } });
  });

  it('a directory given as a symlink is refused (the agent opens its dir with O_NOFOLLOW)', async () => {
    const evil = join(root, 'evil');
    await symlink(host, evil);
    expect(await code(writeMarker(evil, 'restore-complete'))).toBe(CONTROL_DIR_ERROR_CODES.WRITE_FAILED);
    expect(await readdir(host)).toEqual(['canary']);
  });
});
