/**
 * npm run bench:hook — the createRuntime hook's wall time per invocation, the way runc runs it: a fresh
 * process, an empty environment, the OCI state JSON on stdin, a real rootfs diff (20 files of 4 KiB, digests
 * checked) applied into a fresh rootfs each time. Args mode (no overlay: that needs a container's mount
 * namespace and costs the same nsenter + mount in both hooks).
 *
 * Two hooks, BENCH_HOOK_RUNS runs each (default 21), interleaved so that machine noise hits both alike:
 *   node    node dist/src/oci-hooks/main.js create-runtime ... (the hook as it was)
 *   native  native/build/thaw-hook, answered by this process's HookServer (the agent's, doing the same work)
 * Last line: one JSON object with each hook's median and p90 ms.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import { startHookServer } from '../src/agent/index.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const NODE_HOOK = join(ROOT, 'dist/src/oci-hooks/main.js');
const NATIVE_HOOK = join(ROOT, 'native/build/thaw-hook');
const BUDGET_MS = 50_000;
const WAIT_MS = 55_000;

function runOnce(argv: string[], stdin: string): Promise<{ ms: number; code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(argv[0] as string, argv.slice(1), { env: {}, stdio: ['pipe', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ ms: performance.now() - t0, code, stderr }));
    child.stdin.end(stdin);
  });
}

const quantile = (xs: number[], q: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] as number;
};

async function main(): Promise<void> {
  const runs = Number(process.env['BENCH_HOOK_RUNS'] ?? 21);
  if (!existsSync(NODE_HOOK) || !existsSync(NATIVE_HOOK)) throw new Error('build first: npm run build && make -C native');
  const work = await mkdtemp(join(tmpdir(), 'thaw-bench-hook-'));
  const server = await startHookServer({ socketPath: join(work, 'run', 'hook.sock') });
  try {
    const src = join(work, 'src');
    await mkdir(join(src, 'app', 'data'), { recursive: true });
    for (let i = 0; i < 20; i++) await writeFile(join(src, 'app', 'data', `f${i}`), createHash('sha256').update(String(i)).digest('hex').repeat(64));
    const ckpt = join(work, 'ckpt');
    await mkdir(ckpt);
    execFileSync('tar', ['--format=ustar', '-C', src, '-cf', join(ckpt, 'rootfs-diff.tar'), 'app']);
    await writeFile(join(ckpt, 'deleted-files.json'), '[]\n');
    const sha = async (f: string): Promise<string> => createHash('sha256').update(await readFile(f)).digest('hex');
    const digests = `${await sha(join(ckpt, 'rootfs-diff.tar'))}:${await sha(join(ckpt, 'deleted-files.json'))}`;
    const times: Record<'node' | 'native', number[]> = { node: [], native: [] };
    for (let i = 0; i < runs; i++) {
      for (const kind of ['node', 'native'] as const) {
        const id = `bench-${kind}-${i}`;
        const bundle = join(work, 'bundles', id);
        const controlDir = join(work, 'control', id);
        await mkdir(join(bundle, 'rootfs', 'bin'), { recursive: true });
        await mkdir(controlDir, { recursive: true });
        await writeFile(join(bundle, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', root: { path: 'rootfs' }, process: { args: ['/bin/sh'], env: ['PATH=/bin'], cwd: '/' } }));
        const state = JSON.stringify({ ociVersion: '1.0.2', id, status: 'creating', pid: process.pid, bundle, annotations: { 'io.kubernetes.cri.container-type': 'container' } });
        const options = { mode: 'args' as const, controlDir, checkpointDir: ckpt, thawPausePath: '/bin/true', budgetMs: BUDGET_MS, diffSha256: { rootfsDiff: digests.slice(0, 64), deletedFiles: digests.slice(65) } };
        let r;
        if (kind === 'node') {
          r = await runOnce([process.execPath, NODE_HOOK, 'create-runtime', '--mode', 'args', '--control-dir', controlDir, '--checkpoint-dir', ckpt, '--thaw-pause', '/bin/true', '--budget-ms', String(BUDGET_MS), '--diff-sha256', digests], state);
        } else {
          server.expect(id, options);
          r = await runOnce([NATIVE_HOOK, '--socket', server.socketPath, '--control-dir', controlDir, '--budget-ms', String(BUDGET_MS), '--wait-ms', String(WAIT_MS)], state);
        }
        const done = existsSync(join(controlDir, '.thaw-hook.json')) && existsSync(join(bundle, 'rootfs', 'app', 'data', 'f19'));
        if (r.code !== 0 || !done) throw new Error(`${kind} hook run ${i}: exit ${r.code}, done ${done}: ${r.stderr}`);
        times[kind].push(r.ms);
      }
    }
    const summary = Object.fromEntries(
      Object.entries(times).map(([k, xs]) => [k, { medianMs: Number(quantile(xs, 0.5).toFixed(1)), p90Ms: Number(quantile(xs, 0.9).toFixed(1)), runs: xs.length }]),
    );
    process.stderr.write(`bench:hook: node median ${summary['node']?.medianMs} ms, native median ${summary['native']?.medianMs} ms (${runs} runs each)\n`);
    process.stdout.write(`${JSON.stringify({ hook: summary })}\n`);
  } finally {
    await server.close();
    await rm(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:hook: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
