/**
 * The demo worker: what `npm run demo`, the restore tests and `npm run bench:restore` run in pods.
 *
 * It warms up (fills WORKER_MEMORY_MB of Buffers from WORKER_SEED and waits out WORKER_WARMUP_MS, to
 * imitate a framework import and a weight load), then serves on 127.0.0.1, port 0:
 *   GET /state       { digest (recomputed over the live memory on every call: the proof that it
 *                     survived), memoryMb, seed, requests, bootId, restored, restoreCount, pid, uptimeMs, ... }
 *   GET /compute?x=N { x, answer }: the sum of 64 bytes at offsets derived from N (memory.ts)
 *   GET /healthz     { ok: true }
 * Pods run on the host network, so the port is whatever the kernel gives; the worker announces it on
 * stdout ({"event":"listening",...}) and, with a control dir, in <control dir>/worker-endpoint.json.
 *
 * With SNAPSHOT_CONTROL_DIR set it takes part in the checkpoint protocol through the SDK, after
 * WORKER_CHECKPOINT_AFTER_MS of serving (default 0: at once, so a checkpoint pod is ready as early as
 * possible; tests set a delay to make requests first). Before ready-for-checkpoint it closes its server
 * and every connection: CRIU cannot restore a listening socket into a host-network pod while the source
 * still listens on that port. After checkpoint-complete or restore-complete it listens again on a new
 * port and rewrites worker-endpoint.json (after a restore that is the new pod's control dir, at the same
 * path). The `requests` counter and `bootId` live in memory, so they carry on across a restore.
 *
 * CRIU-friendly: the image sets UV_USE_IO_URING=0 (CRIU cannot dump io_uring), the SDK polls rather
 * than watching (no inotify across the dump), logs go to stdout (the container log), SIGTERM exits 0.
 */
import { randomUUID } from 'node:crypto';
import { realpathSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { pathToFileURL } from 'node:url';
import { writeFileAtomic } from '../../src/sdk/index.js';
import { CONTROL_DIR_ENV } from '../../src/sdk/index.js';
import { checkpointAndWait, ControlDir } from '../../src/sdk/index.js';
import { DEMO_ERROR_CODES, DemoError } from './errors.js';
import { allocateMemory, computeAnswer, digestOf } from './memory.js';

export * from './memory.js';

/** The file in the control dir that tells the host where the worker listens. */
export const ENDPOINT_FILE = 'worker-endpoint.json';
/** How long SIGTERM waits for the server to close before exiting anyway. */
export const STOP_GRACE_MS = 2_000;

export interface WorkerConfig {
  memoryMb: number;
  seed: number;
  /** Minimum warm-up time; filling memory counts towards it. */
  warmupMs: number;
  /** Unset: no checkpoint protocol, just serve. */
  controlDir: string | undefined;
  /** Serve this long before asking for the checkpoint. */
  checkpointAfterMs: number;
}

export const DEFAULT_WORKER_CONFIG = { memoryMb: 256, seed: 1, warmupMs: 2_000, checkpointAfterMs: 0 } as const;

function intFromEnv(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new DemoError(DEMO_ERROR_CODES.INVALID_CONFIG, `${name}=${raw} is not an integer in [${min}, ${max}]`, {
      step: 'read worker config', evidence: { name, value: raw },
    });
  }
  return n;
}

/** The worker's settings from its environment. Pure; throws DEMO_WORKER_INVALID_CONFIG. */
export function parseWorkerConfig(env: NodeJS.ProcessEnv): WorkerConfig {
  const controlDir = env[CONTROL_DIR_ENV];
  return {
    memoryMb: intFromEnv(env, 'WORKER_MEMORY_MB', DEFAULT_WORKER_CONFIG.memoryMb, 1, 1024 * 1024),
    seed: intFromEnv(env, 'WORKER_SEED', DEFAULT_WORKER_CONFIG.seed, 0, 0xffffffff),
    warmupMs: intFromEnv(env, 'WORKER_WARMUP_MS', DEFAULT_WORKER_CONFIG.warmupMs, 0, 3_600_000),
    controlDir: controlDir === undefined || controlDir === '' ? undefined : controlDir,
    checkpointAfterMs: intFromEnv(env, 'WORKER_CHECKPOINT_AFTER_MS', DEFAULT_WORKER_CONFIG.checkpointAfterMs, 0, 3_600_000),
  };
}

/** One JSON line per phase on stdout (the container log). Synchronous for pipes and files on Linux. */
function logEvent(event: string, fields: Record<string, unknown> = {}): void {
  process.stdout.write(`${JSON.stringify({ event, ts: new Date().toISOString(), ...fields })}\n`);
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

class DemoWorker {
  readonly bootId = randomUUID();
  private readonly bootWallMs = Date.now();
  private requests = 0;
  private restored = false;
  private restoreCount = 0;
  private server: Server | undefined;
  private port = 0;

  constructor(
    private readonly config: WorkerConfig,
    private readonly memory: readonly Buffer[],
    readonly warmupMs: number,
  ) {}

  get listeningPort(): number {
    return this.port;
  }

  markRestored(): void {
    this.restored = true;
    this.restoreCount += 1;
  }

  /** Listens on a fresh 127.0.0.1 port and announces it (stdout, and worker-endpoint.json with a control dir). */
  async listen(): Promise<number> {
    const server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.server = server;
    this.port = (server.address() as AddressInfo).port;
    const endpoint = {
      port: this.port, pid: process.pid, startedAt: new Date().toISOString(),
      bootId: this.bootId, restored: this.restored, restoreCount: this.restoreCount,
    };
    if (this.config.controlDir !== undefined) await writeFileAtomic(this.config.controlDir, ENDPOINT_FILE, endpoint, 0o644);
    logEvent('listening', endpoint);
    return this.port;
  }

  /**
   * Closes the server and every connection, and withdraws worker-endpoint.json first so nobody dials
   * a port that is about to close. Idempotent.
   */
  async close(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (this.config.controlDir !== undefined) {
      await unlink(`${this.config.controlDir}/${ENDPOINT_FILE}`).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw err;
      });
    }
    if (!server) return;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeAllConnections();
    await closed;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    this.requests += 1;
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    if (req.method !== 'GET') return sendJson(res, 405, { error: 'only GET' });
    switch (url.pathname) {
      case '/healthz':
        return sendJson(res, 200, { ok: true });
      case '/state':
        return sendJson(res, 200, {
          digest: digestOf(this.memory),
          memoryMb: this.config.memoryMb,
          seed: this.config.seed,
          requests: this.requests,
          bootId: this.bootId,
          restored: this.restored,
          restoreCount: this.restoreCount,
          pid: process.pid,
          uptimeMs: Date.now() - this.bootWallMs,
          warmupMs: this.warmupMs,
          port: this.port,
        });
      case '/compute': {
        const x = Number(url.searchParams.get('x'));
        if (!url.searchParams.has('x') || !Number.isSafeInteger(x) || x < 0 || x > 0xffffffff) {
          return sendJson(res, 400, { error: 'x must be an integer in [0, 2^32)' });
        }
        return sendJson(res, 200, { x, answer: computeAnswer(this.memory, x) });
      }
      default:
        return sendJson(res, 404, { error: `no route ${url.pathname}` });
    }
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/** The checkpoint protocol, once, after warm-up. Resolves when the worker serves again (or is stopping). */
async function takePartInCheckpoint(worker: DemoWorker, config: WorkerConfig, controlDir: string, digest: string, signal: AbortSignal): Promise<void> {
  const dir = new ControlDir({ path: controlDir });
  // A cold-started fallback finds restore-failed already there: the agent gave up on this pod, serve.
  if ((await dir.outcome()) === 'restore-failed') {
    logEvent('cold-start-fallback');
    return;
  }
  if (config.checkpointAfterMs > 0) await sleep(config.checkpointAfterMs, signal);
  if (signal.aborted) return;
  logEvent('checkpoint-requested', { controlDir });
  const outcome = await checkpointAndWait({
    controlDir: dir,
    signal,
    payload: { digest, memoryMb: config.memoryMb, seed: config.seed, bootId: worker.bootId },
    release: () => worker.close(),
    resume: async () => {
      // One stat: the SDK's outcome is known only after resume, and restored must be true before we announce.
      if (await dir.wasRestored()) worker.markRestored();
      await worker.listen();
    },
  });
  switch (outcome) {
    case 'checkpoint-complete':
      logEvent('checkpoint-complete', { port: worker.listeningPort });
      return;
    case 'restore-complete':
      logEvent('restored', { port: worker.listeningPort, bootId: worker.bootId });
      return;
    case 'restore-failed':
      // resume() is not called on restore-failed; a process that sees it serves as a cold start.
      await worker.listen();
      logEvent('restore-failed', { port: worker.listeningPort });
      return;
  }
}

export async function main(env: NodeJS.ProcessEnv = process.env): Promise<void> {
  const config = parseWorkerConfig(env);
  const t0 = performance.now();
  const memory = allocateMemory(config.memoryMb, config.seed);
  const digest = digestOf(memory);
  const fillMs = Math.round(performance.now() - t0);
  const rest = config.warmupMs - (performance.now() - t0);
  if (rest > 0) await new Promise((r) => setTimeout(r, rest));
  const worker = new DemoWorker(config, memory, Math.round(performance.now() - t0));

  const stopping = new AbortController();
  const stop = (signalName: string): void => {
    if (stopping.signal.aborted) return;
    stopping.abort();
    logEvent('stopping', { signal: signalName });
    // PID 1 of its namespace: without this handler SIGTERM would be ignored and the runtime would SIGKILL.
    const forced = setTimeout(() => process.exit(0), STOP_GRACE_MS);
    void worker.close().finally(() => {
      clearTimeout(forced);
      process.exit(0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));

  await worker.listen();
  logEvent('ready', { warmupMs: worker.warmupMs, fillMs, digest, memoryMb: config.memoryMb, seed: config.seed, pid: process.pid, port: worker.listeningPort });
  if (config.controlDir !== undefined) {
    try {
      await takePartInCheckpoint(worker, config, config.controlDir, digest, stopping.signal);
    } catch (err) {
      if (stopping.signal.aborted) return;
      throw err;
    }
  }
}

/** True when this module is the process's entry point (not imported by a test or the bench). */
function isEntryPoint(): boolean {
  const entry = process.argv[1];
  if (entry === undefined) return false;
  try {
    return import.meta.url === pathToFileURL(realpathSync(entry)).href;
  } catch {
    return false;
  }
}

if (isEntryPoint()) {
  main().catch((err: unknown) => {
    const e = err as { code?: unknown; message?: unknown };
    logEvent('error', { code: e.code, message: String(e.message ?? err) });
    process.exit(1);
  });
}
