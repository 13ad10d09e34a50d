/**
 * `npm run fuzz`: at least 10^6 random and mutated inputs through thaw's decoders (bench/fuzz-decoders.ts),
 * in a worker thread watched by this process: an input that runs longer than the per-input cap stops the run
 * as a hang, naming the input. Prints a last JSON line (the report) and exits 1 on any finding.
 *
 *   node dist/bench/fuzz.js [--inputs N] [--seed S] [--only I] [--cap-ms MS] [--heap-mib MIB] [--exclude TARGET]...
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { fuzzTargets, runFuzz, tarCorpus, type FuzzReport } from './fuzz-decoders.js';

interface Job {
  inputs: number;
  seed: number;
  only?: number;
  capMs: number;
  heapMiB: number;
  counter: SharedArrayBuffer;
  /** Target names left out (a known finding being fixed elsewhere must not stop the others' run). */
  exclude: string[];
}

if (!isMainThread) {
  const job = workerData as Job;
  const counter = new Int32Array(job.counter);
  const dir = mkdtempSync(join(process.env.THAW_FUZZ_TMP ?? '/dev/shm', 'thaw-fuzz-'));
  try {
    const report = await runFuzz({
      inputs: job.inputs,
      seed: job.seed,
      ...(job.only !== undefined ? { only: job.only } : {}),
      targets: fuzzTargets({ tarFile: join(dir, 'diff.tar'), tarCorpus: tarCorpus() }).filter((t) => !job.exclude.includes(t.name)),
      perInputCapMs: job.capMs,
      heapCapMiB: job.heapMiB,
      progress: (i) => Atomics.store(counter, 0, i),
    });
    parentPort?.postMessage(report);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
} else {
  const { values } = parseArgs({
    options: {
      inputs: { type: 'string', default: '1000000' },
      seed: { type: 'string', default: '1' },
      only: { type: 'string' },
      'cap-ms': { type: 'string', default: '2000' },
      'heap-mib': { type: 'string', default: '512' },
      exclude: { type: 'string', multiple: true, default: [] },
    },
  });
  const counter = new SharedArrayBuffer(4);
  const job: Job = {
    inputs: Number(values.inputs),
    seed: Number(values.seed),
    ...(values.only !== undefined ? { only: Number(values.only) } : {}),
    capMs: Number(values['cap-ms']),
    heapMiB: Number(values['heap-mib']),
    counter,
    exclude: values.exclude ?? [],
  };
  const worker = new Worker(new URL(import.meta.url), { workerData: job, resourceLimits: { maxOldGenerationSizeMb: job.heapMiB * 2 } });
  const seen = new Int32Array(counter);
  let last = -1;
  let lastChange = performance.now();
  let hang: number | undefined;
  const watchdog = setInterval(() => {
    const now = Atomics.load(seen, 0);
    if (now !== last) {
      last = now;
      lastChange = performance.now();
    } else if (performance.now() - lastChange > job.capMs) {
      hang = now;
      void worker.terminate();
    }
  }, Math.max(50, Math.floor(job.capMs / 4)));
  const report = await new Promise<FuzzReport | { error: string }>((resolve) => {
    worker.once('message', (r: FuzzReport) => resolve(r));
    worker.once('error', (err) => resolve({ error: String(err?.stack ?? err) }));
    worker.once('exit', (code) => resolve({ error: hang !== undefined ? `hang: input ${hang} ran past ${job.capMs} ms` : `worker exited ${code}` }));
  });
  clearInterval(watchdog);
  const cpu = cpus()[0]?.model ?? 'unknown';
  const ok = !('error' in report) && report.findings.length === 0;
  process.stdout.write(`${JSON.stringify({ ok, seed: job.seed, ...(job.exclude.length ? { excluded: job.exclude } : {}), machine: `${cpus().length} x ${cpu}`, node: process.version, ...report })}\n`);
  process.exit(ok ? 0 : 1);
}
