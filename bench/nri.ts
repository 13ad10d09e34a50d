/**
 * npm run bench:nri — what thaw's NRI plugin adds to a pod's start.
 *
 * On one private containerd, in one run, creates and starts pods with and without the thaw plugin connected,
 * in alternating rounds (so that drift of this shared machine hits both sides alike), and reports the
 * create→started latency (CRI CreateContainer + StartContainer) of each: median, p99 and their difference.
 * Pods without thaw annotations are what the goal is about (the plugin must add under 2 ms at p99 to pods it
 * does not touch); annotated pods are measured too, for information. A do-nothing plugin with thaw's event
 * subscriptions (bench/minimal-nri-plugin.ts) runs in each round too: what containerd's NRI costs by itself; and
 * containerd's own Go template plugin (built from Debian's packages by src/node-stack/go-nri-plugin.ts, provisioned
 * here on first use): the anchor, what a plugin written with the upstream Go stub costs (it subscribes to every event).
 *
 * Env: BENCH_PODS (per side, default 60, at least 50), BENCH_ROUNDS (default 6), THAW_CONTAINERD (1.7|2.1),
 * BENCH_PLUGIN_NICE (the plugin process's nice value, default 0), BENCH_MINIMAL_CREATE_ONLY=1 (the do-nothing
 * plugin subscribes to CreateContainer alone instead of thaw's events).
 * Last line of output: one JSON object.
 */
import { spawn } from 'node:child_process';
import { openSync, closeSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { cpus, setPriority, tmpdir } from 'node:os';
import { join } from 'node:path';
import { cleanupStaleStacks } from '../src/node-stack/index.js';
import { startNodeStack, type NodeStack } from '../src/node-stack/index.js';
import { parseFlavor } from '../src/node-stack/index.js';
import { pluginDirsUnder, readJsonLog, startThawPluginProcess, waitForLog, type ThawPluginProcess } from '../src/node-stack/index.js';
import { provisionGoNriPlugin } from '../src/node-stack/index.js';
import { percentile } from './stats.js';
import { renderTable } from '../src/table.js';

const MINIMAL_PLUGIN = fileURLToPath(new URL('./minimal-nri-plugin.js', import.meta.url));
const SLEEP = ['/bin/sh', '-c', "trap 'exit 0' TERM; sleep 3600 & wait"];

async function startPod(stack: NodeStack, name: string, annotations: Record<string, string>): Promise<{ ms: number; podId: string }> {
  const r = await stack.cri.runPod({ name, uid: `${name}-uid`, annotations, image: stack.images.busybox, command: SLEEP });
  return { ms: r.timings.createMs + r.timings.startMs, podId: r.podId };
}

const round1 = (v: number): number => Number(v.toFixed(1));

/**
 * Starts the Go template plugin on `socketPath`. The template has no socket flag (its stub dials the default
 * /var/run/nri/nri.sock), so it gets a connection made here, as fd 3 named by NRI_PLUGIN_SOCKET (the stub's
 * pre-connected-socket path, the one containerd uses for plugins it launches itself). Our copy is paused before
 * any byte is read and closed once the child holds it. Resolves once the plugin logged its Synchronize.
 */
async function startGoPlugin(binary: string, socketPath: string, logFile: string): Promise<{ stop(): Promise<void> }> {
  const sock = createConnection(socketPath);
  sock.pause();
  await new Promise<void>((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
  const logFd = openSync(logFile, 'a');
  const child = spawn(binary, ['-name', 'go-template', '-idx', '50'], {
    stdio: ['ignore', logFd, logFd, sock], env: { NRI_PLUGIN_SOCKET: '3', PATH: '/usr/bin:/bin' },
  });
  closeSync(logFd);
  sock.destroy();
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const deadline = Date.now() + 15_000;
  while (!/Synchronized state with the runtime/.test(await readFile(logFile, 'utf8').catch(() => ''))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the Go template plugin did not register; its log:\n${(await readFile(logFile, 'utf8').catch(() => '')).slice(-2000)}`);
    }
    await sleep(50);
  }
  return { stop: async () => { child.kill('SIGTERM'); await exited; } };
}

async function main(): Promise<void> {
  const podsPerSide = Math.max(50, Number(process.env['BENCH_PODS'] ?? 60));
  const rounds = Math.max(2, Number(process.env['BENCH_ROUNDS'] ?? 6));
  const pluginNice = Number(process.env['BENCH_PLUGIN_NICE'] ?? 0);
  const minimalCreateOnly = process.env['BENCH_MINIMAL_CREATE_ONLY'] === '1';
  const flavor = parseFlavor((process.env['THAW_CONTAINERD'] ?? '1.7').split(',')[0] ?? '1.7');
  await cleanupStaleStacks();
  const goPlugin = await provisionGoNriPlugin({});
  const workDir = await mkdtemp(join(tmpdir(), 'thaw-bench-nri-'));
  const stack = await startNodeStack({ flavor });
  let plugin: ThawPluginProcess | undefined;
  const without: number[] = [];
  const withPlugin: number[] = [];
  const touched: number[] = [];
  // A do-nothing plugin with thaw's subscriptions: containerd's own NRI cost, thaw's work left out.
  const withMinimal: number[] = [];
  // containerd's Go template plugin: the anchor.
  const withGo: number[] = [];
  // The plugin's own service time of each CreateContainer (from its debug log), untouched and annotated pods.
  const servedUntouched: number[] = [];
  const servedTouched: number[] = [];
  let seq = 0;
  const measure = async (into: number[], annotations: Record<string, string> = {}): Promise<void> => {
    const { ms, podId } = await startPod(stack, `bench-${seq++}`, annotations);
    into.push(ms);
    await stack.cri.removePod(podId);
  };
  try {
    // Warm-up: the first pods pay for image unpacking and cold caches.
    for (let i = 0; i < 3; i++) await measure([]);
    const perRound = Math.ceil(podsPerSide / rounds);
    for (let round = 0; round < rounds; round++) {
      for (let i = 0; i < perRound && without.length < podsPerSide; i++) await measure(without);
      const minimalLog = join(workDir, `minimal-${round}.log`);
      const minimal = spawn(process.execPath, [MINIMAL_PLUGIN, stack.nriSocketPath, minimalLog, ...(minimalCreateOnly ? ['create-only'] : [])], { stdio: 'inherit' });
      await waitForLog(minimalLog, (r) => r.msg === 'nri plugin synchronized', 'the minimal plugin to register');
      for (let i = 0; i < perRound && withMinimal.length < podsPerSide; i++) await measure(withMinimal);
      minimal.kill('SIGTERM');
      await new Promise((r) => minimal.once('exit', r));
      const go = await startGoPlugin(goPlugin.binary, stack.nriSocketPath, join(workDir, `go-${round}.log`));
      for (let i = 0; i < perRound && withGo.length < podsPerSide; i++) await measure(withGo);
      await go.stop();
      const logFile = join(workDir, `plugin-${round}.log`);
      plugin = startThawPluginProcess({ socketPath: stack.nriSocketPath, containerd: { socket: stack.address, root: stack.rootDir }, ...pluginDirsUnder(workDir, stack.paths.prefix, logFile) });
      // A node would run the agent at a raised CPU priority (systemd Nice=, or the DaemonSet's priority):
      // BENCH_PLUGIN_NICE measures that (as root, negative values raise it).
      if (pluginNice !== 0 && plugin.proc.pid !== undefined) setPriority(plugin.proc.pid, pluginNice);
      await waitForLog(logFile, (r) => r.msg === 'nri plugin synchronized', 'the plugin to register');
      for (let i = 0; i < perRound && withPlugin.length < podsPerSide; i++) {
        await measure(withPlugin);
        await measure(touched, { 'thaw.dev/checkpoint': `bench-${seq}` });
      }
      await plugin.stop();
      plugin = undefined;
      // Pods were created one at a time, untouched then annotated: the CreateContainer requests alternate.
      const creates = (await readJsonLog(logFile)).filter((r) => r.msg === 'nri request served' && r['method'] === 'CreateContainer');
      creates.forEach((r, i) => (i % 2 === 0 ? servedUntouched : servedTouched).push(Number(r['durationMs'])));
      process.stderr.write(`round ${round + 1}/${rounds}: ${without.length} pods without, ${withPlugin.length} with the plugin\n`);
    }
  } finally {
    await plugin?.stop();
    await stack.stop();
    await rm(workDir, { recursive: true, force: true });
  }

  const result = {
    bench: 'nri',
    containerd: stack.containerdVersion,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    pluginNice,
    minimalPluginEvents: minimalCreateOnly ? 'CreateContainer' : 'as thaw',
    pods: podsPerSide,
    p50MsWithout: percentile(without, 50),
    p99MsWithout: percentile(without, 99),
    p50MsWith: percentile(withPlugin, 50),
    p99MsWith: percentile(withPlugin, 99),
    p99AddedMs: percentile(withPlugin, 99) - percentile(without, 99),
    p50AddedMs: percentile(withPlugin, 50) - percentile(without, 50),
    p50MsTouched: percentile(touched, 50),
    p99MsTouched: percentile(touched, 99),
    p50Ratio: Number((percentile(withPlugin, 50) / percentile(without, 50)).toFixed(3)),
    p50MsMinimalPlugin: percentile(withMinimal, 50),
    p99MsMinimalPlugin: percentile(withMinimal, 99),
    p50MsGoPlugin: percentile(withGo, 50),
    p99MsGoPlugin: percentile(withGo, 99),
    goPlugin: goPlugin.stamp.source,
    /** thaw's plugin against containerd's Go template plugin: the goal is ≤ 1 ms at p50 and p99. */
    p50AddedOverGoMs: percentile(withPlugin, 50) - percentile(withGo, 50),
    p99AddedOverGoMs: percentile(withPlugin, 99) - percentile(withGo, 99),
    /** thaw's plugin against a do-nothing plugin with the same subscriptions: thaw's own share. */
    p50AddedOverMinimalMs: percentile(withPlugin, 50) - percentile(withMinimal, 50),
    p99AddedOverMinimalMs: percentile(withPlugin, 99) - percentile(withMinimal, 99),
    pluginServeP50MsUntouched: percentile(servedUntouched, 50, 3),
    pluginServeP99MsUntouched: percentile(servedUntouched, 99, 3),
    pluginServeP50MsTouched: percentile(servedTouched, 50, 3),
    pluginServeP99MsTouched: percentile(servedTouched, 99, 3),
  };
  process.stdout.write(
    renderTable(
      ['pods (create→started)', 'n', 'p50 ms', 'p99 ms'],
      [
        ['without plugin', without.length, result.p50MsWithout, result.p99MsWithout],
        [minimalCreateOnly ? 'do-nothing plugin, CreateContainer only' : 'do-nothing plugin, same events', withMinimal.length, result.p50MsMinimalPlugin, result.p99MsMinimalPlugin],
        ['containerd\'s Go template plugin', withGo.length, result.p50MsGoPlugin, result.p99MsGoPlugin],
        ['with plugin, untouched pod', withPlugin.length, result.p50MsWith, result.p99MsWith],
        ['with plugin, annotated pod', touched.length, result.p50MsTouched, result.p99MsTouched],
      ],
      { rule: true },
    ),
  );
  process.stdout.write(`a do-nothing plugin (${result.minimalPluginEvents}) adds p50 ${round1(result.p50MsMinimalPlugin - result.p50MsWithout)} ms, p99 ${round1(result.p99MsMinimalPlugin - result.p99MsWithout)} ms; thaw over it: p50 ${round1(result.p50AddedOverMinimalMs)} ms, p99 ${round1(result.p99AddedOverMinimalMs)} ms\n`);
  process.stdout.write(`thaw over containerd's Go template plugin: p50 ${round1(result.p50AddedOverGoMs)} ms, p99 ${round1(result.p99AddedOverGoMs)} ms (goal ≤ 1 ms)\n`);
  process.stdout.write(`added by the plugin to untouched pods: p50 ${result.p50AddedMs} ms (ratio ${result.p50Ratio}), p99 ${result.p99AddedMs} ms (goal < 2 ms)\n`);
  process.stdout.write(
    `the plugin's own CreateContainer service time: untouched pods p50 ${result.pluginServeP50MsUntouched} ms, p99 ${result.pluginServeP99MsUntouched} ms; annotated pods p50 ${result.pluginServeP50MsTouched} ms, p99 ${result.pluginServeP99MsTouched} ms\n`,
  );
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:nri failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
