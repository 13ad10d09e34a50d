/**
 * thaw's NRI plugin, as the process a node runs, against a real private containerd (1.7.24 by default;
 * THAW_CONTAINERD=2.1 for 2.1.9): what an annotated pod's container sees from inside, that other pods are
 * untouched, that bad annotations never fail a pod, and the plugin's life beside containerd's.
 */
import { mkdtemp, rm, writeFile, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NodeStack } from '../../src/node-stack/containerd.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import { stackPaths } from '../../src/node-stack/paths.js';
import { eventMaskOf } from '../../src/nri-plugin/plugin-handlers.js';
import {
  ensureBuilt,
  pluginDirsUnder,
  readJsonLog,
  startThawPluginProcess,
  waitForLog,
  writeLaunchedPluginScript,
  type ThawPluginProcess,
} from '../helpers/thaw-plugin-process.js';

const SLEEP = ['/bin/sh', '-c', "trap 'exit 0' TERM; sleep 3600 & wait"];

/** The OCI spec of a container with everything that names this pod or container instance replaced. */
async function normalisedSpec(stack: NodeStack, podId: string, containerId: string): Promise<string> {
  const { runtimeSpec } = await stack.cri.containerStatus(containerId, true);
  expect(runtimeSpec, 'containerd returns the OCI spec in verbose ContainerStatus').toBeDefined();
  // The sandbox's pid appears in the namespace paths the container joins (/proc/<pid>/ns/ipc).
  return JSON.stringify(runtimeSpec)
    .split(podId)
    .join('<pod>')
    .split(containerId)
    .join('<container>')
    .replace(/\/proc\/\d+\/ns\//g, '/proc/<sandbox-pid>/ns/');
}

async function execOut(stack: NodeStack, containerId: string, cmd: string[]): Promise<string> {
  const r = await stack.cri.execSync(containerId, cmd, 10);
  expect(r.exitCode, `${cmd.join(' ')}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

describe.each(flavorsUnderTest())('thaw NRI plugin on containerd %s', (flavor) => {
  let workDir: string;
  let controlRoot: string;
  let launchedLog: string;
  beforeAll(async () => {
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-nri-'));
    controlRoot = join(workDir, 'control');
    launchedLog = join(workDir, 'launched.log');
    await writeLaunchedPluginScript(join(workDir, '60-thaw'), { ...pluginDirsUnder(workDir, stackPaths(flavor).prefix, launchedLog), controlRoot });
  });
  afterAll(async () => {
    await rm(workDir, { recursive: true, force: true });
  });

  describe('pre-launched (connects to the NRI socket)', () => {
    const handle = useNodeStack({ flavor });
    let plugin: ThawPluginProcess | undefined;
    let logFile: string;
    const started: string[] = [];

    const startPlugin = async (): Promise<ThawPluginProcess> => {
      logFile = join(workDir, `plugin-${Date.now()}.log`);
      const p = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...pluginDirsUnder(workDir, handle.stack.paths.prefix, logFile), controlRoot });
      await waitForLog(logFile, (r) => r.msg === 'nri plugin synchronized', 'the plugin to register and synchronize');
      return p;
    };
    const runPod = async (name: string, annotations: Record<string, string> = {}, env: Record<string, string> = {}) => {
      const r = await handle.stack.cri.runPod({ name, uid: `${name}-uid`, annotations, env, image: handle.stack.images.busybox, command: SLEEP });
      started.push(r.podId);
      return r;
    };
    afterAll(async () => {
      await plugin?.stop();
    });

    it('leaves a pod without thaw annotations byte-for-byte untouched', async () => {
      const stack = handle.stack;
      const baseline = await runPod('plain', { 'example.com/team': 'infra' });
      const withoutPlugin = await normalisedSpec(stack, baseline.podId, baseline.containerId);
      await stack.cri.removePod(baseline.podId);

      plugin = await startPlugin();
      const again = await runPod('plain', { 'example.com/team': 'infra' });
      const withPlugin = await normalisedSpec(stack, again.podId, again.containerId);
      expect(withPlugin).toEqual(withoutPlugin);
      await stack.cri.removePod(again.podId);
    });

    it("runs an annotated pod's container with the control directory, environment and annotations", async () => {
      const stack = handle.stack;
      const pod = await runPod('source', { 'thaw.dev/checkpoint': 'demo-worker' }, { NCCL_SOCKET_IFNAME: 'eth7' });

      const env = await execOut(stack, pod.containerId, ['env']);
      expect(env).toContain('SNAPSHOT_CONTROL_DIR=/snapshot-control\n');
      expect(env).toContain('DYN_SNAPSHOT_CONTROL_DIR=/snapshot-control\n');
      expect(env).toContain('NCCL_CUMEM_ENABLE=0\n');
      expect(env).toContain('UV_USE_IO_URING=0\n');
      expect(env, "the pod's own setting wins over thaw's default").toContain('NCCL_SOCKET_IFNAME=eth7\n');

      // The mount is the host's per-container control directory, writable both ways.
      const hostDir = join(controlRoot, pod.containerId);
      await writeFile(join(hostDir, 'from-host'), 'hello from the host\n');
      expect(await execOut(stack, pod.containerId, ['cat', '/snapshot-control/from-host'])).toBe('hello from the host\n');
      // Not the ready marker: that would start a real checkpoint, and this test removes the pod right after
      // (a pod stopped while CRIU dumps it waits for the dump; CI once hit StopPodSandbox's deadline that way).
      await execOut(stack, pod.containerId, ['sh', '-c', 'echo from-container > /snapshot-control/from-container']);
      expect(await readFile(join(hostDir, 'from-container'), 'utf8')).toBe('from-container\n');
      expect(await execOut(stack, pod.containerId, ['grep', ' /snapshot-control ', '/proc/mounts'])).toMatch(/ rw[ ,]/);

      const { runtimeSpec } = await stack.cri.containerStatus(pod.containerId, true);
      const annotations = (runtimeSpec as { annotations?: Record<string, string> }).annotations ?? {};
      expect(annotations).toMatchObject({
        'thaw.dev/role': 'checkpoint-source',
        'thaw.dev/checkpoint-name': 'default/demo-worker',
        'thaw.dev/control-dir': hostDir,
      });

      // RemoveContainer cleans the control directory up.
      await stack.cri.removePod(pod.podId);
      await waitFor(async () => ((await readFile(join(hostDir, 'from-host')).catch(() => undefined)) === undefined ? true : undefined), 'the control dir to be removed');
    });

    it('asks for no PostStartContainer: an untouched pod pays one round trip; a managed container tells its start through its poststart hook', async () => {
      const stack = handle.stack;
      const configured = (await readJsonLog(logFile)).filter((r) => r.msg === 'nri plugin configured').at(-1);
      const events = Number.parseInt(String(configured?.['events']), 16);
      const postStart = eventMaskOf({ postStartContainer: () => undefined });
      expect(events & eventMaskOf({ createContainer: () => undefined }), 'subscribed to CreateContainer').not.toBe(0);
      expect(events & postStart, `events ${String(configured?.['events'])} without PostStartContainer`).toBe(0);

      const plain = await runPod('plain-start');
      const source = await runPod('source-start', { 'thaw.dev/checkpoint': 'start-signal' });
      // The managed container's spec has the hook, the untouched one's has none.
      const hooksOf = async (id: string) => ((await stack.cri.containerStatus(id, true)).runtimeSpec as { hooks?: Record<string, Array<{ path: string; args?: string[] }>> }).hooks ?? {};
      expect((await hooksOf(plain.containerId))['poststart'] ?? []).toEqual([]);
      const poststart = (await hooksOf(source.containerId))['poststart'] ?? [];
      expect(poststart).toHaveLength(1);
      expect(poststart[0]!.path).toMatch(/\/thaw-hook$/);
      expect(poststart[0]!.args).toContain('--started');
      // runc ran it: the agent was told the container's host pid, the one containerd has for its task.
      const told = await waitForLog(logFile, (r) => r.msg === 'thaw: a container started (its poststart hook)' && r['containerId'] === source.containerId, 'the poststart hook\'s word');
      const { pid } = await stack.cri.containerStatus(source.containerId, true);
      expect(pid).toBeGreaterThan(0);
      expect(told['pid']).toBe(pid);
      const methods = (await readJsonLog(logFile)).filter((r) => r.msg === 'nri request served').map((r) => String(r['method']));
      expect(methods).toContain('CreateContainer');
      expect(methods).not.toContain('PostStartContainer');
      expect((await readJsonLog(logFile)).some((r) => r.msg === 'thaw: a container started (its poststart hook)' && r['containerId'] === plain.containerId)).toBe(false);
      await stack.cri.removePod(plain.podId);
      await stack.cri.removePod(source.podId);
    });

    const malformed: Array<[string, Record<string, string>]> = [
      ['a typo under the prefix', { 'thaw.dev/chekpoint': 'x' }],
      ['a path-escaping checkpoint name', { 'thaw.dev/restore': '../../etc/shadow' }],
      ['a NUL byte in the name', { 'thaw.dev/checkpoint': 'a\u0000b' }],
      ['both roles', { 'thaw.dev/checkpoint': 'a', 'thaw.dev/restore': 'a' }],
    ];
    it.each(malformed)('creates the container unchanged and logs why for %s', async (_what, annotations) => {
      const stack = handle.stack;
      const name = `bad-${started.length}`;
      const pod = await runPod(name, annotations);
      const status = await stack.cri.containerStatus(pod.containerId);
      expect(status.status.state).toBe('CONTAINER_RUNNING');
      expect(await execOut(stack, pod.containerId, ['env'])).not.toContain('SNAPSHOT_CONTROL_DIR');
      const line = await waitForLog(logFile, (r) => r.msg.includes('malformed annotation') && r['containerId'] === pod.containerId, 'the rejection log line');
      expect(line.level).toBe('warn');
      expect(String(line['reason'])).not.toBe('');
      await stack.cri.removePod(pod.podId);
    });

    it('survives a containerd restart: it reconnects, re-registers and adjusts the next pod', async () => {
      const stack = handle.stack;
      const before = (await readJsonLog(logFile)).filter((r) => r.msg === 'nri plugin synchronized').length;
      await stack.restartContainerd();
      await waitFor(async () => ((await readJsonLog(logFile)).filter((r) => r.msg === 'nri plugin synchronized').length > before ? true : undefined), 'the plugin to re-register', 30_000);
      const pod = await runPod('after-restart', { 'thaw.dev/checkpoint': 'after-restart' });
      expect(await execOut(stack, pod.containerId, ['env'])).toContain('SNAPSHOT_CONTROL_DIR=/snapshot-control\n');
      await stack.cri.removePod(pod.podId);
    });

    it('leaves containerd working when the plugin is killed', async () => {
      const stack = handle.stack;
      const victim = plugin!;
      victim.proc.kill('SIGKILL');
      await victim.exited;
      plugin = undefined;
      const pod = await runPod('after-kill', { 'thaw.dev/checkpoint': 'after-kill' });
      expect((await stack.cri.containerStatus(pod.containerId)).status.state).toBe('CONTAINER_RUNNING');
      expect(await execOut(stack, pod.containerId, ['env']), 'no plugin, no adjustment').not.toContain('SNAPSHOT_CONTROL_DIR');
      await stack.cri.removePod(pod.podId);
      // A new plugin process connects to the same containerd and works again.
      plugin = await startPlugin();
      const next = await runPod('after-reconnect', { 'thaw.dev/checkpoint': 'x' });
      expect(await execOut(stack, next.containerId, ['env'])).toContain('SNAPSHOT_CONTROL_DIR=/snapshot-control\n');
      await stack.cri.removePod(next.podId);
    });
  });

  describe('runtime-launched (containerd starts it from its plugin dir, socket on fd 3)', () => {
    const handle = useNodeStack({
      flavor,
      nri: {
        launchedPlugins: [
          {
            name: '60-thaw',
            get path() {
              return join(workDir, '60-thaw');
            },
          },
        ],
      },
    });

    it('adjusts an annotated pod', async () => {
      const stack = handle.stack;
      await waitForLog(launchedLog, (r) => r.msg === 'nri plugin configured', 'containerd to launch and configure the plugin');
      const starts = (await readJsonLog(launchedLog)).filter((r) => r.msg === 'thaw agent started');
      expect(starts[0]?.['mode']).toBe('runtime-launched');
      const pod = await stack.cri.runPod({ name: 'launched', uid: 'launched-uid', annotations: { 'thaw.dev/checkpoint': 'l' }, image: stack.images.busybox, command: SLEEP });
      expect(await execOut(stack, pod.containerId, ['env'])).toContain('SNAPSHOT_CONTROL_DIR=/snapshot-control\n');
      await stack.cri.removePod(pod.podId);
    });
  });
});
