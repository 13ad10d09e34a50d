/**
 * The Python worker SDK (sdk/python/thaw_worker.py): its own unittest module, and real Python worker
 * processes talking to the TypeScript agent side (src/sdk/control-dir.ts) through a real directory.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createControlDir, readReadyPayload, waitForWorkerReady, writeMarker } from '../../src/sdk/control-dir.js';
import * as protocol from '../../src/sdk/protocol.js';

const SDK_DIR = resolve(import.meta.dirname, '../../sdk/python');
const PY_TIMEOUT_MS = 30_000;
const run = promisify(execFile);

interface PyResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a Python script with the SDK importable and the control dir in SNAPSHOT_CONTROL_DIR. */
function python(script: string, controlDir: string): Promise<PyResult> {
  return new Promise((res, rej) => {
    const child = spawn('python3', ['-c', script], {
      cwd: SDK_DIR,
      env: { ...process.env, PYTHONPATH: SDK_DIR, SNAPSHOT_CONTROL_DIR: controlDir, PYTHONDONTWRITEBYTECODE: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: PY_TIMEOUT_MS,
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', rej);
    child.on('close', (code) => res({ code, stdout, stderr }));
  });
}

let root: string;
beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'thaw-py-'));
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('sdk/python', () => {
  it('passes its unittest module (python3 -m unittest test_thaw_worker)', async () => {
    const result = await run('python3', ['-m', 'unittest', 'test_thaw_worker'], {
      cwd: SDK_DIR,
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
      timeout: PY_TIMEOUT_MS,
    }).catch((err: { code?: number; stdout?: string; stderr?: string }) => {
      throw new Error(`python3 -m unittest failed (exit ${err.code}):\n${err.stderr}\n${err.stdout}`);
    });
    expect(result.stderr).toMatch(/\nOK\n?$/);
  });

  it('uses the same names as src/sdk/protocol.ts', async () => {
    const { stdout } = await python(
      `import json, thaw_worker as t
names = {k: getattr(t, k) for k in ["CONTROL_DIR_ENV", "LEGACY_CONTROL_DIR_ENV", "DEFAULT_CONTROL_DIR",
  "READY_FOR_CHECKPOINT", "READY_FOR_SNAPSHOT", "CHECKPOINT_COMPLETE", "SNAPSHOT_COMPLETE", "RESTORE_COMPLETE",
  "RESTORE_FAILED", "TEMP_PREFIX"]}
names["POLL_INTERVAL_MS"] = round(t.POLL_INTERVAL_S * 1000)
print(json.dumps(names))`,
      root,
    );
    const py = JSON.parse(stdout) as Record<string, unknown>;
    const ts: Record<string, unknown> = { ...protocol };
    for (const [name, value] of Object.entries(py)) expect({ name, value: ts[name] }).toEqual({ name, value });
  });

  it('a Python worker (checkpoint_and_wait) is told restore-complete by the TS agent side', async () => {
    const dir = await createControlDir(root, 'py-worker');
    const worker = python(
      `import thaw_worker as t
out = t.checkpoint_and_wait(release=lambda: print("release", flush=True), resume=lambda: print("resume", flush=True),
                            timeout_s=20, payload={"framework": "vllm"})
print(out.value, t.ControlDir().was_restored(), t.ControlDir().payload(out)["node"])`,
      dir,
    );
    expect(await waitForWorkerReady(dir, { timeoutMs: 20_000 })).toBe('ready-for-checkpoint');
    expect(await readReadyPayload(dir, 'ready-for-checkpoint')).toEqual({ framework: 'vllm' });
    await writeMarker(dir, 'restore-complete', { node: 'n1' });
    const result = await worker;
    expect(result).toEqual({ code: 0, stdout: 'release\nresume\nrestore-complete True n1\n', stderr: '' });
  });

  it('a Python worker waiting with inotify wakes on the agent\'s atomic write (rename)', async () => {
    const dir = await createControlDir(root, 'py-inotify');
    const worker = python(
      `import time, thaw_worker as t
cd = t.ControlDir(poll_interval_s=60, use_inotify=True)
cd.ready_for_checkpoint()
t0 = time.monotonic()
out = cd.wait(timeout_s=20)
print(out.value, time.monotonic() - t0 < 10)`,
      dir,
    );
    await waitForWorkerReady(dir, { timeoutMs: 20_000 });
    await writeMarker(dir, 'checkpoint-complete');
    expect(await worker).toMatchObject({ code: 0, stdout: 'checkpoint-complete True\n' });
  });

  it('a Python worker told restore-failed does not resume', async () => {
    const dir = await createControlDir(root, 'py-failed');
    const worker = python(
      `import thaw_worker as t
out = t.checkpoint_and_wait(resume=lambda: print("resume"), timeout_s=20)
print(out.value, t.ControlDir().payload(out))`,
      dir,
    );
    await waitForWorkerReady(dir, { timeoutMs: 20_000 });
    await writeMarker(dir, 'restore-failed', { reason: 'driver mismatch' });
    expect(await worker).toMatchObject({ code: 0, stdout: "restore-failed {'reason': 'driver mismatch'}\n" });
  });

  it('a Dynamo-style worker (ready-for-snapshot, waits for snapshot-complete; no SDK) works against the agent side', async () => {
    const dir = await createControlDir(root, 'dynamo');
    // What Dynamo's checkpoint.py does: write the ready file, poll every 0.1 s for its completion names.
    const worker = python(
      `import os, time
d = os.environ["SNAPSHOT_CONTROL_DIR"]
open(os.path.join(d, "ready-for-snapshot"), "w").close()
while not any(os.path.exists(os.path.join(d, n)) for n in ("snapshot-complete", "restore-complete")):
    time.sleep(0.1)
print("snapshot-complete" if os.path.exists(os.path.join(d, "snapshot-complete")) else "restore-complete")`,
      dir,
    );
    expect(await waitForWorkerReady(dir, { timeoutMs: 20_000 })).toBe('ready-for-snapshot');
    await writeMarker(dir, 'checkpoint-complete');
    expect(await worker).toMatchObject({ code: 0, stdout: 'snapshot-complete\n' });
  });

  it('the Python SDK accepts snapshot-complete written by a Dynamo agent', async () => {
    const dir = await createControlDir(root, 'dynamo-agent');
    const worker = python(
      `import os, threading, time, thaw_worker as t
d = t.ControlDir()
threading.Timer(0.2, lambda: open(os.path.join(d.path, "snapshot-complete"), "w").close()).start()
print(d.wait(timeout_s=10).value)`,
      dir,
    );
    expect(await worker).toMatchObject({ code: 0, stdout: 'checkpoint-complete\n' });
  });
});
