/**
 * The private node stack against the real thing: Debian's containerd, runc and CRIU from
 * /opt/thaw/stack (provisioned by scripts/setup.sh). Runs for each flavor in THAW_CONTAINERD (default 1.7).
 */
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  cleanupStaleStacks, listProcesses, mountsUnder, processStartTicks, stackProcesses, STACK_MARKER_FILE, type StackMarker,
} from '../../src/node-stack/cleanup.js';
import { importImage, startNodeStack, UNIX_SOCKET_PATH_MAX_BYTES } from '../../src/node-stack/containerd.js';
import { buildBusyboxRootfs, tempRootfsDir } from '../../src/node-stack/images.js';
import { parseCriLog } from '../../src/node-stack/cri-client.js';
import { stackPaths } from '../../src/node-stack/paths.js';
import { checkStack, isProvisioned, provisionStack } from '../../src/node-stack/provision.js';
import { isThawError } from '../../src/errors.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';

async function leftovers(dir: string): Promise<{ processes: number[]; mounts: string[]; dirExists: boolean }> {
  const processes = stackProcesses(await listProcesses(), dir).map((p) => p.pid);
  const mounts = mountsUnder(await readFile('/proc/self/mountinfo', 'utf8'), dir);
  const dirExists = await stat(dir).then(() => true, () => false);
  return { processes, mounts, dirExists };
}

describe.each(flavorsUnderTest())('node stack, containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });

  it('is provisioned and criu check says "Looks good"', async () => {
    expect(await isProvisioned(flavor)).toBeDefined();
    const versions = await checkStack(stackPaths(flavor));
    expect(versions.containerd).toContain(flavor === '1.7' ? '1.7.' : '2.1.');
    expect(versions.tar).toContain('GNU tar');
    // The second provisioning of a provisioned flavor is a stamp check (no apt-get).
    const again = await provisionStack({ flavor });
    expect(again.built).toBe(false);
  });

  it('runs containerd with NRI enabled on its own socket', async () => {
    const { stack } = handle;
    expect(stack.containerdVersion.startsWith(flavor)).toBe(true);
    expect((await stat(stack.nriSocketPath)).isSocket()).toBe(true);
    for (const p of [stack.address, stack.nriSocketPath, stack.ttrpcAddress]) {
      expect(Buffer.byteLength(p)).toBeLessThanOrEqual(UNIX_SOCKET_PATH_MAX_BYTES);
    }
    const log = await stack.logTail(1_000_000);
    expect(log).toContain('using experimental NRI integration');
    expect(log).toContain('Registered namespace \\"k8s.io\\" with NRI');
    const images = await stack.cri.listImages();
    const tags = images.flatMap((i) => i.repo_tags);
    expect(tags).toContain(stack.images.busybox);
    expect(tags).toContain(stack.images.pause);
  });

  it('runs a pod whose output ExecSync and the container log both see', async () => {
    const { stack } = handle;
    const pod = await stack.cri.runPod({
      name: 'hello',
      image: stack.images.busybox,
      command: ['/bin/sh', '-c', 'echo "hello from $$"; echo oops >&2; echo written > /tmp/out; exec sleep 1000'],
    });
    expect(pod.timings.runPodSandboxMs).toBeGreaterThan(0);
    const status = await stack.cri.containerStatus(pod.containerId, true);
    expect(status.status.state).toBe('CONTAINER_RUNNING');
    expect(status.pid).toBeGreaterThan(1);
    expect(status.runtimeSpec).toBeDefined();
    // PID namespace of its own: the container's process is init there (a CRIU dump needs it).
    const nspid = (await readFile(`/proc/${status.pid}/status`, 'utf8')).split('\n').find((l) => l.startsWith('NSpid:'));
    expect(nspid?.trim().split(/\s+/).at(-1)).toBe('1');

    const out = await waitFor(async () => {
      const r = await stack.cri.execSync(pod.containerId, ['cat', '/tmp/out'], 5);
      return r.exitCode === 0 ? r : undefined;
    }, 'the container to write /tmp/out');
    expect(out.stdout).toBe('written\n');
    const failing = await stack.cri.execSync(pod.containerId, ['/bin/sh', '-c', 'echo err >&2; exit 3'], 5);
    expect(failing).toEqual({ stdout: '', stderr: 'err\n', exitCode: 3 });

    const lines = await waitFor(async () => {
      const parsed = parseCriLog(await readFile(pod.logPath, 'utf8').catch(() => ''));
      return parsed.length >= 2 ? parsed : undefined;
    }, 'two log lines');
    expect(lines).toContainEqual(expect.objectContaining({ stream: 'stdout', text: 'hello from 1' }));
    expect(lines).toContainEqual(expect.objectContaining({ stream: 'stderr', text: 'oops' }));

    const listed = await stack.cri.listContainers({ pod_sandbox_id: pod.podId });
    expect(listed.map((c) => c.id)).toEqual([pod.containerId]);
    await stack.cri.removePod(pod.podId);
    expect(await stack.cri.listPodSandbox()).toEqual([]);
  });

  it('runs a pod in its own network namespace with only loopback traffic', async () => {
    const { stack } = handle;
    const pod = await stack.cri.runPod({
      name: 'own-net',
      hostNetwork: false,
      image: stack.images.busybox,
      command: ['/bin/sh', '-c', 'nc -l -p 8080 -e echo pong & exec sleep 1000'],
    });
    const st = await stack.cri.containerStatus(pod.containerId, true);
    const [hostNet, podNet] = await Promise.all([readlink('/proc/self/ns/net'), readlink(`/proc/${st.pid}/ns/net`)]);
    expect(podNet).not.toBe(hostNet);
    const reply = await waitFor(async () => {
      const r = await stack.cri.execSync(pod.containerId, ['/bin/sh', '-c', 'nc 127.0.0.1 8080 </dev/null'], 5);
      return r.stdout.includes('pong') ? r.stdout : undefined;
    }, 'the pod-local server to answer');
    expect(reply).toBe('pong\n');
    // No route off the machine from inside the pod.
    const routes = await stack.cri.execSync(pod.containerId, ['ip', 'route'], 5);
    expect(routes.stdout).not.toContain('default');
    await stack.cri.removePod(pod.podId);
  });

  it('imports an image built from a local rootfs and runs its entrypoint', async () => {
    const { stack } = handle;
    const rootfs = await tempRootfsDir();
    try {
      await buildBusyboxRootfs(rootfs, { 'usr/bin/greet': '#!/bin/sh\necho "greetings from $GREETING_FROM in $(pwd)"\nexec sleep 1000\n' }, stack.paths.busybox);
      const ref = 'docker.io/thaw/greeter:test';
      const first = await importImage(stack, { ref, rootfsDir: rootfs, entrypoint: ['/usr/bin/greet'], env: ['PATH=/bin:/usr/bin', 'GREETING_FROM=image'], workingDir: '/tmp' });
      // Same rootfs and settings: same manifest (the layout cache key).
      expect((await importImage(stack, { ref, rootfsDir: rootfs, entrypoint: ['/usr/bin/greet'], env: ['PATH=/bin:/usr/bin', 'GREETING_FROM=image'], workingDir: '/tmp' })).manifestDigest)
        .toBe(first.manifestDigest);
      const pod = await stack.cri.runPod({ name: 'greeter', image: ref, command: [] });
      const lines = await waitFor(async () => {
        const parsed = parseCriLog(await readFile(pod.logPath, 'utf8').catch(() => ''));
        return parsed.length >= 1 ? parsed : undefined;
      }, 'the greeting');
      expect(lines[0]?.text).toBe('greetings from image in /tmp');
      await stack.cri.removePod(pod.podId);
    } finally {
      await rm(rootfs, { recursive: true, force: true });
    }
  });

  it('restarts containerd and keeps running pods', async () => {
    const { stack } = handle;
    const pod = await stack.cri.runPod({ name: 'survivor', image: stack.images.busybox, command: ['sleep', '1000'] });
    const before = stack.containerdPid;
    await stack.restartContainerd();
    expect(stack.containerdPid).not.toBe(before);
    const st = await stack.cri.containerStatus(pod.containerId);
    expect(st.status.state).toBe('CONTAINER_RUNNING');
    // The pod is left running on purpose: stop() must remove it.
  });

  it('stop() leaves no process, mount or directory behind', async () => {
    const { stack } = handle;
    const pod = await stack.cri.runPod({ name: 'left-running', image: stack.images.busybox, command: ['sleep', '1000'] });
    const st = await stack.cri.containerStatus(pod.containerId, true);
    const before = await leftovers(stack.dir);
    expect(before.processes.length).toBeGreaterThanOrEqual(5); // containerd, 2 shims, 2 pauses, 2 sleeps
    expect(before.processes).toContain(st.pid);
    expect(before.mounts.length).toBeGreaterThan(0);
    await stack.stop();
    expect(await leftovers(stack.dir)).toEqual({ processes: [], mounts: [], dirExists: false });
    await expect(stat(`/proc/${st.pid}`)).rejects.toThrow();
  });
});

describe.each(flavorsUnderTest())('cleanupStaleStacks, containerd %s', (flavor) => {
  it('cleans the stack of a process that died without stopping it', async () => {
    await cleanupStaleStacks();
    const stack = await startNodeStack({ flavor });
    try {
      const orphan = await stack.cri.runPod({ name: 'orphan', image: stack.images.busybox, command: ['sleep', '1000'] });
      const orphanPid = (await stack.cri.containerStatus(orphan.containerId, true)).pid ?? 0;
      const memoryCgroup = (await readFile(`/proc/${orphanPid}/cgroup`, 'utf8')).split('\n')
        .find((l) => l.split(':')[1] === 'memory')?.split(':')[2];
      // Make the stack look like a crashed run's: its owner is a process that has exited.
      const dead = spawnSync('true');
      const marker: StackMarker = {
        ...(JSON.parse(await readFile(path.join(stack.dir, STACK_MARKER_FILE), 'utf8')) as StackMarker),
        ownerPid: dead.pid ?? 999_999,
        ownerStartTicks: -1,
      };
      await writeFile(path.join(stack.dir, STACK_MARKER_FILE), JSON.stringify(marker));
      expect((await leftovers(stack.dir)).processes.length).toBeGreaterThan(0);

      // A live stack (ours, real owner) in the same /tmp is left alone.
      const live = await startNodeStack({ flavor });
      try {
        const reports = await cleanupStaleStacks();
        expect(reports.map((r) => r.dir)).toContain(stack.dir);
        expect(reports.map((r) => r.dir)).not.toContain(live.dir);
        expect(await leftovers(stack.dir)).toEqual({ processes: [], mounts: [], dirExists: false });
        // The killed shims leave no cgroup of their containers behind.
        if (memoryCgroup) await expect(stat(path.join('/sys/fs/cgroup/memory', memoryCgroup))).rejects.toThrow();
        expect(await processStartTicks(live.containerdPid)).toBeDefined();
      } finally {
        await live.stop();
      }
    } finally {
      await stack.stop().catch(() => undefined);
    }
  });
});

describe.each(flavorsUnderTest())('launched NRI plugins, containerd %s', (flavor) => {
  it('are started by containerd from the plugin dir (one that does not register: fatal in 1.7, skipped in 2.x)', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'thawplug-'));
    try {
      const plugin = path.join(dir, 'probe.sh');
      await writeFile(plugin, `#!/bin/sh\nenv | grep ^NRI_PLUGIN_ > ${dir}/env\nexit 0\n`, { mode: 0o755 });
      let caught: unknown;
      let logTail = '';
      await startNodeStack({
        flavor, nri: { registrationTimeoutMs: 1000, launchedPlugins: [{ name: '10-probe', path: plugin, config: 'a: 1' }] },
      }).then(async (s) => { logTail = await s.logTail(1_000_000); await s.stop(); }, (e: unknown) => { caught = e; });
      if (flavor === '1.7') {
        // 1.7 treats a launched plugin that does not register as fatal: containerd exits.
        expect(isThawError(caught, 'STACK_CONTAINERD_EXITED')).toBe(true);
        logTail = String((caught as { evidence: { logTail: string } }).evidence.logTail);
      } else {
        // 2.x logs it and goes on without the plugin.
        expect(caught).toBeUndefined();
      }
      expect(logTail).toContain('probe');
      const env = await readFile(path.join(dir, 'env'), 'utf8');
      expect(env).toContain('NRI_PLUGIN_NAME=probe');
      expect(env).toContain('NRI_PLUGIN_IDX=10');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
