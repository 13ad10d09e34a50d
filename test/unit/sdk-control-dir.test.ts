/**
 * The agent side of the worker protocol (src/sdk/control-dir.ts) against the TypeScript worker SDK
 * (src/sdk/worker.ts), on a real directory: both ends through the real files, nothing mocked.
 */
import { lstat, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import {
  clearStaleMarkers,
  createControlDir,
  readReadyPayload,
  readyMarkerPresent,
  removeControlDir,
  validateContainerId,
  waitForWorkerReady,
  writeMarker,
} from '../../src/sdk/control-dir.js';
import { ControlDirErrorCode, SdkErrorCode } from '../../src/sdk/errors.js';
import * as protocol from '../../src/sdk/protocol.js';
import { ControlDir, checkpointAndWait, resolveControlDirPath } from '../../src/sdk/worker.js';

const ID = 'a'.repeat(64);
let root: string;

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'thaw-ctl-'));
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error('expected a rejection');
}

describe('createControlDir / removeControlDir', () => {
  it('creates <root>/<id> with mode 0700, idempotently, and removes it (twice is fine)', async () => {
    const dir = await createControlDir(join(root, 'control'), ID);
    expect(dir).toBe(join(root, 'control', ID));
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    expect((await stat(join(root, 'control'))).mode & 0o777).toBe(0o700);
    if (process.getuid?.() === 0) expect((await stat(dir)).uid).toBe(0);
    await writeFile(join(dir, 'keep'), 'x');
    expect(await createControlDir(join(root, 'control'), ID)).toBe(dir);
    expect(await readdir(dir)).toEqual(['keep']);
    await removeControlDir(join(root, 'control'), ID);
    await expect(lstat(dir)).rejects.toThrow(/ENOENT/);
    await removeControlDir(join(root, 'control'), ID);
  });

  it.skipIf(process.getuid?.() !== 0)('chowns to the given owner (a worker that does not run as root)', async () => {
    const dir = await createControlDir(root, ID, { owner: { uid: 1234, gid: 2345 } });
    const st = await stat(dir);
    expect([st.uid, st.gid]).toEqual([1234, 2345]);
  });

  it('refuses a path that exists as a symlink', async () => {
    await symlink('/etc', join(root, ID));
    const err = await rejection(createControlDir(root, ID));
    expect(isThawError(err, ControlDirErrorCode.CREATE_FAILED)).toBe(true);
  });

  const escapes: Record<string, string> = {
    'an empty id': '',
    'a parent reference': '..',
    'a parent path': '../../etc',
    'a slash': 'a/b',
    'an absolute path': '/etc',
    'a NUL byte': 'abc\0def',
    'a leading dot': '.hidden',
    'a leading dash': '-rf',
    'a backslash': 'a\\b',
    'a newline': 'a\nb',
    'an id over 128 characters': 'a'.repeat(129),
  };
  for (const [what, id] of Object.entries(escapes)) {
    it(`rejects ${what} with CONTROL_DIR_INVALID_ID, in create and remove`, async () => {
      expect(() => validateContainerId(id)).toThrow(expect.objectContaining({ code: ControlDirErrorCode.INVALID_ID }));
      expect(isThawError(await rejection(createControlDir(root, id)), ControlDirErrorCode.INVALID_ID)).toBe(true);
      expect(isThawError(await rejection(removeControlDir(root, id)), ControlDirErrorCode.INVALID_ID)).toBe(true);
    });
  }

  it('accepts containerd ids and 128-character names', () => {
    expect(() => validateContainerId('0123456789abcdef'.repeat(4))).not.toThrow();
    expect(() => validateContainerId('pod_a.b-c')).not.toThrow();
    expect(() => validateContainerId('x'.repeat(128))).not.toThrow();
  });
});

describe('writeMarker', () => {
  it('writes checkpoint-complete together with Dynamo\'s snapshot-complete, atomically (no temporaries left)', async () => {
    const dir = await createControlDir(root, ID);
    await writeMarker(dir, 'checkpoint-complete', { checkpoint: 'llama' });
    expect((await readdir(dir)).sort()).toEqual(['checkpoint-complete', 'snapshot-complete']);
    expect(JSON.parse(await readFile(join(dir, 'snapshot-complete'), 'utf8'))).toEqual({ checkpoint: 'llama' });
    expect((await stat(join(dir, 'checkpoint-complete'))).mode & 0o777).toBe(0o644);
  });

  it('writes restore-complete and restore-failed alone; an empty marker without payload', async () => {
    const dir = await createControlDir(root, ID);
    await writeMarker(dir, 'restore-complete');
    await writeMarker(dir, 'restore-failed', { reason: 'gpu mismatch' });
    expect((await readdir(dir)).sort()).toEqual(['restore-complete', 'restore-failed']);
    expect(await readFile(join(dir, 'restore-complete'), 'utf8')).toBe('');
  });

  it('refuses a name the agent does not write', async () => {
    const dir = await createControlDir(root, ID);
    const err = await rejection(writeMarker(dir, 'ready-for-checkpoint' as never));
    expect(isThawError(err, ControlDirErrorCode.INVALID_MARKER)).toBe(true);
  });

  it('fails with CONTROL_DIR_WRITE_FAILED when the directory is gone', async () => {
    const err = await rejection(writeMarker(join(root, 'gone'), 'restore-complete'));
    expect(isThawError(err, ControlDirErrorCode.WRITE_FAILED)).toBe(true);
  });

  it('clearStaleMarkers removes restore markers of an earlier attempt', async () => {
    const dir = await createControlDir(root, ID);
    await writeMarker(dir, 'restore-complete');
    await writeMarker(dir, 'restore-failed');
    await clearStaleMarkers(dir);
    await clearStaleMarkers(dir);
    expect(await readdir(dir)).toEqual([]);
  });
});

describe('waitForWorkerReady', () => {
  it('returns ready-for-checkpoint from the TS worker, with its payload', async () => {
    const dir = await createControlDir(root, ID);
    const waiting = waitForWorkerReady(dir, { timeoutMs: 5000 });
    await new ControlDir({ path: dir }).readyForCheckpoint({ model: 'm' });
    expect(await waiting).toBe('ready-for-checkpoint');
    expect(await readReadyPayload(dir, 'ready-for-checkpoint')).toEqual({ model: 'm' });
  });

  it('recognises Dynamo\'s ready-for-snapshot (an empty file)', async () => {
    const dir = await createControlDir(root, ID);
    setTimeout(() => void writeFile(join(dir, 'ready-for-snapshot'), ''), 50);
    expect(await waitForWorkerReady(dir, { timeoutMs: 5000 })).toBe('ready-for-snapshot');
    expect(await readReadyPayload(dir, 'ready-for-snapshot')).toEqual({});
    expect(await readyMarkerPresent(dir)).toBe('ready-for-snapshot');
  });

  it('wakes on the watch, however long the poll period', async () => {
    const dir = await createControlDir(root, ID);
    // The poll period is longer than the timeout: only the watch can end this wait with the marker.
    const waiting = waitForWorkerReady(dir, { timeoutMs: 20_000, pollIntervalMs: 60 * 60_000 });
    setTimeout(() => void new ControlDir({ path: dir }).readyForCheckpoint(), 50);
    expect(await waiting).toBe('ready-for-checkpoint');
  });

  it('polls when the directory cannot be watched (it appears later)', async () => {
    const dir = join(root, 'later');
    const waiting = waitForWorkerReady(dir, { timeoutMs: 5000, pollIntervalMs: 20 });
    await createControlDir(root, 'later');
    await new ControlDir({ path: dir }).readyForCheckpoint();
    expect(await waiting).toBe('ready-for-checkpoint');
  });

  it('times out with CONTROL_DIR_WAIT_TIMEOUT', async () => {
    const dir = await createControlDir(root, ID);
    const err = await rejection(waitForWorkerReady(dir, { timeoutMs: 150 }));
    expect(isThawError(err, ControlDirErrorCode.WAIT_TIMEOUT)).toBe(true);
  });

  it('rejects with CONTROL_DIR_ABORTED on abort, and removes its abort listener', async () => {
    const dir = await createControlDir(root, ID);
    const controller = new AbortController();
    const signal = controller.signal;
    let listeners = 0;
    const add = signal.addEventListener.bind(signal);
    const remove = signal.removeEventListener.bind(signal);
    signal.addEventListener = ((...args: Parameters<typeof add>) => (listeners++, add(...args))) as typeof add;
    signal.removeEventListener = ((...args: Parameters<typeof remove>) => (listeners--, remove(...args))) as typeof remove;
    const waiting = waitForWorkerReady(dir, { signal, pollIntervalMs: 5000 });
    setTimeout(() => controller.abort(new Error('pod deleted')), 50);
    const err = await rejection(waiting);
    expect(isThawError(err, ControlDirErrorCode.ABORTED)).toBe(true);
    expect(listeners).toBe(0);
  });

  it('rejects at once for an already-aborted signal', async () => {
    const dir = await createControlDir(root, ID);
    const err = await rejection(waitForWorkerReady(dir, { signal: AbortSignal.abort() }));
    expect(isThawError(err, ControlDirErrorCode.ABORTED)).toBe(true);
  });
});

describe('the TypeScript worker SDK against the agent side', () => {
  it('reads its directory from SNAPSHOT_CONTROL_DIR, then DYN_SNAPSHOT_CONTROL_DIR, then /snapshot-control', () => {
    expect(resolveControlDirPath({ env: { SNAPSHOT_CONTROL_DIR: '/a', DYN_SNAPSHOT_CONTROL_DIR: '/b' } })).toBe('/a');
    expect(resolveControlDirPath({ env: { DYN_SNAPSHOT_CONTROL_DIR: '/b' } })).toBe('/b');
    expect(resolveControlDirPath({ env: {} })).toBe(protocol.DEFAULT_CONTROL_DIR);
  });

  for (const marker of ['checkpoint-complete', 'restore-complete', 'restore-failed'] as const) {
    it(`wait() returns ${marker} written by writeMarker`, async () => {
      const dir = await createControlDir(root, ID);
      const worker = new ControlDir({ path: dir });
      const waiting = worker.wait({ timeoutMs: 5000 });
      setTimeout(() => void writeMarker(dir, marker, { by: 'agent' }), 50);
      expect(await waiting).toBe(marker);
      expect(await worker.payload(marker)).toEqual({ by: 'agent' });
      expect(await worker.wasRestored()).toBe(marker === 'restore-complete');
    });
  }

  it('accepts Dynamo\'s snapshot-complete alone as checkpoint-complete', async () => {
    const dir = await createControlDir(root, ID);
    await writeFile(join(dir, 'snapshot-complete'), '');
    expect(await new ControlDir({ path: dir }).wait({ timeoutMs: 1000 })).toBe('checkpoint-complete');
  });

  it('checkpointAndWait: release before ready, resume after restore-complete', async () => {
    const dir = await createControlDir(root, ID);
    const calls: string[] = [];
    const agent = (async () => {
      expect(await waitForWorkerReady(dir, { timeoutMs: 5000 })).toBe('ready-for-checkpoint');
      calls.push('agent saw ready');
      await writeMarker(dir, 'restore-complete');
    })();
    const outcome = await checkpointAndWait({
      controlDir: new ControlDir({ path: dir }),
      release: async () => {
        calls.push(`release (ready present: ${(await readyMarkerPresent(dir)) !== undefined})`);
      },
      resume: () => void calls.push('resume'),
      timeoutMs: 5000,
    });
    await agent;
    expect(outcome).toBe('restore-complete');
    expect(calls).toEqual(['release (ready present: false)', 'agent saw ready', 'resume']);
  });

  it('checkpointAndWait: no resume after restore-failed', async () => {
    const dir = await createControlDir(root, ID);
    await writeMarker(dir, 'restore-failed');
    let resumed = false;
    const outcome = await checkpointAndWait({ controlDir: new ControlDir({ path: dir }), resume: () => void (resumed = true) });
    expect(outcome).toBe('restore-failed');
    expect(resumed).toBe(false);
  });

  it('wait() times out with SDK_WAIT_TIMEOUT and aborts with SDK_ABORTED', async () => {
    const dir = await createControlDir(root, ID);
    const worker = new ControlDir({ path: dir });
    expect(isThawError(await rejection(worker.wait({ timeoutMs: 120 })), SdkErrorCode.WAIT_TIMEOUT)).toBe(true);
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    expect(isThawError(await rejection(worker.wait({ signal: controller.signal })), SdkErrorCode.ABORTED)).toBe(true);
  });

  it('readyForCheckpoint fails with SDK_WRITE_FAILED in a missing directory, SDK_INVALID_PAYLOAD for a non-object', async () => {
    const missing = new ControlDir({ path: join(root, 'missing') });
    expect(isThawError(await rejection(missing.readyForCheckpoint()), SdkErrorCode.WRITE_FAILED)).toBe(true);
    const dir = await createControlDir(root, ID);
    const worker = new ControlDir({ path: dir });
    expect(isThawError(await rejection(worker.readyForCheckpoint([1] as never)), SdkErrorCode.INVALID_PAYLOAD)).toBe(true);
  });

  it('opt-in watch wakes the worker, however long the poll period', async () => {
    const dir = await createControlDir(root, ID);
    // The poll period is longer than the wait's timeout: only the watch can end this wait with the marker.
    const worker = new ControlDir({ path: dir, watch: true, pollIntervalMs: 60 * 60_000 });
    const waiting = worker.wait({ timeoutMs: 20_000 });
    setTimeout(() => void writeMarker(dir, 'restore-complete'), 50);
    expect(await waiting).toBe('restore-complete');
  });
});
