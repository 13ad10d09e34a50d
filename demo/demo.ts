/**
 * npm run demo — thaw's main job, end to end, on a private containerd stack that the project provisions.
 *
 *   1. start the private node stack (containerd + runc + CRIU) and the thaw agent (`thaw agent`);
 *   2. cold-start the demo worker in a pod annotated `thaw.dev/checkpoint: demo`, time it to serving;
 *   3. the worker asks for its checkpoint (ready-for-checkpoint); thaw dumps it into the store;
 *   4. create a second pod annotated `thaw.dev/restore: demo`, time it to serving;
 *   5. check the restored worker's state: the same memory digest, a request counter that continued,
 *      the same answers; print a table and, last, one JSON line. Then stop everything.
 *
 * Env: DEMO_MEMORY_MB (default 512), DEMO_WARMUP_MS (default 5000), THAW_CONTAINERD (1.7 | 2.1).
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cleanupStaleStacks } from '../src/node-stack/index.js';
import { startNodeStack, type NodeStack } from '../src/node-stack/index.js';
import { parseFlavor } from '../src/node-stack/index.js';
import { pluginDirsUnder, startThawPluginProcess, waitForLog, type ThawPluginProcess } from '../src/node-stack/index.js';
import { renderTable } from '../src/table.js';
import { buildWorkerImage } from './worker-image.js';
import { expectedDigest, expectedAnswer } from './worker/memory.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerState } from './scenario.js';

const CHECKPOINT_NAME = 'demo';

async function main(): Promise<number> {
  const memoryMb = Number(process.env['DEMO_MEMORY_MB'] ?? 512);
  const warmupMs = Number(process.env['DEMO_WARMUP_MS'] ?? 5000);
  const seed = 7;
  const flavor = parseFlavor((process.env['THAW_CONTAINERD'] ?? '1.7').split(',')[0] ?? '1.7');
  const say = (line: string): void => void process.stderr.write(`demo: ${line}\n`);

  await cleanupStaleStacks();
  const workDir = await mkdtemp(join(tmpdir(), 'thaw-demo-'));
  const controlRoot = join(workDir, 'control');
  const storeRoot = join(workDir, 'checkpoints');
  let stack: NodeStack | undefined;
  let plugin: ThawPluginProcess | undefined;
  try {
    say(`starting the private node stack (containerd ${flavor})`);
    stack = await startNodeStack({ flavor });
    const image = await buildWorkerImage(stack);
    const logFile = join(workDir, 'thaw.log');
    const dirs = pluginDirsUnder(workDir, stack.paths.prefix, logFile);
    plugin = startThawPluginProcess({ socketPath: stack.nriSocketPath, containerd: { socket: stack.address, root: stack.rootDir }, ...dirs });
    await waitForLog(logFile, (r) => r.msg === 'nri plugin synchronized', 'the thaw agent to register with containerd');
    say(`thaw agent registered; its log: ${logFile}`);

    // 2. Cold start of the source.
    say(`cold-starting the demo worker (${memoryMb} MB, warm-up ${warmupMs} ms)`);
    const source = await runWorkerPod(stack, controlRoot, {
      name: 'demo-source',
      image: image.ref,
      annotations: { 'thaw.dev/checkpoint': CHECKPOINT_NAME },
      memoryMb,
      seed,
      warmupMs,
      checkpointAfterMs: 1_000,
    });
    const sourceEndpoint = await waitForServingWorker(source.controlDir);
    const coldStartMs = Date.now() - source.startedAt;
    say(`source serving after ${coldStartMs} ms`);
    for (let i = 0; i < 3; i++) await getJson(sourceEndpoint.port, '/healthz');
    const before = await getJson<WorkerState>(sourceEndpoint.port, '/state');
    const answersBefore = await Promise.all([1, 2, 3].map((x) => getJson<{ answer: number }>(sourceEndpoint.port, `/compute?x=${x}`)));

    // 3. The worker asks for its checkpoint; thaw dumps it and tells it to go on.
    say('waiting for the worker to ask for its checkpoint and for thaw to take it');
    const checkpointEvent = await waitForLog(logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${CHECKPOINT_NAME}`, 'the checkpoint', 120_000);
    if (checkpointEvent['outcome'] !== 'succeeded') throw new Error(`checkpoint failed: ${JSON.stringify(checkpointEvent)}`);
    const manifest = JSON.parse(await readFile(join(storeRoot, 'default', CHECKPOINT_NAME, 'manifest.json'), 'utf8')) as {
      totals: { bytes: number; liveBytes?: number };
      timings: { phaseMs: Record<string, number> };
    };
    const sourceAfter = await waitForServingWorker(source.controlDir, { accept: (e) => e.port !== sourceEndpoint.port });
    const sourceState = await getJson<WorkerState>(sourceAfter.port, '/state');

    // 4. A new pod that names the checkpoint.
    say('creating a second pod that names the checkpoint');
    const target = await runWorkerPod(stack, controlRoot, {
      name: 'demo-restored',
      image: image.ref,
      annotations: { 'thaw.dev/restore': CHECKPOINT_NAME },
      memoryMb,
      seed,
      warmupMs,
    });
    const targetEndpoint = await waitForServingWorker(target.controlDir, { accept: (e) => e.restored });
    const restoreMs = Date.now() - target.startedAt;
    say(`restored worker serving after ${restoreMs} ms`);

    // 5. The restored worker's state.
    const after = await getJson<WorkerState>(targetEndpoint.port, '/state');
    const answersAfter = await Promise.all([1, 2, 3].map((x) => getJson<{ answer: number }>(targetEndpoint.port, `/compute?x=${x}`)));
    const expected = expectedDigest(memoryMb, seed);
    const checks = {
      digestMatchesSource: after.digest === before.digest,
      digestMatchesExpected: after.digest === expected,
      counterContinued: after.requests > before.requests,
      sameBootId: after.bootId === before.bootId,
      restoredFlag: after.restored === true,
      answersMatch: answersAfter.every((a, i) => a.answer === answersBefore[i]?.answer && a.answer === expectedAnswer(memoryMb, seed, i + 1)),
      sourceStillServing: sourceState.digest === before.digest,
    };
    const stateVerified = Object.values(checks).every(Boolean);
    const restoreLog = await waitForLog(logFile, (r) => r['event'] === 'restore' && r['containerId'] === target.containerId, 'the restore event', 10_000).catch(() => undefined);

    const result = {
      coldStartMs,
      restoreMs,
      speedup: Number((coldStartMs / restoreMs).toFixed(2)),
      stateVerified,
      checks,
      memoryMb,
      checkpointBytes: manifest.totals.bytes,
      liveBytes: manifest.totals.liveBytes ?? null,
      checkpointPhasesMs: manifest.timings.phaseMs,
      restorePhasesMs: restoreLog?.['phases'] ?? null,
      requestsBefore: before.requests,
      requestsAfter: after.requests,
      containerd: stack.containerdVersion,
    };
    process.stdout.write(
      renderTable(
        ['', 'time to serving', 'digest', 'requests served'],
        [
          ['cold start (source pod)', `${coldStartMs} ms`, before.digest.slice(0, 16), before.requests],
          ['thaw restore (new pod)', `${restoreMs} ms`, after.digest.slice(0, 16), after.requests],
        ],
        { rule: true },
      ),
    );
    process.stdout.write(`speedup ${result.speedup}x; checkpoint ${(result.checkpointBytes / 2 ** 20).toFixed(0)} MiB; state verified: ${stateVerified}\n`);
    process.stdout.write(`${JSON.stringify(result)}\n`);
    return stateVerified ? 0 : 1;
  } finally {
    await plugin?.stop();
    await stack?.stop();
    await rm(workDir, { recursive: true, force: true });
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`demo failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    process.exit(1);
  },
);
