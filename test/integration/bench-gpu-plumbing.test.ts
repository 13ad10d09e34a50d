/**
 * bench:gpu's plumbing on a machine without a GPU: bench/gpu/product.ts with BENCH_GPU_STANDIN=1 runs the same
 * pods, mounts, checkpoint and restores with a CPU stand-in worker (bench/gpu/standin-worker.py) that speaks the
 * GPU worker's protocols. The GPU numbers come from the H100 (bench/gpu/README.md); this keeps the script that
 * produces them working between GPU runs. Only outcomes are checked — never times.
 */
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { PACKAGE_ROOT, ensureBuilt } from '../../src/node-stack/thaw-plugin-process.js';
import { flavorsUnderTest } from '../helpers/stack.js';

const execFileP = promisify(execFile);
const RUN_TIMEOUT_MS = 240_000;

describe.each(flavorsUnderTest())('bench:gpu with the stand-in worker, containerd %s', (flavor) => {
  const dirs: string[] = [];
  afterAll(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  it('cold start, checkpoint, two rounds of restores warm and cold: every restore restored, same tokens, JSON written', async () => {
    ensureBuilt();
    const results = await mkdtemp('/tmp/thaw-bench-gpu-test-');
    dirs.push(results);
    const { stdout } = await execFileP(process.execPath, [path.join(PACKAGE_ROOT, 'dist/bench/gpu/product.js')], {
      env: { ...process.env, BENCH_GPU_STANDIN: '1', BENCH_GPU_VARIANTS: 'released', BENCH_GPU_RESTORES: '2', BENCH_GPU_RESULTS_DIR: results, BENCH_GPU_PORT: '18181', THAW_CONTAINERD: flavor, OUT: '' },
      timeout: RUN_TIMEOUT_MS,
      maxBuffer: 16 * 2 ** 20,
    });
    const last = stdout.trim().split('\n').pop() ?? '';
    const summary = JSON.parse(last) as { standin: boolean; tokensMatch: boolean; variants: Array<{ variant: string; restoreWarmOutcome: string; restoreColdOutcome: string; checkpointBytes: number; liveBytes: number | null; restoreWarmSamplesMs: number[]; restoreColdSamplesMs: number[]; restoreWarmTimeline: unknown; restoreWarmPhases: unknown }> };
    expect(summary.standin).toBe(true);
    expect(summary.variants.map((v) => [v.variant, v.restoreWarmOutcome, v.restoreColdOutcome])).toEqual([['released', 'restored', 'restored']]);
    expect(summary.tokensMatch).toBe(true);
    // Two rounds of restores, every sample kept beside the median.
    expect([summary.variants[0]?.restoreWarmSamplesMs.length, summary.variants[0]?.restoreColdSamplesMs.length]).toEqual([2, 2]);
    // Where a restore's time goes outside the engine, and the hook's own start.
    const { afterRestore, memory, memoryFill, disk, ...timeline } = summary.variants[0]?.restoreWarmTimeline as Record<string, number> & { afterRestore: Record<string, number>; memory: Record<string, number | undefined>; memoryFill: unknown; disk: { readMB: number[]; busyPct: number[] } };
    // thaw-fill's account (or null with CRIU's fill) and the disks' timeline, one busy share per bin of reads.
    expect(memoryFill === null || typeof memoryFill === 'object').toBe(true);
    expect(disk.readMB.length).toBe(disk.busyPct.length);
    expect(Object.keys(timeline).sort()).toEqual(['createMs', 'restoreEventToReadyMs', 'runPodSandboxMs', 'startMs', 'startToRestoreEventMs']);
    expect(Object.values(timeline).every((ms) => Number.isFinite(ms) && ms >= 0)).toBe(true);
    // After the restore event: thaw-pause's adoption from the pod's log, and the restored worker's memory read at ready.
    expect(typeof afterRestore['adopted']).toBe('number');
    expect(memory['anonBytes']).toBeGreaterThan(0);
    expect(memory['thpEligibleAnonBytes']).toBeGreaterThanOrEqual(0);
    // The hook's start is measured (the native hook's parse and connect round to 0 ms at times: present, not positive).
    const hookStartupMs = (summary.variants[0]?.restoreWarmPhases as Record<string, number>).hookStartupMs;
    expect([typeof hookStartupMs, Number.isFinite(hookStartupMs) && (hookStartupMs as number) >= 0]).toEqual(['number', true]);
    expect(summary.variants[0]?.checkpointBytes).toBeGreaterThan(0);
    expect(summary.variants[0]?.liveBytes).toBeGreaterThan(0);
    const files = readdirSync(results);
    expect(files).toHaveLength(1);
    expect(JSON.parse(await readFile(path.join(results, files[0] as string), 'utf8'))).toMatchObject({ bench: 'gpu', standin: true, tokensMatch: true });
  }, RUN_TIMEOUT_MS + 30_000);

  it('BENCH_GPU_MODELS: one run and one JSON per model, with the fields of issue 14', async () => {
    ensureBuilt();
    const results = await mkdtemp('/tmp/thaw-bench-gpu-test-');
    dirs.push(results);
    const { stdout } = await execFileP(process.execPath, [path.join(PACKAGE_ROOT, 'dist/bench/gpu/product.js')], {
      env: { ...process.env, BENCH_GPU_STANDIN: '1', BENCH_GPU_MODELS: 'qwen3-0.6b,qwen3-4b', BENCH_GPU_WEIGHTS: 'vmm', BENCH_GPU_VARIANTS: 'released', BENCH_GPU_RESTORES: '1', BENCH_GPU_RESULTS_DIR: results, BENCH_GPU_PORT: '18183', THAW_CONTAINERD: flavor, OUT: '' },
      timeout: RUN_TIMEOUT_MS,
      maxBuffer: 16 * 2 ** 20,
    });
    const lines = stdout.trim().split('\n').filter((l) => l.startsWith('{"bench":"gpu"'));
    const summaries = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(summaries.map((x) => [x['model'], x['paramsB']])).toEqual([['qwen3-0.6b', 0.596], ['qwen3-4b', 4.022]]);
    for (const x of summaries) {
      for (const k of ['model', 'paramsB', 'weightsBytes', 'weightsOutside', 'coldStartMs', 'restoreWarmMs', 'restoreColdMs', 'checkpointBytes', 'checkpointMs', 'tokensMatch', 'transparentHugePages', 'phases']) expect(x, k).toHaveProperty(k);
      // The stand-in's "weights" are in its memory: thaw loads nothing beside the restore, and says so.
      expect([x['weightsOutside'], x['tokensMatch']]).toEqual([false, true]);
      expect((x['variants'] as Array<{ variant: string; weights: string }>).map((v) => [v.variant, v.weights])).toEqual([['released-vmm', 'vmm']]);
    }
    expect(readdirSync(results).sort().map((f) => f.replace(/-\d{4}-.*$/, ''))).toEqual(['gpu-qwen3-0.6b', 'gpu-qwen3-4b']);
  }, 2 * RUN_TIMEOUT_MS + 30_000);

  it('BENCH_GPU_TP=2: a worker of two rank processes is checkpointed in one dump and restored as a set, same tokens from both ranks', async () => {
    ensureBuilt();
    const results = await mkdtemp('/tmp/thaw-bench-gpu-test-');
    dirs.push(results);
    const { stdout } = await execFileP(process.execPath, [path.join(PACKAGE_ROOT, 'dist/bench/gpu/product.js')], {
      env: { ...process.env, BENCH_GPU_STANDIN: '1', BENCH_GPU_TP: '2', BENCH_GPU_VARIANTS: 'released', BENCH_GPU_RESTORES: '1', BENCH_GPU_RESULTS_DIR: results, BENCH_GPU_PORT: '18182', THAW_CONTAINERD: flavor, OUT: '' },
      timeout: RUN_TIMEOUT_MS,
      maxBuffer: 16 * 2 ** 20,
    });
    const summary = JSON.parse(stdout.trim().split('\n').pop() ?? '') as { tensorParallel: number; tokensMatch: boolean; coldStartMs: number; variants: Array<{ tensorParallel: number; restoreWarmOutcome: string; restoreColdOutcome: string }> };
    expect(summary.tensorParallel).toBe(2);
    expect(summary.variants.map((v) => [v.tensorParallel, v.restoreWarmOutcome, v.restoreColdOutcome])).toEqual([[2, 'restored', 'restored']]);
    // The stand-in's tokens hash every rank's memory as each rank reports it after resuming: a rank lost or
    // restored wrong answers differently (or the worker never gets ready).
    expect(summary.tokensMatch).toBe(true);
    expect(Number.isFinite(summary.coldStartMs)).toBe(true);
  }, RUN_TIMEOUT_MS + 30_000);
});
