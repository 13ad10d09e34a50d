/**
 * The weights service on a real driver, thaw's half (bench/gpu/check-weights.sh runs it beside
 * weights-check-worker.py): reads the worker's weights file, loads every source into shareable GPU memory
 * (src/restore-engine/weights/loader.ts), hands the fds to the worker pid over weights.sock, releases its
 * own handles at once (so the check also shows that the exported fds alone keep the memory alive), and
 * prints one JSON line: bytes, load time and rate, and the handover time.
 * Usage: node dist/bench/gpu/weights-check.js <control dir> <worker pid> [readers]
 */
import { open } from 'node:fs/promises';
import { constants } from 'node:fs';

import { loadCuda } from '../../src/cuda/index.js';
import { CudaVmm } from '../../src/cuda/index.js';
import { listenForWorker } from '../../src/restore-engine/index.js';
import { loadWeights } from '../../src/restore-engine/index.js';
import { readWeightsFile } from '../../src/restore-engine/index.js';
import { SourceDigests } from '../../src/restore-engine/index.js';

async function main(): Promise<void> {
  const [controlDir, pidText, readersText] = process.argv.slice(2);
  if (!controlDir || !pidText) throw new Error('usage: weights-check.js <control dir> <worker pid> [readers]');
  const workerPid = Number(pidText);
  const regions = await readWeightsFile(controlDir);
  if (!regions) throw new Error(`no weights file in ${controlDir}`);
  const t0 = performance.now();
  const vmm = new CudaVmm(loadCuda());
  const tInit = performance.now();
  const digests = new SourceDigests();
  // The digests are checked in the same run (a first restore on the node): their hashing overlaps the load.
  const loaded = await loadWeights({
    regions,
    vmm,
    deviceFor: (d) => d,
    openSource: (p) => open(p, constants.O_RDONLY | constants.O_NOFOLLOW),
    digests,
    ...(readersText ? { readers: Number(readersText) } : {}),
  });
  const tLoad = performance.now();
  const handover = await listenForWorker(controlDir, loaded.regions, (pid) => pid === workerPid);
  process.stdout.write('listening\n');
  await handover.delivered;
  loaded.release();
  await handover.close();
  const tDone = performance.now();
  const loadMs = tLoad - tInit;
  process.stdout.write(
    `${JSON.stringify({ bytes: loaded.bytes, cudaInitMs: Math.round(tInit - t0), loadMs: Math.round(loadMs), loadGBps: +(loaded.bytes / loadMs / 1e6).toFixed(2), handoverMs: Math.round(tDone - tLoad) })}\n`,
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`weights-check: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
