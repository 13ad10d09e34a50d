/**
 * The NRI plugin against the real containerd of the private node stack (src/node-stack; containerd 1.7.24
 * by default, THAW_CONTAINERD picks the flavors): pre-launched registration and CreateContainer adjustment
 * of a CRI pod, re-registration after a containerd restart, containerd surviving a SIGKILLed plugin, and
 * a runtime-launched plugin (NN-name in the stack's plugin dir, fd 3, empty environment).
 *
 * Launched and out-of-process plugins need JavaScript: beforeAll compiles src/nri-plugin with tsc into a
 * temporary directory (with proto/ and node_modules linked beside it, as in the built package).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync, cpSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { cleanupStaleStacks } from '../../src/node-stack/cleanup.js';
import { startNodeStack, type NodeStack } from '../../src/node-stack/containerd.js';
import { AdjustmentBuilder, createNriPlugin, type NriPlugin, type PodSandbox, type Container } from '../../src/nri-plugin/index.js';
import { writeShellLauncher } from '../../src/nri-plugin/launcher.js';
import { flavorsUnderTest, waitFor } from '../helpers/stack.js';

const REPO = path.resolve(import.meta.dirname, '../..');

/** Compiles the plugin library to `<dir>/src/nri-plugin/*.js`, laid out like the built package. */
function buildPluginLibrary(dir: string): void {
  const tsc = path.join(REPO, 'node_modules/typescript/bin/tsc');
  const r = spawnSync(
    process.execPath,
    [tsc, '--module', 'NodeNext', '--moduleResolution', 'NodeNext', '--target', 'ES2022', '--types', 'node', '--skipLibCheck',
      '--rootDir', REPO, '--outDir', dir, path.join(REPO, 'src/nri-plugin/index.ts')],
    { encoding: 'utf8', timeout: 120_000 },
  );
  if (r.status !== 0) throw new Error(`tsc failed (${r.status}): ${r.stdout}\n${r.stderr}`);
  cpSync(path.join(REPO, 'proto'), path.join(dir, 'proto'), { recursive: true });
  symlinkSync(path.join(REPO, 'node_modules'), path.join(dir, 'node_modules'));
  writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ type: 'module' }));
}

/** A plugin script: launched mode (no argv) or pre-launched (argv[2] = socket path); logs to argv/env-given file. */
function writePluginScript(dir: string): string {
  const script = path.join(dir, 'plugin.mjs');
  writeFileSync(
    script,
    `import { runLaunchedPlugin, createNriPlugin, createFileLogger } from './src/nri-plugin/index.js';
const logFile = process.env.PLUGIN_LOG ?? ${JSON.stringify(path.join(dir, 'launched.log'))};
const handlers = {
  configure: (c, name, version) => {},
  createContainer: (pod, ctr, ctx) => { ctx.logger.info('event CreateContainer', { pod: pod.name, container: ctr.name }); return { env: [{ key: 'THAW_LAUNCHED_SAW', value: '1' }] }; },
  startContainer: (pod, ctr, ctx) => ctx.logger.info('event StartContainer', { container: ctr.name }),
};
if (process.argv[2]) {
  const logger = createFileLogger(logFile);
  const p = createNriPlugin({ name: 'killme', idx: '20', handlers, logger, socketPath: process.argv[2], reconnect: false });
  await p.start();
  logger.info('READY');
} else {
  await runLaunchedPlugin({ handlers, logFile });
}
`,
  );
  return script;
}

const logLines = (file: string): Array<Record<string, unknown>> =>
  existsSync(file)
    ? readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>)
    : [];

describe.each(flavorsUnderTest())('NRI plugin lifecycle on containerd %s', (flavor) => {
  let stack: NodeStack;
  let buildDir: string;
  let script: string;
  const launchedLog = (): string => path.join(buildDir, 'launched.log');

  beforeAll(async () => {
    buildDir = mkdtempSync('/tmp/thaw-nri-build-');
    buildPluginLibrary(buildDir);
    script = writePluginScript(buildDir);
    const launcher = path.join(buildDir, 'launcher', '10-thawtest');
    writeShellLauncher({ path: launcher, scriptPath: script });
    await cleanupStaleStacks();
    stack = await startNodeStack({ flavor, nri: { launchedPlugins: [{ name: '10-thawtest', path: launcher }] } });
  }, 240_000);

  afterAll(async () => {
    await stack?.stop();
    if (buildDir) rmSync(buildDir, { recursive: true, force: true });
  }, 120_000);

  it('a pre-launched plugin registers, adjusts a CRI pod at CreateContainer and re-registers after a containerd restart', async () => {
    const logger = createCollectingLogger();
    const created: Array<{ pod: PodSandbox; container: Container }> = [];
    const configures: string[] = [];
    const plugin: NriPlugin = createNriPlugin({
      name: 'thaw-it',
      idx: '50',
      logger,
      socketPath: stack.nriSocketPath,
      reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
      onConfigure: (info) => configures.push(`${info.name} ${info.version} 0x${info.events.toString(16)}`),
      handlers: {
        createContainer: (pod, container, ctx) => {
          created.push({ pod, container });
          return new AdjustmentBuilder().addEnv('THAW_NRI_TEST', 'adjusted').addAnnotation('thaw.dev/nri-test', 'yes').build(ctx.runtime).adjustment;
        },
        removeContainer: () => undefined,
      },
    });
    try {
      await plugin.start();
      await plugin.waitForState('synchronized', { timeoutMs: 10_000 });
      expect(configures[0]).toMatch(/^containerd v?\d+\.\d+\.\d+.* 0x408$/);

      const pod = await stack.cri.runPod({ name: 'nri-a', image: stack.images.busybox, command: ['/bin/sh', '-c', 'exec sleep 1000'] });
      expect(created.map((c) => c.pod.name)).toContain('nri-a');
      const env = await stack.cri.execSync(pod.containerId, ['/bin/sh', '-c', 'echo $THAW_NRI_TEST']);
      expect(env.stdout.trim()).toBe('adjusted');

      await stack.restartContainerd();
      await waitFor(() => (configures.length >= 2 ? true : undefined), 'the plugin to register again after the restart', 30_000);
      await plugin.waitForState('synchronized', { timeoutMs: 10_000 });
      const pod2 = await stack.cri.runPod({ name: 'nri-b', image: stack.images.busybox, command: ['/bin/sh', '-c', 'exec sleep 1000'] });
      expect(created.map((c) => c.pod.name)).toContain('nri-b');
      expect((await stack.cri.execSync(pod2.containerId, ['/bin/sh', '-c', 'echo $THAW_NRI_TEST'])).stdout.trim()).toBe('adjusted');
      expect(logger.lines.some((l) => l.msg.includes('connection to the runtime lost, reconnecting'))).toBe(true);
      await stack.cri.removePod(pod.podId);
      await stack.cri.removePod(pod2.podId);
    } finally {
      await plugin.close();
    }
  }, 180_000);

  it('the runtime-launched plugin (NN-name in the plugin dir) got Configure and sees CreateContainer through fd 3', async () => {
    const pod = await stack.cri.runPod({ name: 'nri-launched', image: stack.images.busybox, command: ['/bin/sh', '-c', 'exec sleep 1000'] });
    const lines = await waitFor(() => {
      const l = logLines(launchedLog());
      return l.some((x) => x['msg'] === 'event CreateContainer' && x['pod'] === 'nri-launched') ? l : undefined;
    }, 'the launched plugin to log CreateContainer', 10_000);
    expect(lines.some((l) => l['msg'] === 'nri plugin configured')).toBe(true);
    expect(lines.find((l) => l['msg'] === 'launched NRI plugin starting')).toMatchObject({ name: 'thawtest', idx: '10', fd: 3 });
    // The first test restarted containerd: the first launched instance saw EOF and exited, a new one was launched.
    expect(lines.filter((l) => l['msg'] === 'launched NRI plugin exiting').map((l) => l['reason'])).toContain('eof');
    expect(lines.filter((l) => l['msg'] === 'launched NRI plugin starting').length).toBeGreaterThanOrEqual(2);
    expect((await stack.cri.execSync(pod.containerId, ['/bin/sh', '-c', 'echo $THAW_LAUNCHED_SAW'])).stdout.trim()).toBe('1');
    await stack.cri.removePod(pod.podId);
  }, 120_000);

  it('containerd survives a SIGKILLed plugin: pods still start', async () => {
    const log = path.join(buildDir, 'killme.log');
    const child: ChildProcess = spawn(process.execPath, [script, stack.nriSocketPath], { env: { PLUGIN_LOG: log }, stdio: 'ignore' });
    try {
      await waitFor(() => (logLines(log).some((l) => l['msg'] === 'READY') ? true : undefined), 'the out-of-process plugin to register', 20_000);
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      const pod = await stack.cri.runPod({ name: 'nri-after-kill', image: stack.images.busybox, command: ['/bin/sh', '-c', 'exec sleep 1000'] });
      const status = await stack.cri.containerStatus(pod.containerId);
      expect(status.status.state).toBe('CONTAINER_RUNNING');
      await stack.cri.removePod(pod.podId);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  }, 120_000);
});
