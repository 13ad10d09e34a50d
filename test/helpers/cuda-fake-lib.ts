/**
 * Test helpers for the fake CUDA driver and NVML (native/fake-libcuda): build them with make (a build
 * failure fails the test), their paths, the fake-only introspection calls, and the env the fake reads.
 */
import { execFileSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import koffi from 'koffi';

export const FAKE_DIR = resolve(import.meta.dirname, '../../native/fake-libcuda');
export const FAKE_LIBCUDA = join(FAKE_DIR, 'build/libcuda.so.1');
export const FAKE_NVML = join(FAKE_DIR, 'build/libnvidia-ml.so.1');
/** The fake's default GPU (fake-common.h FAKE_DEFAULT_UUID). */
export const FAKE_GPU = 'GPU-6a2f0c1e-0b4d-4c55-9e1a-7f00d1ce0001';
export const OTHER_GPU = 'GPU-0b9e8d7c-6b5a-4948-8776-655443322110';

export function buildFakeLibraries(): void {
  execFileSync('make', ['-s', '-C', FAKE_DIR], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 60_000 });
}

const FAKE_ENV = [
  'FAKE_CUDA_CONTROL_FILE',
  'FAKE_CUDA_GPUS',
  'FAKE_CUDA_GPU_NAME',
  'FAKE_CUDA_TOTAL_MEM',
  'FAKE_CUDA_DRIVER_VERSION',
  'FAKE_CUDA_PIDS',
  'FAKE_CUDA_PIDS_FILE',
  'FAKE_CUDA_FAIL',
  'FAKE_CUDA_DELAY_MS',
  'FAKE_NVML_USED_BYTES',
  'FAKE_NVML_DRIVER_VERSION',
  'FAKE_CUDA_STATE_DIR',
  'FAKE_CUDA_PID_GPU',
  'FAKE_CUDA_COLLECTIVE',
] as const;

/** Sets the fake's settings for this test (the fake reads them at every call); `undefined` unsets. */
export function setFakeEnv(values: Partial<Record<(typeof FAKE_ENV)[number], string | undefined>>): void {
  for (const [k, v] of Object.entries(values)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
}

export function clearFakeEnv(): void {
  for (const k of FAKE_ENV) delete process.env[k];
}

/** The fake-only calls (not in the real driver): what the last calls received, and a state reset. */
export interface FakeIntrospection {
  reset(): void;
  lastLockTimeoutMs(): number;
  /** The GPU pairs of the last successful restore as [oldHex, newHex]; null when none has run. */
  lastRestorePairs(): Array<[string, string]> | null;
}

export function fakeIntrospection(): FakeIntrospection {
  const lib = koffi.load(FAKE_LIBCUDA);
  const reset = lib.func('fakeCudaReset', 'void', []);
  const lastLock = lib.func('fakeCudaLastLockTimeoutMs', 'uint32_t', []);
  const lastPairs = lib.func('fakeCudaLastRestorePairs', 'int', ['void *', 'int']);
  return {
    reset: () => reset(),
    lastLockTimeoutMs: () => lastLock() as number,
    lastRestorePairs: () => {
      const buf = Buffer.alloc(32 * 16);
      const n = lastPairs(buf, 16) as number;
      if (n < 0) return null;
      return Array.from({ length: n }, (_, i) => [
        buf.subarray(32 * i, 32 * i + 16).toString('hex'),
        buf.subarray(32 * i + 16, 32 * i + 32).toString('hex'),
      ]);
    },
  };
}

/**
 * Token mode (fake-common.h): the environment that makes a process a CUDA process to a fake running with
 * FAKE_CUDA_STATE_DIR set. FAKE_CUDA_STATE is the one-digit slot the fake keeps the process's state in.
 */
export function fakeTokenEnv(token: string): Record<string, string> {
  return { FAKE_CUDA_TOKEN: token, FAKE_CUDA_STATE: '0' };
}

/** One line of <FAKE_CUDA_STATE_DIR>/calls.log. */
export interface FakeCall {
  op: 'lock' | 'checkpoint' | 'restore' | 'unlock';
  token: string;
  pid: number;
  result: string;
  pairs?: number;
}

export async function readFakeCalls(stateDir: string, token?: string): Promise<FakeCall[]> {
  const text = await readFile(join(stateDir, 'calls.log'), 'utf8').catch(() => '');
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const [op, tok, pid, result, pairs] = l.split(' ');
      return {
        op: op as FakeCall['op'],
        token: tok ?? '',
        pid: Number(pid),
        result: result ?? '',
        ...(pairs !== undefined ? { pairs: Number(pairs.replace('pairs=', '')) } : {}),
      };
    })
    .filter((c) => token === undefined || c.token === token);
}

/** The state digit the fake keeps in a token process (0 running, 1 locked, 2 checkpointed). */
export async function fakeTokenState(pid: number): Promise<number | undefined> {
  const env = await readFile(`/proc/${pid}/environ`, 'utf8');
  const kv = env.split('\0').find((e) => e.startsWith('FAKE_CUDA_STATE='));
  return kv === undefined ? undefined : Number(kv.slice('FAKE_CUDA_STATE='.length));
}
