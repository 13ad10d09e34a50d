/**
 * sdk/python/thaw_cuda.py: its stdlib unittest module (sdk/python/test_thaw_cuda.py), run against the
 * fake CUDA driver through ctypes - the pool's reserve/map/release/remap logic without a GPU.
 */
import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildFakeLibraries } from '../helpers/cuda-fake-lib.js';

const SDK_DIR = resolve(import.meta.dirname, '../../sdk/python');
const PY_TIMEOUT_MS = 30_000;
const run = promisify(execFile);

beforeAll(() => buildFakeLibraries());

describe('sdk/python/thaw_cuda.py', () => {
  it('passes its unittest module (python3 -m unittest test_thaw_cuda)', async () => {
    const result = await run('python3', ['-m', 'unittest', '-v', 'test_thaw_cuda'], {
      cwd: SDK_DIR,
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
      timeout: PY_TIMEOUT_MS,
    }).catch((err: { code?: number; stdout?: string; stderr?: string }) => {
      throw new Error(`python3 -m unittest test_thaw_cuda failed (exit ${err.code}):\n${err.stderr}\n${err.stdout}`);
    });
    expect(result.stderr).toMatch(/\nOK( \(skipped=\d+\))?\n?$/);
  });

  it('imports without PyTorch, vLLM or SGLang', async () => {
    const { stdout } = await run('python3', ['-c', 'import sys, thaw_cuda; print(sorted(m for m in ("torch", "vllm", "sglang") if m in sys.modules))'], {
      cwd: SDK_DIR,
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
      timeout: PY_TIMEOUT_MS,
    });
    expect(stdout.trim()).toBe('[]');
  });
});
