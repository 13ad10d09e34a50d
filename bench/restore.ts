/**
 * npm run bench:restore — cold start vs thaw restore of the demo worker at several memory sizes.
 *
 * For each size, in one run on one private containerd with the thaw plugin: the cold start of a worker pod to
 * serving; its checkpoint (time, size against the worker's live memory); a restore into a new pod with the
 * checkpoint in the page cache, and another after the page cache was dropped. The machine's own read rates
 * (page cache and disk, one stream, 8 MiB reads) are measured in the same run, and restore throughput is set
 * against them. Last line: one JSON object with an entry per size.
 *
 * Env: BENCH_SIZES_MB (default "256,1024,4096"), BENCH_WARMUP_MS (the worker's minimum warm-up, default 1000),
 * THAW_CONTAINERD (1.7 | 2.1).
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { cleanupStaleStacks } from '../src/node-stack/index.js';
import { startNodeStack, type NodeStack } from '../src/node-stack/index.js';
import { parseFlavor } from '../src/node-stack/index.js';
import { pluginDirsUnder, startThawPluginProcess, waitForLog, type LogRecord, type ThawPluginProcess } from '../src/node-stack/index.js';
import { buildWorkerImage } from '../demo/worker-image.js';
import { expectedDigest } from '../demo/worker/memory.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerState } from '../demo/scenario.js';
import { dropPageCache } from './page-cache.js';
import { renderTable } from '../src/table.js';

const WRITE_CHUNK_BYTES = 8 * 2 ** 20;
const PROBE_FILE_BYTES = 1024 * 2 ** 20;
const GB = 1e9;

/**
 * Reads a file once with dd (8 MiB blocks, one stream: the tool the GPU baseline used) and returns GB/s.
 * dd rather than Node's reader, so the reference rate is the machine's and not our runtime's.
 */
function readRateGBps(path: string, bytes: number): number {
  const t0 = performance.now();
  execFileSync('dd', [`if=${path}`, 'of=/dev/null', 'bs=8M'], { stdio: 'ignore' });
  return bytes / GB / ((performance.now() - t0) / 1000);
}

/**
 * The page cache read into memory never touched before, in a child process of its own (one pread per 64 MiB into
 * a fresh 1 GiB allocation, like CRIU's restorer reading pages-*.img into the VMAs it has just mapped). dd's rate
 * reuses one 8 MiB buffer, so it leaves out the cost of faulting in fresh memory, which on these VMs (free page
 * reporting gives freed guest memory back to the host) is most of a restore's memory fill.
 */
function freshFillGBps(path: string): number {
  const script = `const fs=require('node:fs');const fd=fs.openSync(process.argv[1],'r');const n=fs.fstatSync(fd).size;` +
    `const b=Buffer.allocUnsafeSlow(n);const t=performance.now();for(let o=0;o<n;){o+=fs.readSync(fd,b,o,Math.min(n-o,${64 * 2 ** 20}),o);}` +
    `process.stdout.write(String(n/1e9/((performance.now()-t)/1000)));`;
  return Number(execFileSync(process.execPath, ['-e', script, path], { encoding: 'utf8' }));
}

/** The machine's read rates on the filesystem that holds the store: disk (cache dropped) and page cache. */
async function measureReadRates(dir: string): Promise<{ diskGBps: number; pageCacheGBps: number; freshFillGBps: number }> {
  const path = join(dir, 'read-probe.bin');
  const handle = await open(path, 'w', 0o600);
  const chunk = randomFillSync(Buffer.allocUnsafe(WRITE_CHUNK_BYTES));
  for (let written = 0; written < PROBE_FILE_BYTES; written += chunk.length) await handle.write(chunk);
  await handle.sync();
  await handle.close();
  await dropPageCache();
  const diskGBps = readRateGBps(path, PROBE_FILE_BYTES);
  readRateGBps(path, PROBE_FILE_BYTES); // make sure every page is cached
  const pageCacheGBps = readRateGBps(path, PROBE_FILE_BYTES);
  const fresh = freshFillGBps(path);
  await rm(path, { force: true });
  return { diskGBps: round(diskGBps, 2), pageCacheGBps: round(pageCacheGBps, 2), freshFillGBps: round(fresh, 2) };
}

const round = (v: number, digits = 0): number => Number(v.toFixed(digits));

interface SizeResult {
  memoryMb: number;
  coldStartMs: number;
  checkpointMs: number;
  checkpointBytes: number;
  liveBytes: number | null;
  checkpointOverLive: number | null;
  restoreWarmMs: number;
  restoreColdMs: number;
  restoreWarmEngineMs: number;
  restoreColdEngineMs: number;
  restoreWarmPhases: unknown;
  restoreColdPhases: unknown;
  speedupWarm: number;
  speedupCold: number;
  /** Checkpoint bytes over the engine's warm restore time (restore start → restore-complete). */
  restoreGBps: number;
  stateVerified: boolean;
}

async function main(): Promise<void> {
  const sizes = (process.env['BENCH_SIZES_MB'] ?? '256,1024,4096').split(',').map((s) => Number(s.trim())).filter((n) => n > 0);
  const warmupMs = Number(process.env['BENCH_WARMUP_MS'] ?? 1000);
  const flavor = parseFlavor((process.env['THAW_CONTAINERD'] ?? '1.7').split(',')[0] ?? '1.7');
  const say = (line: string): void => void process.stderr.write(`bench:restore: ${line}\n`);

  await cleanupStaleStacks();
  const workDir = await mkdtemp(join(tmpdir(), 'thaw-bench-restore-'));
  let stack: NodeStack | undefined;
  let plugin: ThawPluginProcess | undefined;
  const results: SizeResult[] = [];
  let rates = { diskGBps: Number.NaN, pageCacheGBps: Number.NaN, freshFillGBps: Number.NaN };
  try {
    stack = await startNodeStack({ flavor });
    const image = await buildWorkerImage(stack);
    const logFile = join(workDir, 'thaw.log');
    const dirs = pluginDirsUnder(workDir, stack.paths.prefix, logFile);
    plugin = startThawPluginProcess({ socketPath: stack.nriSocketPath, containerd: { socket: stack.address, root: stack.rootDir }, ...dirs, extraArgs: ['--log-level', 'info'] });
    await waitForLog(logFile, (r) => r.msg === 'nri plugin synchronized', 'the thaw plugin to register');
    rates = await measureReadRates(workDir);
    say(`read rates here: disk ${rates.diskGBps} GB/s, page cache ${rates.pageCacheGBps} GB/s, page cache into fresh memory ${rates.freshFillGBps} GB/s`);

    for (const memoryMb of sizes) {
      const name = `bench-${memoryMb}`;
      const seed = memoryMb;
      const common = { image: image.ref, memoryMb, seed, warmupMs };
      say(`${memoryMb} MB: cold start`);
      const source = await runWorkerPod(stack, dirs.controlRoot, { ...common, name: `${name}-src`, annotations: { 'thaw.dev/checkpoint': name }, checkpointAfterMs: 500 });
      await waitForServingWorker(source.controlDir, { timeoutMs: 600_000 });
      const coldStartMs = Date.now() - source.startedAt;
      const event = await waitForLog(logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${name}`, 'the checkpoint', 600_000);
      if (event['outcome'] !== 'succeeded') throw new Error(`checkpoint of ${memoryMb} MB failed: ${JSON.stringify(event)}`);
      const phases = event['phases'] as { totalMs: number };
      const checkpointBytes = Number(event['bytes']);
      const manifest = (await readManifest(dirs.storeRoot, name)) as { totals: { liveBytes?: number } };
      await stack.cri.removePod(source.podId);

      const restoreOnce = async (label: string): Promise<{ ms: number; event: LogRecord; state?: WorkerState }> => {
        say(`${memoryMb} MB: restore, page cache ${label}`);
        const target = await runWorkerPod(stack!, dirs.controlRoot, { ...common, name: `${name}-${label}`, annotations: { 'thaw.dev/restore': name } });
        const endpoint = await waitForServingWorker(target.controlDir, { accept: (e) => e.restored, timeoutMs: 600_000 });
        const ms = Date.now() - target.startedAt;
        const restoreEvent = await waitForLog(logFile, (r) => r['event'] === 'restore' && r['containerId'] === target.containerId, 'the restore event', 30_000);
        const state = label === 'warm' ? await getJson<WorkerState>(endpoint.port, '/state', 120_000) : undefined;
        await stack!.cri.removePod(target.podId);
        return { ms, event: restoreEvent, ...(state ? { state } : {}) };
      };
      const warm = await restoreOnce('warm');
      await dropPageCache();
      const cold = await restoreOnce('cold');
      const engineMs = (e: LogRecord): number => Number((e['phases'] as { totalMs?: number } | undefined)?.totalMs ?? Number.NaN);
      const liveBytes = manifest.totals.liveBytes ?? null;
      results.push({
        memoryMb,
        coldStartMs,
        checkpointMs: Math.round(phases.totalMs),
        checkpointBytes,
        liveBytes,
        checkpointOverLive: liveBytes ? round(checkpointBytes / liveBytes, 3) : null,
        restoreWarmMs: warm.ms,
        restoreColdMs: cold.ms,
        restoreWarmEngineMs: Math.round(engineMs(warm.event)),
        restoreColdEngineMs: Math.round(engineMs(cold.event)),
        restoreWarmPhases: warm.event['phases'],
        restoreColdPhases: cold.event['phases'],
        speedupWarm: round(coldStartMs / warm.ms, 2),
        speedupCold: round(coldStartMs / cold.ms, 2),
        restoreGBps: round(checkpointBytes / GB / (engineMs(warm.event) / 1000), 3),
        stateVerified: warm.event['outcome'] === 'restored' && cold.event['outcome'] === 'restored' && warm.state?.digest === expectedDigest(memoryMb, seed) && warm.state.restored,
      });
      await rm(join(dirs.storeRoot, 'default', name), { recursive: true, force: true });
    }
  } finally {
    await plugin?.stop();
    await stack?.stop();
    await rm(workDir, { recursive: true, force: true });
  }

  process.stdout.write(
    renderTable(
      ['MB', 'cold start ms', 'checkpoint ms', 'ckpt/live', 'restore warm ms', 'restore cold ms', 'speedup warm', 'restore GB/s', 'verified'],
      results.map((r) => [r.memoryMb, r.coldStartMs, r.checkpointMs, r.checkpointOverLive ?? '-', r.restoreWarmMs, r.restoreColdMs, r.speedupWarm, r.restoreGBps, String(r.stateVerified)]),
      { rule: true },
    ),
  );
  process.stdout.write(`machine read rates in this run: page cache ${rates.pageCacheGBps} GB/s, disk ${rates.diskGBps} GB/s; restore / page cache: ${results.map((r) => round(r.restoreGBps / rates.pageCacheGBps, 3)).join(', ')}; page cache into fresh memory ${rates.freshFillGBps} GB/s, restore / that: ${results.map((r) => round(r.restoreGBps / rates.freshFillGBps, 3)).join(', ')}\n`);
  const entries = results.map((r) => ({ ...r, pageCacheGBps: rates.pageCacheGBps, diskGBps: rates.diskGBps, freshFillGBps: rates.freshFillGBps, restoreOverFreshFill: round(r.restoreGBps / rates.freshFillGBps, 3) }));
  process.stdout.write(`${JSON.stringify({ bench: 'restore', cpus: cpus().length, cpuModel: cpus()[0]?.model ?? 'unknown', containerd: stack?.containerdVersion, sizes: entries })}\n`);
}

async function readManifest(storeRoot: string, name: string): Promise<unknown> {
  return JSON.parse(await readFile(join(storeRoot, 'default', name, 'manifest.json'), 'utf8'));
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:restore failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
