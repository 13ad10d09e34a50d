/**
 * The pieces of thaw's main job, end to end on the private stack: shared by `npm run demo`,
 * `npm run bench:restore` and the end-to-end tests. A cold-started demo worker pod is checkpointed by thaw (the
 * worker asks for it through its control directory), and a second pod that names the checkpoint is restored.
 */
import { readFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { NodeStack } from '../src/node-stack/index.js';
import { WORKER_IMAGE_ENTRYPOINT } from './worker-image.js';

export const ENDPOINT_FILE = 'worker-endpoint.json';
export const DEFAULT_READY_TIMEOUT_MS = 120_000;
export const HTTP_TIMEOUT_MS = 30_000;

export interface WorkerEndpoint {
  port: number;
  pid: number;
  bootId: string;
  restored: boolean;
  restoreCount: number;
}

export interface WorkerState {
  digest: string;
  memoryMb: number;
  seed: number;
  requests: number;
  bootId: string;
  restored: boolean;
  restoreCount: number;
  pid: number;
  uptimeMs: number;
}

/** GET http://127.0.0.1:<port><path> → parsed JSON; rejects on non-200 or after `timeoutMs`. */
export function getJson<T>(port: number, path: string, timeoutMs = HTTP_TIMEOUT_MS): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        if (res.statusCode !== 200) reject(new Error(`GET ${path} on port ${port}: HTTP ${res.statusCode}: ${body}`));
        else {
          try {
            resolve(JSON.parse(body) as T);
          } catch (err) {
            reject(new Error(`GET ${path} on port ${port}: not JSON: ${body.slice(0, 200)}`, { cause: err }));
          }
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${path} on port ${port}: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}

/**
 * Waits until the worker of a control directory announces an endpoint that answers /healthz, and the
 * announcement satisfies `accept` (e.g. restored: true). Returns it with the time it took.
 */
export async function waitForServingWorker(
  controlDir: string,
  options: { timeoutMs?: number; accept?: (e: WorkerEndpoint) => boolean; signal?: AbortSignal } = {},
): Promise<WorkerEndpoint> {
  const deadline = Date.now() + (options.timeoutMs ?? DEFAULT_READY_TIMEOUT_MS);
  let last = 'no endpoint file yet';
  for (;;) {
    options.signal?.throwIfAborted();
    try {
      const endpoint = JSON.parse(await readFile(join(controlDir, ENDPOINT_FILE), 'utf8')) as WorkerEndpoint;
      if (!options.accept || options.accept(endpoint)) {
        await getJson(endpoint.port, '/healthz', 2_000);
        return endpoint;
      }
      last = `endpoint file not accepted yet: ${JSON.stringify(endpoint)}`;
    } catch (err) {
      last = err instanceof Error ? err.message : String(err);
    }
    if (Date.now() > deadline) throw new Error(`worker in ${controlDir} not serving within the deadline: ${last}`);
    await sleep(20);
  }
}

export interface WorkerPodOptions {
  name: string;
  image: string;
  annotations: Record<string, string>;
  memoryMb: number;
  seed: number;
  warmupMs: number;
  /** Serve this long before asking for the checkpoint (checkpoint sources only). */
  checkpointAfterMs?: number;
  /** false: create the container but do not start it (the caller calls stack.cri.startContainer). */
  start?: boolean;
  /** More environment for the worker container (e.g. the fake CUDA driver's token); the worker's own keys win. */
  env?: Record<string, string>;
}

export interface WorkerPod {
  podId: string;
  containerId: string;
  logPath: string;
  /** Host path of the container's control directory. */
  controlDir: string;
  /** When RunPodSandbox was called (ms since the epoch). */
  startedAt: number;
}

/** The demo worker's container name in every pod (source and targets), as a Deployment's pods share one. */
export const WORKER_CONTAINER_NAME = 'worker';

/** Creates and starts a demo worker pod through CRI. thaw (if its annotations say so) adjusts it. */
export async function runWorkerPod(stack: NodeStack, controlRoot: string, o: WorkerPodOptions): Promise<WorkerPod> {
  const startedAt = Date.now();
  const r = await stack.cri.runPod({
    name: o.name,
    // One workload's pods share their container's name, as a Deployment's do: a restore requires it.
    containerName: WORKER_CONTAINER_NAME,
    uid: `${o.name}-uid`,
    annotations: o.annotations,
    image: o.image,
    command: [...WORKER_IMAGE_ENTRYPOINT],
    env: {
      ...o.env,
      WORKER_MEMORY_MB: String(o.memoryMb),
      WORKER_SEED: String(o.seed),
      WORKER_WARMUP_MS: String(o.warmupMs),
      WORKER_CHECKPOINT_AFTER_MS: String(o.checkpointAfterMs ?? 0),
    },
    ...(o.start === false ? { start: false } : {}),
  });
  return { podId: r.podId, containerId: r.containerId, logPath: r.logPath, controlDir: join(controlRoot, r.containerId), startedAt };
}
