/**
 * npm run bench:gpu — the GPU reference worker (bench/gpu/worker.py) through the whole product, on a GPU node.
 *
 * One run, one private containerd with thaw's plugin (the same process the demo and the tests run), GPU pods
 * created through CRI (the /dev/nvidia* devices; the host's /usr, Python packages and driver libraries
 * bind-mounted read-only, so the image itself stays a few kilobytes):
 *   1. cold start of a plain worker pod (no thaw annotation) with the page cache dropped, then again warm;
 *   2. for each variant — `released` (the worker frees its KV pool before the checkpoint; default pool of
 *      --kv-fraction of free memory) and `kept` (the pool stays mapped; BENCH_GPU_KEPT_KV_GIB, default 16,
 *      since a checkpoint of a 62 GiB pool would not fit this machine's 64 GiB disk) — a source pod that thaw
 *      checkpoints when the worker asks, a restore into a new pod with the checkpoint in the page cache, and
 *      another after the page cache was dropped. Ready = the worker answers /healthz; a restore counts only
 *      when thaw's restore event says `restored` and the worker says so. Tokens of the fixed prompt from every
 *      restored worker are compared with those the source printed before its checkpoint. Each restore's timeline
 *      carries thaw-fill's account (memoryFill) and what the whole disks read and how busy they were, in 50 ms bins
 *      from the pod's creation to ready (disk, bench/disk-activity.ts).
 * Prints a table and ratios; last line one JSON object; the same JSON goes to bench/results/ (and $OUT).
 *
 * Env: BENCH_GPU_VARIANTS (released,kept), BENCH_GPU_KEPT_KV_GIB (16), BENCH_GPU_PORT (18080),
 * BENCH_GPU_PYTHON (python3), BENCH_GPU_WORKER_ARGS (extra worker flags, e.g. "--kv-gib 8"), BENCH_GPU_AGENT_ARGS (extra
 * agent flags, e.g. "--weights-readers 2": the JSON records them as agentArgs), THAW_WEIGHTS_DIR,
 * BENCH_GPU_RESULTS_DIR (bench/results), THAW_CONTAINERD (1.7 | 2.1),
 * BENCH_GPU_TP (1; N > 1: every pod runs the worker at tensor parallelism N, one process per GPU, and the
 * variant `released-tp1` is the same model on one GPU, for the ratio in the same run), BENCH_GPU_SHAPE
 * (0.6b | 8b: the Qwen3 shape; weights default to /tmp/thaw-qwen3-<shape>-random),
 * BENCH_GPU_MODELS (qwen3-0.6b,qwen3-4b,qwen3-8b,qwen3-14b: one run per model, each with its own stack, its
 * weights in /tmp/thaw-<model>-random unless THAW_WEIGHTS_DIR, and its own JSON in bench/results/; unset: the
 * BENCH_GPU_SHAPE run as before), BENCH_GPU_WEIGHTS (vmm,torch: each variant once per weights mode, the worker's
 * --weights; vmm = the SDK's WeightsRegion, outside the checkpoint; unset: the worker's default, torch),
 * BENCH_GPU_FILL_BASELINE=1 (after each variant's restores, the same restores with the agent restarted with
 * restore.memoryFill criu: JSON gains criuFill and restoreWarmOverCriuFill), BENCH_GPU_DROP_WEIGHTS=1 (remove a model's weights dir after its run: the 64 GiB disk),
 * BENCH_GPU_RESTORE_GAP_MS (3000: a pause before each restore, after the previous pod went: the driver gives back the
 * GPU memory another process freed only after a while, and a pool mapped sooner waits for it, which a cold start,
 * mapping its pool seconds after it starts, never does; 0 measures restores back to back), BENCH_GPU_STANDIN=1 (no GPU: bench/gpu/standin-worker.py, a CPU worker that speaks the same HTTP and
 * control-dir protocol, to check this script's plumbing on a machine without a GPU; its numbers mean nothing).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync, readlinkSync, realpathSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { cpus, hostname, release, tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { cleanupStaleStacks } from '../../src/node-stack/index.js';
import { startNodeStack, type NodeStack } from '../../src/node-stack/index.js';
import { parseCriLog, type Device, type Mount } from '../../src/node-stack/index.js';
import { parseFlavor } from '../../src/node-stack/index.js';
import { PACKAGE_ROOT, pluginDirsUnder, readJsonLog, startThawPluginProcess, waitForLog, type LogRecord, type ThawPluginProcess } from '../../src/node-stack/index.js';
import { getJson } from '../../demo/scenario.js';
import { sampleDisks } from '../disk-activity.js';
import { dropPageCache } from '../page-cache.js';
import { readThpMode } from '../../src/sys/host-facts.js';
import { median } from '../stats.js';
import { parallelReadRate, type ReadRate } from '../read-rate.js';
import { readdirSync } from 'node:fs';
import { renderTable } from '../../src/table.js';

export const GPU_WORKER_IMAGE_REF = 'docker.io/thaw/gpu-worker-shell:1';
const COLD_START_TIMEOUT_MS = 300_000;
const CHECKPOINT_TIMEOUT_MS = 600_000;
const RESTORE_TIMEOUT_MS = 300_000;
const HEALTH_POLL_MS = 25;
/** /tokens generates 32 tokens; the first call after a restore also faults the worker's memory in. */
const TOKENS_TIMEOUT_MS = 120_000;
/** BENCH_GPU_RESTORE_GAP_MS when unset (the header says why; bench/gpu/scrub-probe.py measures the driver apart). */
const DEFAULT_RESTORE_GAP_MS = 3000; // the stand-in (no GPU, no driver) defaults to 0
const GPU_MEMORY_SETTLE_TIMEOUT_MS = 60_000;
const CONTAINER_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

const say = (line: string): void => void process.stderr.write(`bench:gpu: ${line}\n`);
const round = (v: number, digits = 0): number => Number(v.toFixed(digits));
const GiB = 2 ** 30;

interface Health {
  ok: boolean;
  restored: boolean;
  outcome: string | null;
  facts?: Record<string, unknown>;
}

/** GET http://127.0.0.1:<port><path> → JSON, or undefined when nothing (or no 200) answers yet. */
function tryGet<T>(port: number, path: string, timeoutMs: number): Promise<T | undefined> {
  return getJson<T>(port, path, timeoutMs).catch(() => undefined);
}

/** The host's GPU memory in use (MiB), from nvidia-smi; undefined without one. */
function gpuMemoryUsedMiB(): number | undefined {
  try {
    const out = execFileSync('nvidia-smi', ['--query-gpu=memory.used', '--format=csv,noheader,nounits'], { encoding: 'utf8', timeout: 10_000 });
    return Number(out.trim().split('\n')[0]);
  } catch {
    return undefined;
  }
}

function gpuIdentity(): { gpu: string; driver: string } {
  try {
    const out = execFileSync('nvidia-smi', ['--query-gpu=name,driver_version', '--format=csv,noheader'], { encoding: 'utf8', timeout: 10_000 });
    const [gpu, driver] = (out.trim().split('\n')[0] ?? '').split(',').map((s) => s.trim());
    return { gpu: gpu ?? 'unknown', driver: driver ?? 'unknown' };
  } catch {
    return { gpu: 'none', driver: 'none' };
  }
}

/** Waits until the GPU gives back what a removed pod held (its process may take a moment to exit). */
async function waitGpuMemoryBelow(limitMiB: number | undefined): Promise<void> {
  if (limitMiB === undefined) return;
  const deadline = Date.now() + GPU_MEMORY_SETTLE_TIMEOUT_MS;
  for (;;) {
    const used = gpuMemoryUsedMiB();
    if (used === undefined || used <= limitMiB) return;
    if (Date.now() > deadline) throw new Error(`GPU memory still ${used} MiB in use (> ${limitMiB}) ${GPU_MEMORY_SETTLE_TIMEOUT_MS} ms after the pod was removed`);
    await sleep(200);
  }
}

/** JSON lines the worker wrote to stdout/stderr, from its CRI log. */
async function workerLogEvents(logPath: string): Promise<Record<string, unknown>[]> {
  const events: Record<string, unknown>[] = [];
  for (const line of parseCriLog(await readFile(logPath, 'utf8').catch(() => ''))) {
    if (line.partial || !line.text.startsWith('{')) continue;
    try {
      events.push(JSON.parse(line.text) as Record<string, unknown>);
    } catch {
      // a line that only looks like JSON: not one of the worker's events
    }
  }
  return events;
}

/**
 * After the agent's restore event (ms from its `ts`): thaw-pause's adoption (the log line's CRI time) and the
 * restored worker's own phases ("t", epoch seconds) up to serving: where restore event → ready goes.
 */
async function afterRestoreTimeline(logPath: string, restoredAt: number): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const line of parseCriLog(await readFile(logPath, 'utf8').catch(() => ''))) {
    if (line.text.startsWith('thaw-pause: adopted')) out['adopted'] = Date.parse(line.time) - restoredAt;
    if (!line.text.startsWith('{"event": "phase"')) continue;
    try {
      const e = JSON.parse(line.text) as { name?: unknown; t?: unknown };
      if (typeof e.name === 'string' && typeof e.t === 'number' && e.t * 1000 >= restoredAt - 5_000) out[e.name] = Math.round(e.t * 1000 - restoredAt);
    } catch {
      // not one of the worker's phase lines
    }
  }
  return out;
}

/**
 * The restored worker's anonymous memory once it serves, and how much of it sits in huge pages (the fill decides it)
 * or in mappings eligible for them (THPeligible: 1; in madvise mode the MADV_HUGEPAGE ones).
 */
async function restoredMemory(pid: number): Promise<{ anonBytes?: number; anonHugeBytes?: number; rssBytes?: number; thpEligibleAnonBytes: number }> {
  const rollup = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8').catch(() => '');
  const kb = (field: string): number | undefined => {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(rollup);
    return m?.[1] !== undefined ? Number(m[1]) * 1024 : undefined;
  };
  let thpEligibleAnonBytes = 0;
  for (const vma of (await readFile(`/proc/${pid}/smaps`, 'utf8').catch(() => '')).split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)) {
    const anon = /^Anonymous:\s+(\d+) kB/m.exec(vma);
    if (anon?.[1] !== undefined && /^THPeligible:\s+1/m.test(vma)) thpEligibleAnonBytes += Number(anon[1]) * 1024;
  }
  return { anonBytes: kb('Anonymous'), anonHugeBytes: kb('AnonHugePages'), rssBytes: kb('Rss'), thpEligibleAnonBytes };
}

/** What the worker needs from the host, found rather than assumed (Ubuntu, conda, venv layouts differ). */
interface HostWorkerEnv {
  python: string;
  mounts: Mount[];
  devices: Device[];
  env: Record<string, string>;
  /** Top-level dirs the image links to /usr (merged-/usr hosts) instead of mounting. */
  usrLinks: Array<{ name: string; target: string }>;
  /** Pinned host → GPU copy rate the worker measured when it prepared the weights (absent: the stand-in). */
  pinnedH2DGBps?: number;
}

function hostWorkerEnv(python: string, workerScript: string, weightsDir: string, modelArgs: string[] = []): HostWorkerEnv {
  // Not realpath'd: a venv's python is a symlink whose own path makes it the venv's interpreter.
  const pythonPath = execFileSync('sh', ['-c', `command -v ${python}`], { encoding: 'utf8' }).trim();
  // One Python start does both: makes the weights (once) and says where its packages live.
  const out = execFileSync(pythonPath, [workerScript, '--prepare-weights', '--weights-dir', weightsDir, ...modelArgs], { encoding: 'utf8', timeout: 600_000, stdio: ['ignore', 'pipe', 'inherit'] });
  const facts = JSON.parse(out.trim().split('\n').pop() ?? '{}') as { paths: string[]; created?: boolean; pinnedH2DGBps?: number };
  say(`weights in ${weightsDir}${facts.created ? ' (created)' : ''}`);
  const roots = new Set<string>(['/usr']);
  const usrLinks: Array<{ name: string; target: string }> = [];
  for (const name of ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32']) {
    const p = `/${name}`;
    if (!existsSync(p)) continue;
    if (lstatSync(p).isSymbolicLink()) usrLinks.push({ name, target: readlinkSync(p) });
    else roots.add(p);
  }
  const underRoots = (p: string): boolean => [...roots].some((r) => p === r || p.startsWith(`${r}/`));
  // Python packages outside /usr (a venv in /opt, conda, ~/.local): mount their top two path components.
  const ldPath = (process.env['LD_LIBRARY_PATH'] ?? '').split(':').filter((p) => p.startsWith('/') && existsSync(p));
  for (const p of [...facts.paths.filter((p) => p.startsWith('/') && existsSync(p)).map((p) => realpathSync(p)), dirname(pythonPath), ...ldPath]) {
    if (underRoots(p) || p.startsWith(PACKAGE_ROOT) || p.startsWith('/tmp/') || p.startsWith('/proc/')) continue;
    roots.add(p.split('/').slice(0, 3).join('/'));
  }
  const mounts: Mount[] = [...roots].map((r) => ({ host_path: r, container_path: r, readonly: true }));
  for (const f of ['/etc/ld.so.cache', '/etc/ld.so.conf', '/etc/ld.so.conf.d', '/etc/alternatives']) {
    if (existsSync(f)) mounts.push({ host_path: f, container_path: f, readonly: true });
  }
  // The worker and the SDK at the same path as here; the weights (made before the first pod starts).
  mounts.push({ host_path: PACKAGE_ROOT, container_path: PACKAGE_ROOT, readonly: true });
  mounts.push({ host_path: weightsDir, container_path: weightsDir, readonly: true });
  const devices: Device[] = ['/dev/nvidiactl', '/dev/nvidia-uvm', '/dev/nvidia-uvm-tools', '/dev/nvidia-modeset', ...[0, 1, 2, 3, 4, 5, 6, 7].map((i) => `/dev/nvidia${i}`)]
    .filter((d) => existsSync(d))
    .map((d) => ({ host_path: d, container_path: d, permissions: 'rwm' }));
  const env: Record<string, string> = {
    PATH: CONTAINER_PATH,
    HOME: '/root',
    HF_HOME: '/tmp/hf',
    PYTHONUNBUFFERED: '1',
    PYTHONDONTWRITEBYTECODE: '1',
    THAW_WEIGHTS_DIR: weightsDir,
    // The checkpoint saves the whole process: no io_uring instances CRIU cannot dump, no socket NCCL would open.
    UV_USE_IO_URING: '0',
  };
  if (ldPath.length > 0) env['LD_LIBRARY_PATH'] = ldPath.join(':');
  return { python: pythonPath, mounts, devices, env, usrLinks, ...(facts.pinnedH2DGBps !== undefined ? { pinnedH2DGBps: facts.pinnedH2DGBps } : {}) };
}

/** A few-kilobyte image: merged-/usr links, the dirs a container needs, passwd. Everything else is mounted. */
async function importShellImage(stack: NodeStack, host: HostWorkerEnv, workDir: string): Promise<string> {
  const rootfs = join(workDir, 'gpu-rootfs');
  for (const d of ['etc', 'tmp', 'proc', 'sys', 'dev', 'run', 'root', 'var/tmp', 'home', 'usr']) await mkdir(join(rootfs, d), { recursive: true, mode: d.endsWith('tmp') ? 0o1777 : 0o755 });
  for (const l of host.usrLinks) await symlink(l.target, join(rootfs, l.name));
  await writeFile(join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
  await writeFile(join(rootfs, 'etc/group'), 'root:x:0:\n');
  await stack.importImage({ ref: GPU_WORKER_IMAGE_REF, rootfsDir: rootfs, env: [`PATH=${CONTAINER_PATH}`] });
  return GPU_WORKER_IMAGE_REF;
}

/** The regular files process `pid` maps (from /proc/<pid>/maps), each once; none when it is gone. */
async function mappedFilesOf(pid: number | undefined): Promise<string[]> {
  if (pid === undefined) return [];
  const maps = await readFile(`/proc/${pid}/maps`, 'utf8').catch(() => '');
  const paths = new Set<string>();
  for (const line of maps.split('\n')) {
    const path = line.split(/\s+/).slice(5).join(' ');
    if (path.startsWith('/') && !path.endsWith(' (deleted)') && !path.startsWith('/dev/') && !path.startsWith('/memfd:')) paths.add(path);
  }
  return [...paths].filter((p) => existsSync(p));
}

interface PodRun {
  podId: string;
  containerId: string;
  logPath: string;
  startedAt: number;
  /** The CRI calls' durations and when StartContainer returned (epoch ms). */
  cri: { runPodSandboxMs: number; createMs: number; startMs: number; startedReturnedAt: number };
}

interface Variant {
  /** released, kept, released-tp1; with BENCH_GPU_WEIGHTS: suffixed with the weights mode (released-vmm). */
  name: string;
  /** The worker's --weights (BENCH_GPU_WEIGHTS); undefined: its default (torch). */
  weights?: 'vmm' | 'torch';
  workerArgs: string[];
  /** The worker's tensor parallelism in this variant's pods. */
  tensorParallel: number;
}

interface VariantResult {
  variant: string;
  weights: 'vmm' | 'torch';
  /** The restore event's weights load (bytes, loadMs, mbPerS) of the warm median run; null without one. */
  weightsLoad: unknown;
  tensorParallel: number;
  checkpointMs: number;
  checkpointPhases: unknown;
  checkpointBytes: number;
  liveBytes: number | null;
  checkpointOverLive: number | null;
  quiesced: Record<string, unknown> | null;
  gpuInManifest: unknown;
  /** The agent's report: GPU memory saved vs the worker's tensors (and a warning when mostly allocator cache). */
  gpuMemory: unknown;
  restoreWarmMs: number;
  restoreColdMs: number;
  restoreWarmOutcome: string;
  restoreColdOutcome: string;
  restoreWarmPhases: unknown;
  restoreColdPhases: unknown;
  restoreWarmTimeline: unknown;
  restoreColdTimeline: unknown;
  restoreWarmCause: string | null;
  restoreColdCause: string | null;
  restoreWarmSamplesMs: number[];
  restoreColdSamplesMs: number[];
  /** BENCH_GPU_PROBE_MAPPED_FILES=1: dropped restores with the worker's mapped files read back into the cache first. */
  probeMappedFiles?: number;
  restoreColdMappedWarm?: unknown;
  restoreColdMappedWarmSamplesMs?: number[];
  /** BENCH_GPU_FILL_BASELINE=1: the same restores with CRIU filling the memory (the agent restarted so). */
  criuFill?: {
    restoreWarmMs: number; restoreColdMs: number; restoreWarmPhases: unknown; restoreColdPhases: unknown; restoreWarmTimeline: unknown; restoreColdTimeline: unknown;
    restoreWarmSamplesMs: number[]; restoreColdSamplesMs: number[]; outcome: string; tokensMatch: boolean;
  };
  restoreWarmOverCriuFill?: number;
  restoreColdOverCriuFill?: number;
  tokensMatch: boolean;
}

/** One model's run (or, model undefined, the BENCH_GPU_SHAPE run); prints its table and JSON line, writes its JSON. */
async function runModel(model: string | undefined): Promise<void> {
  const standin = process.env['BENCH_GPU_STANDIN'] === '1';
  const tensorParallel = Number(process.env['BENCH_GPU_TP'] ?? 1);
  if (!Number.isInteger(tensorParallel) || tensorParallel < 1) throw new Error(`BENCH_GPU_TP: a positive integer, got ${JSON.stringify(process.env['BENCH_GPU_TP'])}`);
  const shape = process.env['BENCH_GPU_SHAPE'] ?? '0.6b';
  if (shape !== '0.6b' && shape !== '8b') throw new Error(`BENCH_GPU_SHAPE: unknown shape ${JSON.stringify(shape)} (expected 0.6b, 8b)`);
  const shapeArgs = model !== undefined ? ['--model', model] : standin || shape === '0.6b' ? [] : ['--shape', shape];
  const weightsModes = (process.env['BENCH_GPU_WEIGHTS'] ?? '').split(',').map((w) => w.trim()).filter((w) => w !== '');
  for (const w of weightsModes) if (w !== 'vmm' && w !== 'torch') throw new Error(`BENCH_GPU_WEIGHTS: unknown mode ${JSON.stringify(w)} (expected vmm, torch)`);
  const modes: Array<'vmm' | 'torch' | undefined> = weightsModes.length > 0 ? (weightsModes as Array<'vmm' | 'torch'>) : [undefined];
  const weightsArgs = (w: 'vmm' | 'torch' | undefined): string[] => (w !== undefined ? ['--weights', w] : []);
  const tpArgs = (n: number): string[] => (n > 1 ? ['--tensor-parallel', String(n)] : []);
  const baseVariants: Variant[] = (process.env['BENCH_GPU_VARIANTS'] ?? 'released,kept')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
    .map((name) => {
      if (name === 'released') return { name, workerArgs: tpArgs(tensorParallel), tensorParallel };
      if (name === 'kept') return { name, workerArgs: [...tpArgs(tensorParallel), '--keep-pool', '--kv-gib', process.env['BENCH_GPU_KEPT_KV_GIB'] ?? '16'], tensorParallel };
      if (name === 'released-tp1') return { name, workerArgs: [], tensorParallel: 1 };
      throw new Error(`BENCH_GPU_VARIANTS: unknown variant ${JSON.stringify(name)} (expected released, kept, released-tp1)`);
    });
  const variants: Variant[] = baseVariants.flatMap((v) =>
    modes.map((w) => (w === undefined ? v : { ...v, name: `${v.name}-${w}`, weights: w, workerArgs: [...v.workerArgs, ...weightsArgs(w)] })),
  );
  const port = Number(process.env['BENCH_GPU_PORT'] ?? 18080);
  // Restores per variant and page-cache state (medians reported): the lent machines are noisy.
  const restoreRounds = Math.max(1, Number(process.env['BENCH_GPU_RESTORES'] ?? 1) || 1);
  const restoreGapMs = Math.max(0, Number(process.env['BENCH_GPU_RESTORE_GAP_MS'] ?? (standin ? 0 : DEFAULT_RESTORE_GAP_MS)) || 0);
  const probeMappedFiles = process.env['BENCH_GPU_PROBE_MAPPED_FILES'] === '1';
  const fillBaseline = process.env['BENCH_GPU_FILL_BASELINE'] === '1';
  const extraWorkerArgs = (process.env['BENCH_GPU_WORKER_ARGS'] ?? '').split(' ').filter((s) => s !== '');
  const agentArgs = (process.env['BENCH_GPU_AGENT_ARGS'] ?? '').split(' ').filter((s) => s !== '');
  const workDir = await mkdtemp(join(tmpdir(), 'thaw-bench-gpu-'));
  // The GPU worker's weights are kept between runs (made once); the stand-in has none, so its dir goes with the run.
  const weightsDir = process.env['THAW_WEIGHTS_DIR'] ?? (standin ? join(workDir, 'weights') : model !== undefined ? `/tmp/thaw-${model}-random` : `/tmp/thaw-qwen3-${shape}-random`);
  const flavor = parseFlavor((process.env['THAW_CONTAINERD'] ?? '1.7').split(',')[0] ?? '1.7');
  const resultsDir = process.env['BENCH_GPU_RESULTS_DIR'] ?? join(PACKAGE_ROOT, 'bench/results');
  const workerScript = join(PACKAGE_ROOT, standin ? 'bench/gpu/standin-worker.py' : 'bench/gpu/worker.py');
  const identity = standin ? { gpu: 'none (stand-in worker)', driver: 'none' } : gpuIdentity();

  let host: HostWorkerEnv;
  try {
    await mkdir(weightsDir, { recursive: true });
    host = hostWorkerEnv(process.env['BENCH_GPU_PYTHON'] ?? 'python3', workerScript, weightsDir, shapeArgs);
  } catch (err) {
    await rm(workDir, { recursive: true, force: true });
    throw err;
  }

  await cleanupStaleStacks();
  let stack: NodeStack | undefined;
  let plugin: ThawPluginProcess | undefined;
  const pods = new Set<string>();
  const podLogs: string[] = [];
  let coldStartMs = Number.NaN;
  let coldStartWarmMs = Number.NaN;
  let coldTokens: number[] | undefined;
  const results: VariantResult[] = [];
  let coldFacts: Record<string, unknown> | undefined;
  // The rates a restore can reach on this machine, measured in this run over the model's own files.
  const weightFiles = readdirSync(weightsDir).filter((f) => f.endsWith('.safetensors')).map((f) => join(weightsDir, f));
  let pageCacheRead: ReadRate | null = null;
  let diskRead: ReadRate | null = null;
  if (weightFiles.length > 0) {
    await dropPageCache();
    diskRead = await parallelReadRate(weightFiles);
    pageCacheRead = await parallelReadRate(weightFiles);
    say(`weights files read: ${diskRead.gbPerS} GB/s from disk, ${pageCacheRead.gbPerS} GB/s from the page cache (${diskRead.readers} readers)`);
  }
  try {
    stack = await startNodeStack({ flavor });
    const s = stack;
    const image = await importShellImage(s, host, workDir);
    const logFile = join(workDir, 'thaw.log');
    const dirs = pluginDirsUnder(workDir, s.paths.prefix, logFile);
    const startPlugin = async (memoryFill: 'thaw-fill' | 'criu'): Promise<void> => {
      const synced = (await readJsonLog(logFile)).filter((r) => r.msg === 'nri plugin synchronized').length;
      plugin = startThawPluginProcess({ socketPath: s.nriSocketPath, containerd: { socket: s.address, root: s.rootDir }, ...dirs, extraArgs: ['--log-level', 'info', '--weights-model-dirs', weightsDir, '--restore-memory-fill', memoryFill, ...agentArgs] });
      const deadline = Date.now() + 60_000;
      while ((await readJsonLog(logFile)).filter((r) => r.msg === 'nri plugin synchronized').length <= synced) {
        if (Date.now() > deadline) throw new Error(`the thaw plugin (memory fill ${memoryFill}) did not register within 60 s (log: ${logFile})`);
        await sleep(50);
      }
    };
    await startPlugin('thaw-fill');
    const idleGpuMiB = gpuMemoryUsedMiB();
    const settleLimitMiB = idleGpuMiB === undefined ? undefined : idleGpuMiB + 1024;

    const runWorker = async (name: string, annotations: Record<string, string>, args: string[]): Promise<PodRun> => {
      const startedAt = Date.now();
      const r = await s.cri.runPod({
        name,
        // Source and targets are pods of one workload: one container name, as a restore requires.
        containerName: 'worker',
        uid: `${name}-uid`,
        annotations,
        image,
        command: [host.python, workerScript, '--port', String(port), '--weights-dir', weightsDir, ...shapeArgs, ...extraWorkerArgs, ...args],
        env: host.env,
        mounts: host.mounts,
        devices: host.devices,
      });
      pods.add(r.podId);
      podLogs.push(r.logPath);
      return { podId: r.podId, containerId: r.containerId, logPath: r.logPath, startedAt, cri: { ...r.timings, startedReturnedAt: Date.now() } };
    };
    const removePod = async (pod: PodRun): Promise<void> => {
      await s.cri.removePod(pod.podId);
      pods.delete(pod.podId);
      await waitGpuMemoryBelow(settleLimitMiB);
    };
    /** ms from RunPodSandbox until /healthz answers and `accept` likes it; fails early when thaw fell back. */
    const waitReady = async (pod: PodRun, timeoutMs: number, accept: (h: Health) => boolean, restoreOf?: string): Promise<{ ms: number; health: Health; event?: LogRecord }> => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const health = await tryGet<Health>(port, '/healthz', 2_000);
        if (health && accept(health)) return { ms: Date.now() - pod.startedAt, health };
        if (restoreOf) {
          const records = await readJsonLog(logFile);
          const event = records.find((r) => r['event'] === 'restore' && r['containerId'] === pod.containerId && r['outcome'] !== 'restored');
          if (event) return { ms: Date.now() - pod.startedAt, health: health ?? { ok: false, restored: false, outcome: null }, event };
        }
        if (Date.now() > deadline) throw new Error(`pod ${pod.podId}: worker not ready within ${timeoutMs} ms (log: ${pod.logPath})`);
        await sleep(HEALTH_POLL_MS);
      }
    };

    // 1. The baseline: a plain pod of the same worker, no thaw annotation.
    await dropPageCache();
    say('cold start, page cache dropped');
    const cold = await runWorker('gpu-cold', {}, [...tpArgs(tensorParallel), ...weightsArgs(modes[0])]);
    const coldReady = await waitReady(cold, COLD_START_TIMEOUT_MS, (h) => h.ok);
    coldStartMs = coldReady.ms;
    coldFacts = coldReady.health.facts;
    coldTokens = (await getJson<{ tokens: number[] }>(port, '/tokens', TOKENS_TIMEOUT_MS)).tokens;
    await removePod(cold);
    say(`cold start ${coldStartMs} ms; again with the page cache warm`);
    const coldWarm = await runWorker('gpu-cold-warm', {}, [...tpArgs(tensorParallel), ...weightsArgs(modes[0])]);
    coldStartWarmMs = (await waitReady(coldWarm, COLD_START_TIMEOUT_MS, (h) => h.ok)).ms;
    await removePod(coldWarm);
    say(`cold start (page cache warm) ${coldStartWarmMs} ms`);

    for (const v of variants) {
      const checkpointName = `gpu-${v.name}`;
      say(`${v.name}: source pod`);
      // Only the source prints its tokens (before its checkpoint): generating them delays serving by a few hundred ms.
      // The targets get the source's args: a restore requires the same command and args (manifest.ts).
      const source = await runWorker(`gpu-src-${v.name}`, { 'thaw.dev/checkpoint': checkpointName }, [...v.workerArgs, '--print-tokens']);
      const event = await waitForLog(logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${checkpointName}`, 'the checkpoint', CHECKPOINT_TIMEOUT_MS);
      if (event['outcome'] !== 'succeeded') throw new Error(`${v.name}: checkpoint failed: ${JSON.stringify(event)}`);
      const checkpointPhases = event['phases'] as { totalMs: number };
      const checkpointBytes = Number(event['bytes']);
      const manifest = JSON.parse(await readFile(join(dirs.storeRoot, 'default', checkpointName, 'manifest.json'), 'utf8')) as { constraints?: { gpu?: unknown } };
      await waitReady(source, COLD_START_TIMEOUT_MS, (h) => h.ok);
      const sourceEvents = await workerLogEvents(source.logPath);
      const sourceTokens = sourceEvents.find((e) => e['event'] === 'tokens' && e['phase'] === 'ready')?.['tokens'] as number[] | undefined;
      const quiesced = sourceEvents.find((e) => e['event'] === 'quiesced') ?? null;
      const liveBytes = quiesced ? Number(quiesced['liveBytes']) : null;
      // Probe (BENCH_GPU_PROBE_MAPPED_FILES=1): the files the worker maps. The pod's image is empty directories and
      // everything else is a host bind mount at the same path, so these are host paths too.
      const mappedFiles = probeMappedFiles ? await mappedFilesOf((await s.cri.containerStatus(source.containerId, true)).pid) : [];
      await removePod(source);
      say(`${v.name}: checkpoint ${Math.round(checkpointPhases.totalMs)} ms, ${round(checkpointBytes / GiB, 2)} GiB (live ${liveBytes === null ? '?' : round(liveBytes / GiB, 2)} GiB)`);

      type RestoreRun = { ms: number; outcome: string; cause: string | null; phases: unknown; timeline: unknown; tokens: number[] | undefined; weights: unknown };
      const restoreOnce = async (label: 'warm' | 'cold' | 'cold-mapped-warm', round_: number): Promise<RestoreRun> => {
        if (label !== 'warm') await dropPageCache();
        // BENCH_GPU_RESTORE_GAP_MS: a pause after the previous pod went (its GPU memory given back) before this restore.
        if (restoreGapMs > 0) await sleep(restoreGapMs);
        // The checkpoint cold, the worker's libraries cached: how much of a dropped restore is theirs.
        if (label === 'cold-mapped-warm') for (const f of mappedFiles) await readFile(f).catch(() => undefined);
        // The disks from the pod's creation to ready: whether a dropped restore waits on them or on itself.
        const disk = sampleDisks();
        const target = await runWorker(`gpu-restore-${label}-${v.name}${round_ > 1 ? `-${round_}` : ''}`, { 'thaw.dev/restore': checkpointName }, [...v.workerArgs, '--print-tokens']);
        const ready = await waitReady(target, RESTORE_TIMEOUT_MS, (h) => h.ok && h.restored, checkpointName);
        const diskTimeline = disk.stop();
        const restoreEvent = ready.event ?? (await waitForLog(logFile, (r) => r['event'] === 'restore' && r['containerId'] === target.containerId, 'the restore event', 30_000));
        const tokens = ready.event ? undefined : (await getJson<{ tokens: number[] }>(port, '/tokens', TOKENS_TIMEOUT_MS)).tokens;
        const afterRestore = await afterRestoreTimeline(target.logPath, Date.parse(String(restoreEvent['ts'])));
        const memory = await restoredMemory(Number(restoreEvent['restoredPid']));
        const criuLog = typeof restoreEvent['criuLog'] === 'string' ? restoreEvent['criuLog'] : undefined;
        const fillLabel = round_ > 100 ? 'criu-fill' : 'thaw-fill';
        if (process.env['OUT'] && criuLog !== undefined && (round_ === 1 || round_ === 101)) {
          await mkdir(join(process.env['OUT'], 'logs'), { recursive: true });
          await cp(criuLog, join(process.env['OUT'], 'logs', `criu-restore-${label}-${v.name}-${fillLabel}.log`)).catch(() => undefined);
        }
        await removePod(target);
        const outcome = String(restoreEvent['outcome']);
        say(`${v.name}: restore (page cache ${label}) ${ready.ms} ms, ${outcome}${restoreEvent['cause'] ? ` (${String(restoreEvent['cause'])}: ${String(restoreEvent['reason'])})` : ''}`);
        // Where the time outside the engine goes: the CRI calls, then StartContainer's return → the agent's
        // restore event → the worker answering /healthz.
        const restoredAt = Date.parse(String(restoreEvent['ts']));
        const { startedReturnedAt, ...criMs } = target.cri;
        const timeline = {
          ...criMs,
          startToRestoreEventMs: restoredAt - startedReturnedAt,
          restoreEventToReadyMs: target.startedAt + ready.ms - restoredAt,
        };
        return {
          ms: ready.ms,
          outcome,
          cause: restoreEvent['cause'] ? String(restoreEvent['cause']) : null,
          phases: restoreEvent['phases'],
          timeline: { ...timeline, afterRestore, memory, memoryFill: restoreEvent['memoryFill'] ?? null, disk: diskTimeline },
          tokens,
          weights: restoreEvent['weights'] ?? null,
        };
      };
      const same = (a: number[] | undefined, b: number[] | undefined): boolean => a !== undefined && b !== undefined && a.length > 0 && JSON.stringify(a) === JSON.stringify(b);
      // Rounds alternate warm and dropped; the figures are the medians, every sample is in the JSON.
      const warmRuns: RestoreRun[] = [];
      const coldRuns: RestoreRun[] = [];
      const coldMappedWarmRuns: RestoreRun[] = [];
      for (let i = 1; i <= restoreRounds; i += 1) {
        warmRuns.push(await restoreOnce('warm', i));
        coldRuns.push(await restoreOnce('cold', i));
        if (mappedFiles.length > 0) coldMappedWarmRuns.push(await restoreOnce('cold-mapped-warm', i));
      }
      /**
       * The rounds as one result: the median time, the phases and tokens of the run closest to it, and the
       * first outcome that was not a restore (if any).
       */
      const summarize = (runs: RestoreRun[]): RestoreRun => {
        const ms = median(runs.map((r) => r.ms));
        const closest = runs.reduce((best, r) => (Math.abs(r.ms - ms) < Math.abs(best.ms - ms) ? r : best));
        return { ...closest, ms, outcome: runs.find((r) => r.outcome !== 'restored')?.outcome ?? 'restored' };
      };
      const warm = summarize(warmRuns);
      const coldRestore = summarize(coldRuns);
      // The baseline of the memory fill, same run, same checkpoint: the agent restarted with CRIU filling memory.
      let criuFill: VariantResult['criuFill'];
      if (fillBaseline) {
        say(`${v.name}: the same restores with CRIU filling the memory (restore.memoryFill criu)`);
        await plugin?.stop();
        await startPlugin('criu');
        const w: RestoreRun[] = [];
        const c: RestoreRun[] = [];
        for (let i = 1; i <= restoreRounds; i += 1) {
          w.push(await restoreOnce('warm', 100 + i));
          c.push(await restoreOnce('cold', 100 + i));
        }
        await plugin?.stop();
        await startPlugin('thaw-fill');
        const sw = summarize(w);
        const sc = summarize(c);
        criuFill = {
          restoreWarmMs: sw.ms, restoreColdMs: sc.ms, restoreWarmPhases: sw.phases, restoreColdPhases: sc.phases, restoreWarmTimeline: sw.timeline, restoreColdTimeline: sc.timeline,
          restoreWarmSamplesMs: w.map((r) => r.ms), restoreColdSamplesMs: c.map((r) => r.ms), outcome: [...w, ...c].find((r) => r.outcome !== 'restored')?.outcome ?? 'restored',
          tokensMatch: [...w, ...c].every((r) => same(sourceTokens, r.tokens)),
        };
      }
      results.push({
        variant: v.name,
        weights: v.weights ?? 'torch',
        weightsLoad: warm.weights,
        tensorParallel: v.tensorParallel,
        checkpointMs: Math.round(checkpointPhases.totalMs),
        checkpointPhases,
        checkpointBytes,
        liveBytes,
        checkpointOverLive: liveBytes ? round(checkpointBytes / liveBytes, 3) : null,
        quiesced,
        gpuInManifest: manifest.constraints?.gpu ?? null,
        gpuMemory: event['gpuMemory'] ?? null,
        restoreWarmMs: warm.ms,
        restoreColdMs: coldRestore.ms,
        restoreWarmOutcome: warm.outcome,
        restoreColdOutcome: coldRestore.outcome,
        restoreWarmPhases: warm.phases,
        restoreColdPhases: coldRestore.phases,
        restoreWarmTimeline: warm.timeline,
        restoreColdTimeline: coldRestore.timeline,
        restoreWarmCause: warm.cause,
        restoreColdCause: coldRestore.cause,
        restoreWarmSamplesMs: warmRuns.map((r) => r.ms),
        restoreColdSamplesMs: coldRuns.map((r) => r.ms),
        ...(criuFill !== undefined ? { criuFill, restoreWarmOverCriuFill: round(warm.ms / criuFill.restoreWarmMs, 3), restoreColdOverCriuFill: round(coldRestore.ms / criuFill.restoreColdMs, 3) } : {}),
        ...(coldMappedWarmRuns.length > 0
          ? { probeMappedFiles: mappedFiles.length, restoreColdMappedWarm: { ...summarize(coldMappedWarmRuns), tokens: undefined }, restoreColdMappedWarmSamplesMs: coldMappedWarmRuns.map((r) => r.ms) }
          : {}),
        // The cold start runs at BENCH_GPU_TP; a variant at another parallelism is compared with its own source only.
        tokensMatch:
          [...warmRuns, ...coldRuns, ...coldMappedWarmRuns].every((r) => same(sourceTokens, r.tokens)) && (criuFill === undefined || criuFill.tokensMatch) &&
          (v.tensorParallel !== tensorParallel || same(sourceTokens, coldTokens)),
      });
      await rm(join(dirs.storeRoot, 'default', checkpointName), { recursive: true, force: true });
    }
  } finally {
    // Evidence for a run on a lent machine: the plugin's log and every worker's log, before the stack goes.
    const out = process.env['OUT'];
    if (out) {
      await mkdir(join(out, 'logs'), { recursive: true });
      await cp(join(workDir, 'thaw.log'), join(out, 'logs', 'thaw.log')).catch(() => undefined);
      for (const logPath of podLogs) await cp(logPath, join(out, 'logs', basename(dirname(logPath)) + '-' + basename(logPath))).catch(() => undefined);
    }
    for (const podId of pods) await stack?.cri.removePod(podId).catch(() => undefined);
    await plugin?.stop();
    await stack?.stop();
    await rm(workDir, { recursive: true, force: true });
  }

  process.stdout.write(
    renderTable(
      ['variant', 'TP', 'cold start ms', 'checkpoint ms', 'ckpt GiB', 'ckpt/live', 'restore warm ms', 'restore cold ms', 'speedup warm', 'speedup cold', 'tokens match'],
      results.map((r) => [
        r.variant,
        r.tensorParallel,
        coldStartMs,
        r.checkpointMs,
        round(r.checkpointBytes / GiB, 2),
        r.checkpointOverLive ?? '-',
        `${r.restoreWarmMs}${r.restoreWarmOutcome === 'restored' ? '' : ` (${r.restoreWarmOutcome})`}`,
        `${r.restoreColdMs}${r.restoreColdOutcome === 'restored' ? '' : ` (${r.restoreColdOutcome})`}`,
        round(coldStartMs / r.restoreWarmMs, 2),
        round(coldStartMs / r.restoreColdMs, 2),
        String(r.tokensMatch),
      ]),
      { rule: true },
    ),
  );
  process.stdout.write(`cold start with the page cache warm: ${coldStartWarmMs} ms\n`);
  const main = results.find((r) => r.variant.startsWith('released') && r.weights === 'vmm') ?? results.find((r) => r.variant.startsWith('released')) ?? results[0];
  const tp1 = results.find((r) => r.variant === 'released-tp1');
  const summary = {
    bench: 'gpu',
    standin,
    ...(agentArgs.length > 0 ? { agentArgs } : {}),
    date: new Date().toISOString(),
    host: hostname(),
    cpus: cpus().length,
    gpu: identity.gpu,
    driver: identity.driver,
    tensorParallel,
    shape,
    model: model ?? (shape === '8b' ? 'qwen3-8b' : 'qwen3-0.6b'),
    paramsB: coldFacts?.['paramsB'] ?? null,
    weightsBytes: coldFacts?.['weightsBytes'] ?? null,
    // Outside only when thaw really loaded them beside the restore (the restore event's weights), not when asked.
    weightsOutside: main?.weightsLoad !== undefined && main?.weightsLoad !== null,
    phases: main?.restoreWarmPhases ?? null,
    weightsLoad: main?.weightsLoad ?? null,
    pageCacheRead,
    diskRead,
    pinnedH2DGBps: host.pinnedH2DGBps ?? null,
    // Issue 14's goal: the load at >= 0.7 x min(parallel page-cache read, pinned H2D) of the same run.
    weightsLoadOverReference: ((): number | null => {
      const load = main?.weightsLoad as { bytes?: number; copyMs?: number } | null | undefined;
      const refs = [pageCacheRead?.gbPerS, host.pinnedH2DGBps].filter((x): x is number => typeof x === 'number' && x > 0);
      if (!load?.bytes || !load.copyMs || refs.length === 0) return null;
      return round(load.bytes / 1e6 / load.copyMs / Math.min(...refs), 2);
    })(),
    kernel: release(),
    // CRIU's page-restore rate depends on it (bench/gpu/criu-page-rate.sh); run-product.sh's THAW_THP sets it.
    transparentHugePages: (await readThpMode()) ?? null,
    containerd: stack?.containerdVersion,
    coldStartMs,
    coldStartWarmMs,
    restoreWarmMs: main?.restoreWarmMs ?? null,
    restoreColdMs: main?.restoreColdMs ?? null,
    // BENCH_GPU_FILL_BASELINE=1: thaw-fill's restore over CRIU's own fill, same run and checkpoint (< 1: faster).
    ...(main?.restoreWarmOverCriuFill !== undefined ? { restoreWarmOverCriuFill: main.restoreWarmOverCriuFill, restoreColdOverCriuFill: main.restoreColdOverCriuFill } : {}),
    // Issue 16's goal: the TP restore within 1.3x of the same model's single-GPU restore (variant released-tp1).
    ...(tensorParallel > 1 && tp1 !== undefined && main !== undefined
      ? { restoreWarmOverTp1: round(main.restoreWarmMs / tp1.restoreWarmMs, 2), restoreColdOverTp1: round(main.restoreColdMs / tp1.restoreColdMs, 2) }
      : {}),
    checkpointMs: main?.checkpointMs ?? null,
    checkpointBytes: main?.checkpointBytes ?? null,
    liveBytes: main?.liveBytes ?? null,
    tokensMatch: results.length > 0 && results.every((r) => r.tokensMatch),
    variants: results,
  };
  const json = JSON.stringify(summary);
  await mkdir(resultsDir, { recursive: true });
  const file = join(resultsDir, `gpu-${model !== undefined ? `${model}-` : ''}${summary.date.replace(/[:.]/g, '-')}${standin ? '-standin' : ''}.json`);
  await writeFile(file, `${JSON.stringify(summary, null, 2)}\n`);
  if (process.env['OUT']) await writeFile(join(process.env['OUT'], model !== undefined ? `bench-gpu-${model}.json` : 'bench-gpu.json'), `${json}\n`);
  say(`results in ${file}`);
  process.stdout.write(`${json}\n`);
}

async function main(): Promise<void> {
  const models = (process.env['BENCH_GPU_MODELS'] ?? '').split(',').map((m) => m.trim()).filter((m) => m !== '');
  if (models.length === 0) return runModel(undefined);
  for (const m of models) {
    if (!/^qwen3-(0\.6b|4b|8b|14b)$/.test(m)) throw new Error(`BENCH_GPU_MODELS: unknown model ${JSON.stringify(m)} (expected qwen3-0.6b, qwen3-4b, qwen3-8b, qwen3-14b)`);
  }
  for (const m of models) {
    await runModel(m);
    const dir = process.env['THAW_WEIGHTS_DIR'] ?? `/tmp/thaw-${m}-random`;
    if (process.env['BENCH_GPU_DROP_WEIGHTS'] === '1' && process.env['BENCH_GPU_STANDIN'] !== '1') await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:gpu failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
