/**
 * Checks thaw's CUDA bindings (src/cuda) against a driver and a live CUDA process: every binding, the
 * state machine, the 13.0 restore-args layout with a real GPU pair, and what CUresult the driver returns
 * where the documentation does not say (a non-CUDA pid, a wrong state, a GPU map onto an absent GPU),
 * which is what the fake driver (native/fake-libcuda) should then return too.
 *
 * Run on the GPU machine by bench/gpu/check-real-driver.sh (which starts the victim, a PyTorch process
 * holding 1 GiB on the GPU and printing its checksum), and in CI against the fake driver
 * (test/unit/cuda-real-driver-check.test.ts). Each step is recorded, failed or not, in a JSON report.
 *
 *   node dist/bench/gpu/check-real-driver.js --pid PID [--victim-log FILE] [--libcuda PATH] [--nvml PATH] [--out FILE]
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import {
  CudaCheckpointApi,
  CudaError,
  checkpointCudaHooks,
  formatGpuUuid,
  gpuFacts,
  parseGpuUuid,
  tryLoadCuda,
  tryLoadNvml,
  type Nvml,
} from '../../src/cuda/index.js';

export interface DriverCheckOptions {
  pid: number;
  libcudaPath?: string;
  nvmlPath?: string;
  /** The victim's stdout: JSON lines {"sum": n, "expected": n}; checked for stalls while locked and resumption. */
  victimLog?: string;
  /**
   * A pid that is not a CUDA process (default: a `sleep` child started for the check). Not this process:
   * once it has called cuInit the driver counts it as a CUDA process too (seen on the H100, r580).
   */
  otherPid?: number;
  lockTimeoutMs?: number;
  /** How long the victim must stay silent while locked, and may take to resume after unlock. */
  stallCheckMs?: number;
  resumeTimeoutMs?: number;
}

export interface StepRecord {
  name: string;
  ok: boolean;
  ms?: number;
  detail?: unknown;
  error?: unknown;
}

export interface DriverCheckReport {
  ok: boolean;
  libcuda?: string;
  driverVersion?: number;
  facts?: unknown;
  steps: StepRecord[];
  /** What the driver answered where the docs are silent (to align the fake with). */
  observed: Record<string, unknown>;
}

const BOGUS_GPU = 'GPU-00000000-1111-2222-3333-444444444444';

function errorRecord(err: unknown): unknown {
  if (err instanceof CudaError) return { code: err.code, result: err.result, resultName: err.resultName, message: err.message };
  return { message: (err as Error)?.message ?? String(err) };
}

interface VictimProgress {
  lines: number;
  lastSum?: number;
  expected?: number;
}

function victimProgress(path: string): VictimProgress {
  let text = '';
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    return { lines: 0 };
  }
  const records = text
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => {
      try {
        return JSON.parse(l) as { sum?: number; expected?: number };
      } catch {
        return {};
      }
    });
  const last = records[records.length - 1];
  const out: VictimProgress = { lines: records.length };
  if (last?.sum !== undefined) out.lastSum = last.sum;
  const expected = records.find((r) => r.expected !== undefined)?.expected;
  if (expected !== undefined) out.expected = expected;
  return out;
}

export async function checkRealDriver(options: DriverCheckOptions): Promise<DriverCheckReport> {
  const report: DriverCheckReport = { ok: true, steps: [], observed: {} };
  const sleeper = options.otherPid === undefined ? spawn('sleep', ['600'], { stdio: 'ignore' }) : undefined;
  try {
    return await runChecks(options, report, options.otherPid ?? sleeper?.pid ?? 1);
  } finally {
    sleeper?.kill('SIGKILL');
  }
}

async function runChecks(options: DriverCheckOptions, report: DriverCheckReport, otherPid: number): Promise<DriverCheckReport> {
  const pid = options.pid;
  const lockTimeoutMs = options.lockTimeoutMs ?? 10_000;
  const stallCheckMs = options.stallCheckMs ?? 500;
  const resumeTimeoutMs = options.resumeTimeoutMs ?? 20_000;

  const step = async <T>(name: string, fn: () => Promise<T> | T, expectFailure = false): Promise<T | undefined> => {
    const started = performance.now();
    try {
      const detail = await fn();
      const rec: StepRecord = { name, ok: !expectFailure, ms: Math.round((performance.now() - started) * 10) / 10 };
      if (detail !== undefined) rec.detail = detail;
      if (expectFailure) rec.error = 'expected a failure, the call succeeded';
      report.steps.push(rec);
      if (!rec.ok) report.ok = false;
      return detail;
    } catch (err) {
      const rec: StepRecord = { name, ok: expectFailure, ms: Math.round((performance.now() - started) * 10) / 10, error: errorRecord(err) };
      report.steps.push(rec);
      if (!rec.ok) report.ok = false;
      return undefined;
    }
  };

  const loaded = tryLoadCuda(options.libcudaPath !== undefined ? { path: options.libcudaPath } : {});
  if (!loaded.ok) {
    report.ok = false;
    report.steps.push({ name: 'load libcuda', ok: false, error: errorRecord(loaded.error) });
    return report;
  }
  const driver = loaded.driver;
  report.libcuda = driver.path;
  report.driverVersion = driver.driverVersion;
  const nvmlLoaded = tryLoadNvml(options.nvmlPath !== undefined ? { path: options.nvmlPath } : {});
  const nvml: Nvml | undefined = nvmlLoaded.ok ? nvmlLoaded.nvml : undefined;
  if (!nvmlLoaded.ok) report.observed['nvml'] = errorRecord(nvmlLoaded.error);
  const api = new CudaCheckpointApi(driver);

  report.facts = await step('gpu facts', () => gpuFacts({ cuda: driver, nvml }));
  const uuid0 = await step('device 0 uuid', () => formatGpuUuid(driver.deviceUuid(driver.device(0))));
  const gpuMemOfVictim = (): number | undefined => nvml?.gpuMemoryByPid().get(pid);
  await step('nvml: victim GPU memory', () => ({ bytes: gpuMemOfVictim() }));

  const expectState = (want: string) => () => {
    const got = api.getState(pid);
    if (got !== want) throw new Error(`state ${got}, expected ${want}`);
    return got;
  };
  const victimStalls = async (): Promise<unknown> => {
    if (!options.victimLog) return 'no victim log';
    const before = victimProgress(options.victimLog).lines;
    await sleep(stallCheckMs);
    const after = victimProgress(options.victimLog).lines;
    // One line may have been computed before the lock took effect.
    if (after - before > 1) throw new Error(`victim printed ${after - before} lines while locked`);
    return { newLines: after - before };
  };
  const victimResumes = async (): Promise<unknown> => {
    if (!options.victimLog) return 'no victim log';
    const before = victimProgress(options.victimLog).lines;
    const deadline = Date.now() + resumeTimeoutMs;
    for (;;) {
      const now = victimProgress(options.victimLog);
      if (now.lines > before + 1) {
        if (now.expected !== undefined && now.lastSum !== now.expected) {
          throw new Error(`victim checksum ${now.lastSum}, expected ${now.expected}`);
        }
        return now;
      }
      if (Date.now() > deadline) throw new Error(`victim printed nothing for ${resumeTimeoutMs} ms after unlock`);
      await sleep(50);
    }
  };

  await step('findCudaProcesses finds the victim only', () => {
    const found = api.findCudaProcesses([pid, otherPid]);
    if (found.length !== 1 || found[0] !== pid) throw new Error(`found ${JSON.stringify(found)}`);
    return found;
  });
  await step('restore thread id', () => api.restoreThreadId(pid));
  await step('state running', expectState('running'));

  // What the driver says where the documentation is silent (recorded; the fake should say the same).
  const observe = async (key: string, fn: () => unknown): Promise<void> => {
    try {
      await fn();
      report.observed[key] = 'succeeded';
    } catch (err) {
      report.observed[key] = errorRecord(err);
    }
  };
  await observe('getState of a non-CUDA pid', () => api.getState(otherPid));
  await observe('getState of this process (it called cuInit)', () => api.getState(process.pid));
  await observe('restoreThreadId of a non-CUDA pid', () => api.restoreThreadId(otherPid));
  await observe('checkpoint of a running process', () => api.checkpoint(pid));
  await observe('unlock of a running process', () => api.unlock(pid));
  await step('state still running after the refused calls', expectState('running'));

  // Round 1: the plain cycle.
  await step('round 1: lock', () => api.lock(pid, { timeoutMs: lockTimeoutMs }));
  await step('round 1: state locked', expectState('locked'));
  await step('round 1: victim stalls while locked', victimStalls);
  await step('round 1: checkpoint', () => api.checkpoint(pid));
  await step('round 1: state checkpointed', expectState('checkpointed'));
  await step('round 1: nvml: victim GPU memory after checkpoint', () => ({ bytes: gpuMemOfVictim() }));
  await observe('lock of a checkpointed process', () => api.lock(pid, { timeoutMs: 1000 }));
  await step('round 1: restore', () => api.restore(pid));
  await step('round 1: state locked after restore', expectState('locked'));
  await step('round 1: unlock', () => api.unlock(pid));
  await step('round 1: state running', expectState('running'));
  await step('round 1: victim resumes with its checksum', victimResumes);

  // Round 2: a GPU pair through CUcheckpointRestoreArgs (identity: the only GPU we are sure exists).
  if (uuid0 !== undefined) {
    await step('round 2: lock', () => api.lock(pid, { timeoutMs: lockTimeoutMs }));
    await step('round 2: checkpoint', () => api.checkpoint(pid));
    const paired = await step('round 2: restore with an explicit identity GPU pair (13.0 args layout)', async () => {
      const u = parseGpuUuid(uuid0);
      await driver.checkpointRestore(pid, [{ oldUuid: u, newUuid: u }]);
      return true;
    });
    if (paired === undefined) await step('round 2: restore without a map after the paired one failed', () => api.restore(pid));
    await step('round 2: unlock', () => api.unlock(pid));
    await step('round 2: victim resumes', victimResumes);

    // Round 3: a map onto a GPU that does not exist must fail, and a plain restore must still work.
    await step('round 3: lock', () => api.lock(pid, { timeoutMs: lockTimeoutMs }));
    await step('round 3: checkpoint', () => api.checkpoint(pid));
    await observe('restore with a map onto an absent GPU', () => api.restore(pid, { gpuMap: [{ oldUuid: uuid0, newUuid: BOGUS_GPU }] }));
    try {
      report.observed['state after the refused restore'] = api.getState(pid);
    } catch (err) {
      report.observed['state after the refused restore'] = errorRecord(err);
    }
    await step('round 3: restore without a map', () => api.restore(pid));
    await step('round 3: unlock', () => api.unlock(pid));
    await step('round 3: victim resumes', victimResumes);
  }

  // Round 4: the engine's seam over a "tree" (the victim and a non-CUDA pid), with timings.
  const hooks = checkpointCudaHooks(api, { lockTimeoutMs });
  const signal = new AbortController().signal;
  await step('round 4: hooks lock', () => hooks.lock([pid, otherPid], signal));
  await step('round 4: hooks checkpoint', () => hooks.checkpoint([pid, otherPid], signal));
  await step('round 4: hooks restoreAndUnlock', () => hooks.restoreAndUnlock([pid, otherPid], signal));
  await step('round 4: timings', () => hooks.timings);
  await step('round 4: victim resumes', victimResumes);
  return report;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      pid: { type: 'string' },
      'victim-log': { type: 'string' },
      libcuda: { type: 'string' },
      nvml: { type: 'string' },
      out: { type: 'string' },
    },
  });
  if (!values.pid) throw new Error('--pid is required');
  const report = await checkRealDriver({
    pid: Number(values.pid),
    ...(values['victim-log'] ? { victimLog: values['victim-log'] } : {}),
    ...(values.libcuda ? { libcudaPath: values.libcuda } : {}),
    ...(values.nvml ? { nvmlPath: values.nvml } : {}),
  });
  const text = `${JSON.stringify(report, null, 2)}\n`;
  if (values.out) writeFileSync(values.out, text);
  process.stdout.write(text);
  process.exitCode = report.ok ? 0 : 1;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main().catch((err: unknown) => {
    process.stderr.write(`check-real-driver: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 2;
  });
}
