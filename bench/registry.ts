/**
 * npm run bench:registry — push and pull of a multi-GB checkpoint through a real registry on loopback
 * (Debian's docker-registry, as the tests run it), next to curl fetching the same blobs in the same run.
 *
 * Each round: push the checkpoint to a fresh repository (every blob is uploaded: HEAD finds none there), pull it
 * into an empty store (every byte fetched, sha256-checked and written; the file cache off so nothing is
 * linked), then curl fetches the same layer blobs from the registry into files, with the same number of
 * parallel transfers. Medians over the rounds; the last line is JSON.
 *
 * Env: BENCH_REGISTRY_BYTES (checkpoint size, default 2e9), BENCH_ROUNDS (default 3),
 * BENCH_CONCURRENCY (parallel transfers for pull and curl, default 8), BENCH_CHUNK_MB (layer size, default 64).
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtemp, open, readdir, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { startRegistry } from '../src/node-stack/registry.js';
import { openLocalStore } from '../src/store/local-store.js';
import { RegistryClient } from '../src/store/oci/client.js';
import { pullCheckpoint } from '../src/store/oci/pull.js';
import { pushCheckpoint } from '../src/store/oci/push.js';
import { percentile, renderTable } from './stats.js';

const execFileP = promisify(execFile);
const GB = 1e9;
const MiB = 1024 * 1024;
const round = (v: number, d = 3): number => Number(v.toFixed(d));
const median = (values: number[]): number => percentile(values, 50, 3);

async function main(): Promise<void> {
  const bytes = Number(process.env['BENCH_REGISTRY_BYTES'] ?? 2e9);
  const rounds = Number(process.env['BENCH_ROUNDS'] ?? 3);
  const concurrency = Number(process.env['BENCH_CONCURRENCY'] ?? 8);
  const chunkBytes = Number(process.env['BENCH_CHUNK_MB'] ?? 64) * MiB;
  const say = (line: string): void => void process.stderr.write(`bench:registry: ${line}\n`);
  const work = await mkdtemp(join(tmpdir(), 'thaw-bench-registry-'));
  const registry = await startRegistry();
  try {
    // A checkpoint as the checkpoint flow leaves it: one large pages image (incompressible bytes) and small files.
    const storeA = await openLocalStore({ root: join(work, 'a') });
    const pending = await storeA.beginCheckpoint('bench');
    const fh = await open(join(pending.paths.criuDir, 'pages-1.img'), 'w', 0o600);
    const block = Buffer.allocUnsafe(8 * MiB);
    for (let written = 0; written < bytes; ) {
      const n = Math.min(block.length, bytes - written);
      randomFillSync(block, 0, n);
      await fh.write(block, 0, n);
      written += n;
    }
    await fh.close();
    await writeFile(join(pending.paths.criuDir, 'inventory.img'), 'inventory');
    await writeFile(pending.paths.rootfsDiff, Buffer.alloc(10240));
    await writeFile(pending.paths.deletedFiles, '[]\n');
    const t0 = performance.now();
    await pending.publish({
      source: { nodeHostname: 'bench', container: { name: 'w', id: 'c' }, command: ['w'], args: [], envKeys: [] },
      constraints: { arch: { node: process.arch, machine: 'x86_64' }, kernelRelease: 'k', criuVersion: '4', containerdVersion: '1', image: { ref: 'bench:1' } },
      criu: { pid: 1, externalMounts: [], stdioFds: [], options: {} },
    });
    say(`checkpoint of ${bytes} bytes published (hashing took ${Math.round(performance.now() - t0)} ms); registry ${registry.url}`);

    const rows: Array<{ round: number; pushMs: number; pullMs: number; curlMs: number }> = [];
    for (let r = 1; r <= rounds; r++) {
      const repo = `bench/ckpt-${r}`;
      const pushed = await pushCheckpoint({ store: storeA, name: 'bench', reference: `${registry.host}/${repo}:v1`, access: { plainHttp: true }, chunkBytes, concurrency: 4 });
      const rootB = join(work, `b-${r}`);
      const storeB = await openLocalStore({ root: rootB });
      const pulled = await pullCheckpoint({ store: storeB, reference: `${registry.host}/${repo}@${pushed.digest}`, access: { plainHttp: true }, concurrency, cache: false });
      if (pulled.bytesFetched < bytes) throw new Error(`the pull fetched ${pulled.bytesFetched} bytes of ${bytes}`);
      await rm(rootB, { recursive: true, force: true });

      // curl: the same layer blobs, the same parallelism, into files on the same filesystem.
      const client = new RegistryClient({ registry: registry.host, plainHttp: true });
      const image = JSON.parse((await client.getManifest(repo, pushed.digest)).body.toString('utf8')) as { layers: Array<{ digest: string }> };
      client.close();
      const curlDir = join(work, `curl-${r}`);
      await rm(curlDir, { recursive: true, force: true });
      await execFileP('mkdir', ['-p', curlDir]);
      const args = ['--silent', '--show-error', '--fail', '--parallel', '--parallel-max', String(concurrency)];
      image.layers.forEach((l, i) => args.push('-o', join(curlDir, `${i}`), `${registry.url}/v2/${repo}/blobs/${l.digest}`));
      const c0 = performance.now();
      await execFileP('curl', args, { maxBuffer: 1 << 20 });
      const curlMs = performance.now() - c0;
      if ((await readdir(curlDir)).length !== image.layers.length) throw new Error('curl did not fetch every layer');
      await rm(curlDir, { recursive: true, force: true });
      rows.push({ round: r, pushMs: pushed.ms, pullMs: pulled.ms, curlMs });
      say(`round ${r}: push ${Math.round(pushed.ms)} ms, pull ${Math.round(pulled.ms)} ms (${JSON.stringify(pulled.phases)}), curl ${Math.round(curlMs)} ms`);
    }
    const rate = (ms: number): number => round(bytes / GB / (ms / 1000));
    const pushGBps = median(rows.map((x) => rate(x.pushMs)));
    const pullGBps = median(rows.map((x) => rate(x.pullMs)));
    const curlGBps = median(rows.map((x) => rate(x.curlMs)));
    process.stdout.write(
      renderTable(
        ['round', 'push ms', 'push GB/s', 'pull ms', 'pull GB/s', 'curl ms', 'curl GB/s', 'pull/curl'],
        rows.map((x) => [x.round, Math.round(x.pushMs), rate(x.pushMs), Math.round(x.pullMs), rate(x.pullMs), Math.round(x.curlMs), rate(x.curlMs), round(x.curlMs / x.pullMs)]),
      ),
    );
    process.stdout.write(`medians: push ${pushGBps} GB/s, pull ${pullGBps} GB/s, curl ${curlGBps} GB/s; pull/curl ${round(pullGBps / curlGBps)} (goal >= 0.9)\n`);
    process.stdout.write(
      `${JSON.stringify({ bench: 'registry', cpus: cpus().length, cpuModel: cpus()[0]?.model ?? 'unknown', registry: 'docker-registry 2.8.3 (loopback, http)', bytes, rounds, concurrency, chunkBytes, pushGBps, pullGBps, curlGBps, pullOverCurl: round(pullGBps / curlGBps), runs: rows.map((x) => ({ pushMs: Math.round(x.pushMs), pullMs: Math.round(x.pullMs), curlMs: Math.round(x.curlMs) })) })}\n`,
    );
  } finally {
    await registry.stop();
    await rm(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:registry failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
