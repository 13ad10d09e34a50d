/**
 * The restore flow against real containerd (1.7.24 by default; THAW_CONTAINERD=2.1 for 2.1.9) and CRIU: the demo worker is checkpointed from a
 * source pod (checkpointContainer), then a target pod annotated `thaw.dev/restore` with the same image and
 * command gets thaw's NRI adjustments (toolkit, control dir, createRuntime (the native hook, native/thaw-hook.c, answered by
 * this process's hook server) + poststop hooks that put thaw-pause
 * over the entrypoint), and the restore coordinator restores the worker into it. Then the fallbacks: each ends
 * with a running, cold-started target and a logged cause.
 *
 * Runs as root; needs the provisioned stack (CRIU, and the GNU tar it runs for tmpfs contents) and native/build/thaw-pause.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, statSync, readdirSync } from 'node:fs';
import { copyFile, mkdtemp, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { buildWorkerImage, WORKER_ENTRY_REL, type WorkerImage } from '../../demo/worker-image.js';
import { expectedDigest } from '../../demo/worker/memory.js';
import type { ManagedContainer } from '../../src/agent/managed-container.js';
import { ThawNriStats } from '../../src/agent/nri-stats.js';
import { createRestoreCoordinator, type RestoreCoordinator } from '../../src/agent/restore-coordinator.js';
import { type ThawRestoreConfig } from '../../src/agent/restore-target.js';
import { createThawNriHandlers } from '../../src/agent/thaw-nri.js';
import { startHookServer, type HookServer } from '../../src/agent/hook-server.js';
import type { RestoreEvent, RestoreStepContext } from '../../src/restore-engine/restore-flow.js';
import { createCollectingLogger } from '../../src/log.js';
import { createNriPlugin, type NriPlugin } from '../../src/nri-plugin/index.js';
import { parseCriLog } from '../../src/node-stack/cri-client.js';
import { PACKAGE_ROOT } from '../../src/node-stack/thaw-plugin-process.js';
import { checkpointContainer } from '../../src/restore-engine/checkpoint.js';
import { mappedFilePages } from '../../src/restore-engine/mapped-files.js';
import { CriuClient } from '../../src/restore-engine/criu/client.js';
import { waitForWorkerReady } from '../../src/sdk/control-dir.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';

const WORKER_READY_TIMEOUT_MS = 90_000;
const HTTP_TIMEOUT_MS = 15_000;
const SETUP_TIMEOUT_MS = 300_000;
const TEST_TIMEOUT_MS = 240_000;
const PREFIX = 'thaw.dev/';
const CHECKPOINT = 'demo-restore-256';
/** Its store key: the source pod's namespace (the CRI helper's default) and its name. */
const KEY = `default/${CHECKPOINT}`;
const HOOK_MAIN = path.join(PACKAGE_ROOT, 'dist/src/oci-hooks/main.js');
const THAW_PAUSE = path.join(PACKAGE_ROOT, 'native/build/thaw-pause');
/** The createRuntime hook restores run: the native one, answered by the hook server of this process (the agent's). */
const NATIVE_HOOK = path.join(PACKAGE_ROOT, 'native/build/thaw-hook');
const FILL = path.join(PACKAGE_ROOT, 'native/build/thaw-fill');
const PACK = path.join(PACKAGE_ROOT, 'native/build/thaw-pack');

interface WorkerState { digest: string; requests: number; bootId: string; restored: boolean; restoreCount: number; pid: number }
interface WorkerEvent { event: string; [key: string]: unknown }

async function getJson<T>(port: number, route: string): Promise<T> {
  const res = await fetch(`http://127.0.0.1:${port}${route}`, { signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
  expect(res.status).toBe(200);
  return (await res.json()) as T;
}

async function workerEvents(logPath: string): Promise<WorkerEvent[]> {
  const lines = parseCriLog(await readFile(logPath, 'utf8').catch(() => ''));
  return lines.filter((l) => l.stream === 'stdout' && l.text.startsWith('{')).map((l) => JSON.parse(l.text) as WorkerEvent);
}

function waitForEvent(logPath: string, event: string): Promise<WorkerEvent> {
  return waitFor(async () => (await workerEvents(logPath)).find((e) => e.event === event), `worker event "${event}" in ${logPath}`, WORKER_READY_TIMEOUT_MS, 100);
}

/** Builds dist/ when the hook entry is missing or older than the sources it runs. */
function ensureHooksBuilt(): void {
  const sources = ['src/oci-hooks', 'src/restore-engine'].flatMap((d) =>
    readdirSync(path.join(PACKAGE_ROOT, d)).filter((f) => f.endsWith('.ts')).map((f) => path.join(PACKAGE_ROOT, d, f)),
  );
  const newest = Math.max(...sources.map((f) => statSync(f).mtimeMs));
  if (existsSync(HOOK_MAIN) && statSync(HOOK_MAIN).mtimeMs >= newest) return;
  try {
    execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: PACKAGE_ROOT, stdio: 'inherit' });
  } catch {
    // tsc emits even with type errors elsewhere in the tree; the hook entry is what we need.
  }
  if (!existsSync(HOOK_MAIN)) throw new Error(`${HOOK_MAIN} was not built`);
}

describe.each(flavorsUnderTest())('restore flow, containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  const logger = createCollectingLogger();
  const stats = new ThawNriStats();
  const events: RestoreEvent[] = [];
  const sourcesStarted = new Map<string, { entry: ManagedContainer; pid: number }>();
  /** restorePodCreated calls: [pod sandbox id, checkpoint]. */
  const podsPrefetched: Array<[string, string]> = [];
  let image: WorkerImage;
  let plugin: NriPlugin;
  let controlRoot: string;
  let storeRoot: string;
  let workRoot: string;
  let store: LocalStore;
  let criu: CriuClient;
  let restorer: RestoreCoordinator;
  let restoreConfig: ThawRestoreConfig;
  let hookServer: HookServer | undefined;
  /** Per-test fault for the coordinator's beforeCriuRestore seam. */
  let beforeCriu: ((ctx: RestoreStepContext) => Promise<void>) | undefined;
  /** The coordinator's thaw-fill, read at each restore (a test points it at a missing binary). */
  const memoryFill = { binary: FILL, threads: 2, timeoutMs: 60_000 };

  beforeAll(async () => {
    const { stack } = handle;
    if (process.getuid?.() !== 0) throw new Error('the restore integration tests must run as root');
    if (!existsSync(THAW_PAUSE) || !existsSync(NATIVE_HOOK) || !existsSync(FILL) || !existsSync(PACK)) execFileSync('make', ['-C', path.join(PACKAGE_ROOT, 'native')], { stdio: 'inherit' });
    ensureHooksBuilt();
    image = await buildWorkerImage(stack);
    controlRoot = await mkdtemp('/tmp/thaw-rst-ctl-');
    storeRoot = await mkdtemp('/tmp/thaw-rst-store-');
    workRoot = await mkdtemp('/tmp/thaw-rst-work-');
    store = await openLocalStore({ root: storeRoot, logger });
    criu = new CriuClient({
      criuPath: stack.paths.criu,
      logger,
      env: { PATH: `${stack.paths.binDir}:/usr/sbin:/usr/bin:/sbin:/bin` },
    });
    restorer = createRestoreCoordinator({
      store,
      criu,
      logger,
      stats,
      workRoot,
      toolkitBinDir: stack.paths.binDir,
      thawPausePath: THAW_PAUSE,
      beforeCriuRestore: async (ctx) => beforeCriu?.(ctx),
      onEvent: (e) => events.push(e),
      // Every restore of this file fills memory through thaw-fill, as the agent's default does.
      memoryFill,
    });
    // Containers thaw manages tell their start through the native hook's poststart (no PostStartContainer then).
    let handlers: ReturnType<typeof createThawNriHandlers> | undefined;
    hookServer = await startHookServer({ socketPath: path.join(workRoot, 'run', 'hook.sock'), logger, onStarted: (id, pid) => handlers?.containerStarted(id, pid) });
    restoreConfig = { store, toolkitDir: stack.paths.prefix, thawPausePath: THAW_PAUSE, hookArgv: [process.execPath, HOOK_MAIN], nativeHook: { path: NATIVE_HOOK, server: hookServer }, workRoot };
    plugin = createNriPlugin({
      name: 'thaw-restore-test',
      idx: '40',
      logger,
      socketPath: stack.nriSocketPath,
      reconnect: false,
      handlers: (handlers = createThawNriHandlers({
        annotationPrefix: PREFIX,
        controlRoot,
        stats,
        coordinator: {
          ...restorer,
          checkpointSourceStarted(entry, pid) {
            sourcesStarted.set(entry.podName, { entry, pid });
          },
          restorePodCreated(podId, name) {
            podsPrefetched.push([podId, name]);
            restorer.restorePodCreated(podId, name);
          },
        },
        restore: restoreConfig,
      })),
    });
    await plugin.start();
    await plugin.waitForState('synchronized', { timeoutMs: 10_000 });
  }, SETUP_TIMEOUT_MS);

  afterAll(async () => {
    await restorer?.close();
    await plugin?.close();
    await hookServer?.close();
    if (process.env.THAW_TEST_KEEP === undefined) {
      for (const d of [controlRoot, storeRoot, workRoot]) if (d) await rm(d, { recursive: true, force: true });
    }
  });

  const workerEnv = { WORKER_MEMORY_MB: '256', WORKER_SEED: '9', WORKER_WARMUP_MS: '200' };

  /** Target pod naming a checkpoint; resolves with the pod and the restore event (if the coordinator ran). */
  async function runTarget(name: string, checkpoint: string, env: Record<string, string> = workerEnv, extra: { namespace?: string; args?: string[]; workingDir?: string } = {}) {
    const { stack } = handle;
    const before = events.length;
    const pod = await stack.cri.runPod({ name, containerName: 'worker', image: image.ref, command: [], annotations: { [`${PREFIX}restore`]: checkpoint }, env, ...extra });
    return { pod, before };
  }

  it('checkpoints the source, restores into a target pod: same digest, counter continues, log, stop', async () => {
    const { stack } = handle;
    // --- the source
    const src = await stack.cri.runPod({
      name: 'rst-src', containerName: 'worker', image: image.ref, command: [],
      annotations: { [`${PREFIX}checkpoint`]: CHECKPOINT },
      env: { ...workerEnv, WORKER_CHECKPOINT_AFTER_MS: '1500' },
    });
    let srcState: WorkerState;
    try {
      const { entry, pid } = await waitFor(() => sourcesStarted.get('rst-src'), 'PostStart of the source', 30_000);
      const listening = await waitForEvent(src.logPath, 'listening');
      srcState = await getJson<WorkerState>(listening.port as number, '/state');
      srcState = await getJson<WorkerState>(listening.port as number, '/state');
      expect(srcState.requests).toBe(2);
      // A file the worker's container wrote: it must reach the target through the rootfs diff.
      expect((await stack.cri.execSync(src.containerId, ['/bin/sh', '-c', 'echo from-source > /tmp/thaw-diff-probe'], 10)).exitCode).toBe(0);
      await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
      const v = await criu.version();
      const ck = await checkpointContainer({
        store, criu, containerId: entry.containerId, pid, controlDir: entry.controlDir, checkpointName: entry.checkpointName,
        onCheckpoint: 'continue', imageRef: entry.imageRef ?? image.ref,
        source: { containerName: entry.containerName, pod: { name: entry.podName, namespace: entry.podNamespace, uid: entry.podUid }, ...(entry.specArgs ? { args: entry.specArgs } : {}) },
        containerdVersion: stack.containerdVersion, criuVersion: `${v.major}.${v.minor}.${v.sublevel}`, logger, workRoot,
        containerd: { socket: stack.address, root: stack.rootDir },
      });
      console.log(`checkpoint: ${JSON.stringify(ck.phases)}; ${ck.manifest.totals.bytes} bytes`);
    } finally {
      await stack.cri.removePod(src.podId);
    }

    // --- the target
    const t0 = Date.now();
    const servedBefore = hookServer!.served();
    const { pod, before } = await runTarget('rst-target', CHECKPOINT);
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 120_000, 50);
      console.log(`restore event: ${JSON.stringify(ev)}; pod create to event ${Date.now() - t0} ms`);
      expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'restored', mode: 'overlay' });
      // thaw-fill placed the worker's memory (CRIU left its private pages to it): the state digest below is the proof.
      expect(ev.memoryFill, JSON.stringify(ev.memoryFill)).toMatchObject({ by: 'thaw-fill' });
      // From the plan the checkpoint stored beside its images (nothing planned on CreateContainer).
      expect(existsSync(path.join((await store.open(KEY)).paths.criuDir, 'thaw-fill-plan.txt'))).toBe(true);
      expect((ev.memoryFill as { copiedBytes: number }).copiedBytes).toBeGreaterThan(0);
      // runc ran the native hook, and this process's hook server did its work (the rootfs diff, the overlay).
      expect(hookServer!.served()).toBe(servedBefore + 1);
      expect(hookServer!.pending()).toBe(0);
      // The checkpoint's read started at RunPodSandbox, before the container existed.
      expect(podsPrefetched).toContainEqual([pod.podId, KEY]);
      // Beside CRIU, the worker's mapped files were read through the target's root (node, its libraries).
      expect(ev.mappedFiles?.files, JSON.stringify(ev.mappedFiles)).toBeGreaterThan(0);
      expect(ev.mappedFiles?.bytesRead).toBeGreaterThan(0);
      const line = logger.lines.find((l) => l.msg === 'restore' && l.fields.containerId === pod.containerId);
      console.log(`criu restore options: ${JSON.stringify(line?.fields.criuOptions)}`);
      const restored = await waitForEvent(pod.logPath, 'restored');
      const s = await getJson<WorkerState>(restored.port as number, '/state');
      console.log(`restored worker answered ${Date.now() - t0} ms after RunPod`);
      expect(s).toMatchObject({ digest: srcState.digest, bootId: srcState.bootId, requests: srcState.requests + 1, restored: true, restoreCount: 1 });

      // The restored tree sits in the target container's cgroups (not the root cgroup).
      const status = await stack.cri.containerStatus(pod.containerId, true);
      const restoredPid = ev.restoredPid as number;
      expect(await readFile(`/proc/${restoredPid}/cgroup`, 'utf8')).toBe(await readFile(`/proc/${status.pid}/cgroup`, 'utf8'));
      // ExecSync sees the worker's filesystem (the rootfs diff was applied before the pod started).
      const probe = await stack.cri.execSync(pod.containerId, ['/bin/cat', '/tmp/thaw-diff-probe'], 10);
      expect(probe.stdout).toBe('from-source\n');
      // restore-complete dropped the diff's undo backup: nothing of thaw's is left in the restored rootfs.
      expect((await stack.cri.execSync(pod.containerId, ['/bin/ls', '-a', '/'], 10)).stdout).not.toMatch(/\.thaw-undo-/);

      const tStop = Date.now();
      await stack.cri.stopContainer(pod.containerId, 10);
      const after = await stack.cri.containerStatus(pod.containerId);
      console.log(`stop took ${Date.now() - tStop} ms`);
      expect(after.status.state).toBe('CONTAINER_EXITED');
      expect(after.status.exit_code).toBe(0);
      expect((await workerEvents(pod.logPath)).map((e) => e.event)).toContain('stopping');
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, TEST_TIMEOUT_MS);

  /** Checkpoints a worker pod like the first test; `plant` runs in the source's container before the checkpoint. */
  async function checkpointSource(
    podName: string,
    checkpoint: string,
    plant?: (containerId: string) => Promise<void>,
    compressPages?: { binary: string; threads: number; level: number },
    memoryMb = 32,
  ) {
    const { stack } = handle;
    const src = await stack.cri.runPod({
      name: podName, containerName: 'worker', image: image.ref, command: [],
      annotations: { [`${PREFIX}checkpoint`]: checkpoint },
      env: { ...workerEnv, WORKER_MEMORY_MB: String(memoryMb), WORKER_CHECKPOINT_AFTER_MS: '1000' },
    });
    try {
      const { entry, pid } = await waitFor(() => sourcesStarted.get(podName), 'PostStart of the source', 30_000);
      await waitForEvent(src.logPath, 'listening');
      await plant?.(src.containerId);
      await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
      const v = await criu.version();
      await checkpointContainer({
        store, criu, containerId: entry.containerId, pid, controlDir: entry.controlDir, checkpointName: entry.checkpointName,
        onCheckpoint: 'continue', imageRef: entry.imageRef ?? image.ref,
        source: { containerName: entry.containerName, pod: { name: entry.podName, namespace: entry.podNamespace, uid: entry.podUid }, ...(entry.specArgs ? { args: entry.specArgs } : {}) },
        containerdVersion: stack.containerdVersion, criuVersion: `${v.major}.${v.minor}.${v.sublevel}`, logger, workRoot,
        containerd: { socket: stack.address, root: stack.rootDir },
        ...(compressPages !== undefined ? { compressPages } : {}),
      });
    } finally {
      await stack.cri.removePod(src.podId);
    }
  }

  it('a checkpoint whose lazy pages are compressed: restored through thaw-fill from its frames; where thaw-fill cannot run, cold start, cause RESTORE_MEMORY_FILL_REQUIRED', async () => {
    const name = 'demo-restore-zstd';
    // The worker's own memory is random and Node.js's heap (~10 MB of lazy pages) compresses: 12 MiB of the first keep
    // the lazy pages above COMPRESS_PAGES_MIN_BYTES and, all of them compressed together, well under the 90 % cut.
    await checkpointSource('rst-zsrc', name, undefined, { binary: PACK, threads: 2, level: 1 }, 12);
    const opened = await store.open(`default/${name}`);
    const why = logger.lines.filter((l) => l.msg.startsWith('lazy pages')).map((l) => `${l.msg} ${JSON.stringify(l.fields)}`).pop();
    expect(opened.manifest.files.map((f) => f.path), why).toContain('criu/thaw-pages.zst');
    console.log(`compressed checkpoint: ${why}`);
    // Schema 2: a thaw that reads only schema 1 (and would let CRIU restore the frames' pages as zeros) refuses it.
    expect(opened.manifest.schemaVersion).toBe(2);
    expect(await readFile(path.join(opened.paths.criuDir, 'thaw-fill-plan.txt'), 'utf8')).toMatch(/^thaw-fill-plan 2\nzpages thaw-pages\.zst\n/);
    const { pod, before } = await runTarget('rst-ztarget', name, { ...workerEnv, WORKER_MEMORY_MB: '12' });
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 120_000, 50);
      expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'restored', memoryFill: { by: 'thaw-fill' } });
      expect((ev.memoryFill as { copiedBytes: number }).copiedBytes).toBeGreaterThan(0);
      const restored = await waitForEvent(pod.logPath, 'restored');
      // The digest is recomputed over the worker's live memory: every compressed page came back as it was.
      const s = await getJson<WorkerState>(restored.port as number, '/state');
      expect(s).toMatchObject({ digest: expectedDigest(12, Number(workerEnv.WORKER_SEED)), restored: true, restoreCount: 1 });
    } finally {
      await handle.stack.cri.removePod(pod.podId);
    }
    // thaw-fill gone from this node after the agent started: CRIU alone would restore the frames' pages as zeros.
    memoryFill.binary = path.join(workRoot, 'no-such-thaw-fill');
    try {
      const ev = await expectColdStart('rst-zfallback', name, 'RESTORE_MEMORY_FILL_REQUIRED', true);
      expect(ev?.reason).toMatch(/thaw-fill did not start/);
      // Not the checkpoint's fault: it is not marked failed, the next pod with thaw-fill back restores it.
      expect(await store.restoreFailure(`default/${name}`, opened.manifest)).toBeUndefined();
    } finally {
      memoryFill.binary = FILL;
    }
  }, TEST_TIMEOUT_MS);

  it('a source that plants /etc/ld.so.preload, CRIU plugins and PATH shadows in its rootfs: none runs in a thaw process, the restore succeeds', async () => {
    const { stack } = handle;
    // Every planted file leaves a marker in MARKERS of the root of whatever process runs it (the host's /tmp for a
    // process in the host's mount namespace, the container's /tmp for one inside it).
    const MARKERS = '/tmp/thaw-c1-markers';
    await rm(MARKERS, { recursive: true, force: true });
    const build = await mkdtemp('/tmp/thaw-c1-build-');
    const lib = path.join(build, 'thaw-c1.so');
    execFileSync('cc', ['-shared', '-fPIC', '-O2', `-DMARKER_DIR="${MARKERS}"`, '-o', lib, path.join(PACKAGE_ROOT, 'test/fixtures/thaw-c1-marker.c')]);
    const shadow = `#!/bin/busybox sh\n/bin/busybox mkdir -p ${MARKERS}; { echo "exe=$0 $*"; /bin/busybox grep -E '^(Uid|CapEff)' /proc/self/status; } > ${MARKERS}/ran-$(/bin/busybox basename $0)-$$\n`;
    const names = ['nsenter', 'unshare', 'mount', 'umount', 'tar', 'gzip', 'gunzip', 'setpriv', 'criu', 'sh', 'iptables-restore', 'nft', 'ip'];
    const dirs = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin'];
    const script = [
      'set -e',
      'B=/bin/busybox',
      '$B mkdir -p /usr/local/lib',
      `echo ${(await readFile(lib)).toString('base64')} | $B base64 -d > /usr/local/lib/thaw-c1.so`,
      // CRIU's default plugin dirs, as the Debian build and upstream name them.
      'for d in /usr/lib/criu /usr/lib/x86_64-linux-gnu/criu /usr/lib64/criu /usr/local/lib/criu; do $B mkdir -p $d; $B cp /usr/local/lib/thaw-c1.so $d/thaw-c1.so; done',
      // rm first: a busybox applet link would carry the write into busybox itself.
      `for d in ${dirs.join(' ')}; do $B mkdir -p $d; for n in ${names.join(' ')}; do $B rm -f $d/$n; echo ${Buffer.from(shadow).toString('base64')} | $B base64 -d > $d/$n; $B chmod 755 $d/$n; done; done`,
      // Last: from here on every dynamically linked program this container starts loads the library.
      'echo /usr/local/lib/thaw-c1.so > /etc/ld.so.preload',
    ].join('\n');
    await checkpointSource('c1-src', 'c1-attack', async (containerId) => {
      const r = await stack.cri.execSync(containerId, ['/bin/busybox', 'sh', '-c', script], 30);
      expect(r.exitCode, r.stderr).toBe(0);
    });
    await rm(build, { recursive: true, force: true });

    const { pod, before } = await runTarget('c1-target', 'c1-attack', { ...workerEnv, WORKER_MEMORY_MB: '32' });
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 120_000, 50);
      expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'restored' });
      const restored = await waitForEvent(pod.logPath, 'restored');
      expect(await getJson<WorkerState>(restored.port as number, '/state')).toMatchObject({ restored: true, restoreCount: 1 });
      const targetPid = (await stack.cri.containerStatus(pod.containerId, true)).pid as number;
      const targetMarkers = `/proc/${targetPid}/root${MARKERS}`;
      const markers = async (dir: string): Promise<string[]> => {
        const names = await readdir(dir).catch(() => [] as string[]);
        return Promise.all(names.map(async (n) => `${dir}/${n}: ${(await readFile(path.join(dir, n), 'utf8')).trim()}`));
      };
      // Nothing ran: not on the host's side, not inside the target.
      expect([...(await markers(MARKERS)), ...(await markers(targetMarkers))]).toEqual([]);

      // The plant is live in the target (the diff brought it): a dynamic program there loads the library, and a
      // shadow on the PATH runs. So an empty marker dir above means thaw never ran them, not that they were inert.
      expect((await stack.cri.execSync(pod.containerId, ['/bin/busybox', 'cat', '/etc/ld.so.preload'], 10)).stdout).toBe('/usr/local/lib/thaw-c1.so\n');
      await stack.cri.execSync(pod.containerId, ['/usr/bin/node', '-e', '0'], 30);
      await stack.cri.execSync(pod.containerId, ['/usr/local/sbin/tar', '--version'], 10);
      const seen = await markers(targetMarkers);
      expect(seen.some((m) => /loaded-by-\d+: exe=\/usr\/bin\/node /.test(m)), seen.join('\n')).toBe(true);
      expect(seen.some((m) => /ran-tar-\d+: exe=\/usr\/local\/sbin\/tar/.test(m)), seen.join('\n')).toBe(true);
    } finally {
      await stack.cri.removePod(pod.podId);
      await rm(MARKERS, { recursive: true, force: true });
    }
  }, TEST_TIMEOUT_MS);

  it('a pod that plants a FIFO, a symlink to a host canary and one to /dev/zero at the paths its worker maps: the canary intact, the restore falls back with its cause, NRI still answers', async () => {
    const { stack } = handle;
    const canaryDir = await mkdtemp('/tmp/thaw-hostile-canary-');
    const canary = path.join(canaryDir, 'canary');
    await writeFile(canary, 'host bytes\n');
    // Names of the same length as three files the demo worker maps (node and its libraries, read from the first
    // checkpoint's images), so files.img can name the planted entries instead without re-encoding it.
    const mapped = (await mappedFilePages((await store.open(KEY)).paths.criuDir)).map((f) => f.path).filter((p) => p.length > 12);
    const originals = [...mapped].sort((a, b) => b.length - a.length).slice(0, 3);
    expect(originals.length).toBe(3);
    const planted = originals.map((p, i) => `/tmp/h/${'fls'[i]!.repeat(p.length - 7)}`);
    const [fifo, hostLink, zeroLink] = planted as [string, string, string];
    // In the rootfs (the diff carries FIFOs and symlinks; a device node it leaves out): a FIFO, a symlink to the
    // host canary, a symlink to /dev/zero, and a /dev/zero copy.
    const rootfsPlant = ['set -e', 'B=/bin/busybox', '$B mkdir -p /tmp/h', `$B mkfifo ${fifo}`, `$B ln -s ${canary} ${hostLink}`, `$B ln -s /dev/zero ${zeroLink}`, '$B mknod /tmp/h/zero c 1 5'].join('\n');
    await checkpointSource('hostile-src', 'hostile', async (containerId) => {
      const r = await stack.cri.execSync(containerId, ['/bin/busybox', 'sh', '-c', rootfsPlant], 10);
      expect(r.exitCode, r.stderr).toBe(0);
    });
    // The capture archived the FIFO and the links as what they are (never opened), not the canary's bytes.
    expect(await readFile(canary, 'utf8')).toBe('host bytes\n');
    const diff = await readFile(path.join((await store.open('default/hostile')).paths.dir, 'rootfs-diff.tar'));
    expect(diff.includes(Buffer.from('host bytes'))).toBe(false);

    // The checkpoint's files.img now names the planted entries where the worker mapped node's files (same lengths),
    // and the manifest its new digest: the restore's mapped-file reads meet the FIFO and the links through the
    // target's root, and CRIU meets them too.
    const opened = await store.open('default/hostile');
    const filesImg = path.join(opened.paths.criuDir, 'files.img');
    let bytes = await readFile(filesImg);
    for (const [i, original] of originals.entries()) {
      const from = Buffer.from(original);
      expect(bytes.indexOf(from), original).toBeGreaterThanOrEqual(0);
      for (let at = bytes.indexOf(from); at >= 0; at = bytes.indexOf(from, at + 1)) bytes.write(planted[i]!, at, 'latin1');
    }
    await writeFile(filesImg, bytes);
    bytes = await readFile(filesImg);
    const m = JSON.parse(await readFile(opened.paths.manifest, 'utf8')) as { files: { path: string; sha256: string }[] };
    m.files.find((f) => f.path === 'criu/files.img')!.sha256 = createHash('sha256').update(bytes).digest('hex');
    await writeFile(opened.paths.manifest, JSON.stringify(m));
    expect((await mappedFilePages(opened.paths.criuDir)).map((f) => f.path)).toEqual(expect.arrayContaining(planted));

    const heapBefore = process.memoryUsage().heapUsed;
    const { pod, before } = await runTarget('hostile-target', 'hostile', { ...workerEnv, WORKER_MEMORY_MB: '32' });
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 200_000, 50);
      console.log(`hostile restore event: ${JSON.stringify(ev).slice(0, 700)}`);
      // Decided before CRIU: CRIU's own open of the FIFO would block until its timeout (120 s; it did before).
      expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'fallback', cause: 'RESTORE_MAPPED_FILE_UNSAFE' });
      expect(ev.reason).toMatch(/\/tmp\/h\/(f+|s+), which the checkpoint maps, is a (fifo|character device) in the target$/);
      expect(ev.phases.criuRestoreMs).toBeUndefined();
      // The cold start serves, on the image's own files (the diff undone: no planted entry is left).
      const listening = await waitForEvent(pod.logPath, 'listening');
      expect(await getJson<WorkerState>(listening.port as number, '/state')).toMatchObject({ restored: false });
      const probe = await stack.cri.execSync(pod.containerId, ['/bin/busybox', 'ls', '/tmp/h'], 10);
      expect(probe.exitCode).not.toBe(0);
      expect(process.memoryUsage().heapUsed - heapBefore).toBeLessThan(256 * 1024 * 1024);
    } finally {
      await stack.cri.removePod(pod.podId);
    }
    expect(await readFile(canary, 'utf8')).toBe('host bytes\n');
    expect(readdirSync(canaryDir)).toEqual(['canary']);
    // NRI still answers: the next pod naming it is decided at once in CreateContainer (the failure was recorded).
    await expectColdStart('hostile-again', 'hostile', 'RESTORE_CHECKPOINT_FAILED_BEFORE', false);
    await store.delete('default/hostile');
    await rm(canaryDir, { recursive: true, force: true });
  }, 360_000);

  it('a checkpoint of a root worker into a pod that runs as uid 1000 with no capabilities and no_new_privs: cold start, cause RESTORE_CREDENTIALS_EXCEED_SPEC', async () => {
    const { stack } = handle;
    await checkpointSource('creds-src', 'creds-root');
    const cause = 'RESTORE_CREDENTIALS_EXCEED_SPEC';
    const fallbacksBefore = stats.fallbacksByCause.get(cause) ?? 0;
    const before = events.length;
    const pod = await stack.cri.runPod({
      name: 'creds-target', containerName: 'worker', image: image.ref, command: [],
      annotations: { [`${PREFIX}restore`]: 'creds-root' },
      env: { ...workerEnv, WORKER_MEMORY_MB: '32' },
      securityContext: { run_as_user: { value: '1000' }, run_as_group: { value: '1000' }, capabilities: { drop_capabilities: ['ALL'] }, no_new_privs: true },
    });
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 60_000, 50);
      expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'fallback', cause });
      expect(ev.reason).toContain('uid 0, the spec runs as uid 1000 without CAP_SETUID');
      // The cold start: thaw-pause execs the original command (as uid 1000; the worker itself then stops at the
      // control dir, which only root may write: a limit of the control dir, not of this check).
      await waitFor(async () => (await readFile(pod.logPath, 'utf8').catch(() => '')).includes('thaw-pause: fallback: exec /usr/bin/node'), 'the fallback exec', 60_000, 100);
      expect((await workerEvents(pod.logPath)).map((e) => e.event)).not.toContain('restored');
      expect(stats.fallbacksByCause.get(cause) ?? 0).toBe(fallbacksBefore + 1);
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, TEST_TIMEOUT_MS);

  /** A fallback target: running, serving from scratch, and the cause counted. */
  async function expectColdStart(name: string, checkpoint: string, cause: string, viaCoordinator: boolean, extra: { namespace?: string; args?: string[]; workingDir?: string; coldStarted?: (containerId: string) => Promise<void> } = {}) {
    const { stack } = handle;
    const fallbacksBefore = stats.fallbacksByCause.get(cause) ?? 0;
    const { pod, before } = await runTarget(name, checkpoint, { ...workerEnv, WORKER_MEMORY_MB: '32' }, extra);
    let ev: RestoreEvent | undefined;
    try {
      if (viaCoordinator) {
        ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 60_000, 50).catch((err: unknown) => {
          const mine = logger.lines.filter((l) => JSON.stringify(l).includes(pod.containerId) || l.level !== 'debug');
          console.log(mine.slice(-15).map((l) => JSON.stringify(l).slice(0, 400)).join('\n'));
          throw err;
        });
        console.log(`fallback event: ${JSON.stringify(ev).slice(0, 600)}`);
        expect(ev).toMatchObject({ outcome: 'fallback', cause });
      } else {
        // Decided in CreateContainer: the handler logged the cause.
        expect(logger.lines.some((l) => JSON.stringify(l).includes(cause) && JSON.stringify(l).includes(pod.containerId))).toBe(true);
      }
      const listening = await waitForEvent(pod.logPath, 'listening');
      const s = await getJson<WorkerState>(listening.port as number, '/state');
      expect(s).toMatchObject({ requests: 1, restored: false, restoreCount: 0 });
      expect((await stack.cri.containerStatus(pod.containerId)).status.state).toBe('CONTAINER_RUNNING');
      expect(stats.fallbacksByCause.get(cause) ?? 0).toBe(fallbacksBefore + 1);
      await extra.coldStarted?.(pod.containerId);
    } finally {
      await stack.cri.removePod(pod.podId);
    }
    return ev;
  }

  it('a missing checkpoint: cold start, cause RESTORE_CHECKPOINT_MISSING', async () => {
    await expectColdStart('rst-missing', 'no-such-checkpoint', 'RESTORE_CHECKPOINT_MISSING', false);
  }, TEST_TIMEOUT_MS);

  it('a rootfs diff replaced after the manifest was checked: the hook applies none of it, cold start', async () => {
    const { stack } = handle;
    const opened = await store.open(KEY);
    const tarFile = path.join(opened.paths.dir, 'rootfs-diff.tar');
    const original = await readFile(tarFile);
    // A valid archive of another content, in place of the one the manifest's sha256 names.
    const dir = await mkdtemp('/tmp/thaw-tampered-');
    execFileSync('mkdir', ['-p', path.join(dir, 'tmp')]);
    await writeFile(path.join(dir, 'tmp', 'thaw-tampered'), 'not from the checkpoint\n');
    execFileSync(stack.paths.tar, ['-b', '1', '-cf', tarFile, '-C', dir, 'tmp/thaw-tampered']);
    // Blocking factor 1 (512-byte records): thaw's own writer pads to blocks, not to GNU tar's 10 KiB records. Of the same size (zero blocks end a tar archive), so the store's size check at CreateContainer passes.
    const tampered = await readFile(tarFile);
    expect(tampered.length).toBeLessThanOrEqual(original.length);
    await writeFile(tarFile, Buffer.concat([tampered, Buffer.alloc(original.length - tampered.length)]));
    const before = events.length;
    const pod = await stack.cri.runPod({ name: 'rst-tampered', containerName: 'worker', image: image.ref, command: [], annotations: { [`${PREFIX}restore`]: CHECKPOINT }, env: { ...workerEnv, WORKER_MEMORY_MB: '32' } });
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 60_000, 50).catch(async (err: unknown) => {
        console.log(logger.lines.filter((l) => l.level !== 'debug').slice(-12).map((l) => JSON.stringify(l).slice(0, 500)).join('\n'));
        console.log(await readFile(pod.logPath, 'utf8').catch(() => ''));
        throw err;
      });
      expect(ev.outcome, JSON.stringify(ev)).toBe('fallback');
      expect(['RESTORE_HOOK_FAILED', 'RESTORE_CHECKPOINT_CORRUPT']).toContain(ev.cause);
      await waitForEvent(pod.logPath, 'listening');
      // Nothing of the replaced archive reached the container's rootfs.
      const probe = await stack.cri.execSync(pod.containerId, ['/bin/busybox', 'cat', '/tmp/thaw-tampered'], 10);
      expect(probe.exitCode).not.toBe(0);
      expect(logger.lines.some((l) => JSON.stringify(l).includes('HOOK_DIFF_UNVERIFIED') && JSON.stringify(l).includes(pod.containerId)) || String(ev.reason).includes('HOOK_DIFF_UNVERIFIED'), JSON.stringify(ev)).toBe(true);
    } finally {
      await stack.cri.removePod(pod.podId);
      await writeFile(tarFile, original);
      await rm(dir, { recursive: true, force: true });
    }
  }, TEST_TIMEOUT_MS);

  it('a corrupted image file (one byte flipped): sha256 mismatch, cold start', async () => {
    const opened = await store.open(KEY);
    const pages = opened.manifest.files.map((f) => f.path).find((p) => /pages-\d+\.img$/.test(p)) as string;
    const file = path.join(opened.paths.dir, pages);
    const bytes = await readFile(file);
    bytes[100] = (bytes[100] ?? 0) ^ 0xff;
    await writeFile(file, bytes);
    try {
      await expectColdStart('rst-corrupt', CHECKPOINT, 'RESTORE_CHECKPOINT_CORRUPT', true);
    } finally {
      bytes[100] = (bytes[100] ?? 0) ^ 0xff;
      await writeFile(file, bytes);
    }
  }, TEST_TIMEOUT_MS);

  it('a manifest for another image: cold start, cause RESTORE_INCOMPATIBLE', async () => {
    const opened = await store.open(KEY);
    const original = await readFile(opened.paths.manifest, 'utf8');
    const m = JSON.parse(original) as { constraints: { image: { ref: string } } };
    m.constraints.image.ref = 'registry.example/other:1';
    await writeFile(opened.paths.manifest, JSON.stringify(m));
    try {
      await expectColdStart('rst-other-image', CHECKPOINT, 'RESTORE_INCOMPATIBLE', false);
    } finally {
      await writeFile(opened.paths.manifest, original);
    }
  }, TEST_TIMEOUT_MS);

  it("a pod of another namespace naming the checkpoint: cold start, cause RESTORE_NOT_ALLOWED (default's memory never reaches team-a)", async () => {
    await expectColdStart('rst-other-ns', KEY, 'RESTORE_NOT_ALLOWED', false, { namespace: 'team-a' });
    const line = logger.lines.find((l) => l.fields['cause'] === 'RESTORE_NOT_ALLOWED' && l.fields['pod'] === 'team-a/rst-other-ns');
    expect(String(line?.msg)).toMatch(/belongs to namespace default; a pod of team-a may not restore it/);
  }, TEST_TIMEOUT_MS);

  it('a name another namespace holds (squatted) is never used for this one: the bare name is the pod\'s own namespace\'s, cold start', async () => {
    // `default` holds CHECKPOINT; a pod of team-a naming the same bare name gets team-a's, which does not exist.
    await expectColdStart('rst-squatted', CHECKPOINT, 'RESTORE_CHECKPOINT_MISSING', false, { namespace: 'team-a' });
    const line = logger.lines.find((l) => l.fields['cause'] === 'RESTORE_CHECKPOINT_MISSING' && l.fields['pod'] === 'team-a/rst-squatted');
    expect(JSON.stringify(line?.fields)).toContain(`team-a/${CHECKPOINT}`);
    expect(JSON.stringify(line?.fields)).not.toContain(`"checkpoint":"${KEY}"`);
  }, TEST_TIMEOUT_MS);

  it('a target whose args differ from the source\'s: cold start, cause RESTORE_INCOMPATIBLE (container.args)', async () => {
    await expectColdStart('rst-other-args', CHECKPOINT, 'RESTORE_INCOMPATIBLE', false, { args: ['--not-what-the-source-ran'] });
    const line = logger.lines.find((l) => l.fields['cause'] === 'RESTORE_INCOMPATIBLE' && String(l.fields['pod']).endsWith('/rst-other-args'));
    expect(JSON.stringify(line?.fields['mismatches'])).toMatch(/container\.args/);
  }, TEST_TIMEOUT_MS);

  it('a target whose working directory differs from the checkpointed process\'s: cold start, cause RESTORE_INCOMPATIBLE (container.cwd)', async () => {
    const recorded = (await store.open(KEY)).manifest.source;
    expect(recorded.cwd, 'the checkpoint recorded its process\'s working directory').toMatch(/^\//);
    expect(recorded.user).toEqual({ uid: 0, gid: 0 });
    const other = recorded.cwd === '/tmp' ? '/var' : '/tmp';
    const ev = await expectColdStart('rst-other-cwd', CHECKPOINT, 'RESTORE_INCOMPATIBLE', true, { workingDir: other });
    expect(ev?.reason).toContain(`container.cwd ${other}, the checkpoint's ${recorded.cwd}`);
  }, TEST_TIMEOUT_MS);

  it('CRIU failing mid-restore (a pages file gone after verify): cold start, cause RESTORE_CRIU', async () => {
    const opened = await store.open(KEY);
    const pages = opened.manifest.files.map((f) => f.path).find((p) => /pages-\d+\.img$/.test(p)) as string;
    const file = path.join(opened.paths.dir, pages);
    beforeCriu = async () => rename(file, `${file}.aside`);
    try {
      const ev = await expectColdStart('rst-criu-fail', CHECKPOINT, 'RESTORE_CRIU', true, {
        // The hook had applied the diff before CRIU failed: the cold start runs on the image's own rootfs.
        coldStarted: async (containerId) => {
          const probe = await handle.stack.cri.execSync(containerId, ['/bin/sh', '-c', 'cat /tmp/thaw-diff-probe; ls -a /'], 10);
          expect(probe.stdout).not.toMatch(/from-source/);
          expect(probe.stdout).not.toMatch(/\.thaw-undo-/);
          expect(probe.stderr).toMatch(/No such file/);
        },
      });
      // CRIU's own words reach the event (and the log line behind it).
      expect(ev?.reason).toMatch(/Can't read pages data/);
      // The checkpoint is marked failed on this node, for this manifest.
      const mark = await store.restoreFailure(KEY, opened.manifest);
      expect(mark, 'the restore-failure mark').toMatchObject({ name: KEY, cause: 'RESTORE_CRIU', containerId: ev?.containerId, manifestId: opened.manifest.id });
      // The next pod naming it cold-starts at once (decided at CreateContainer: no diff applied, no CRIU), even with
      // the checkpoint whole again and no fault injected.
      beforeCriu = undefined;
      await rename(`${file}.aside`, file);
      const eventsBefore = events.length;
      await expectColdStart('rst-criu-failed-before', CHECKPOINT, 'RESTORE_CHECKPOINT_FAILED_BEFORE', false, {
        coldStarted: async (containerId) => {
          const probe = await handle.stack.cri.execSync(containerId, ['/bin/sh', '-c', 'cat /tmp/thaw-diff-probe; ls -a /; env'], 10);
          expect(probe.stdout).not.toMatch(/from-source/);
          expect(probe.stdout).not.toMatch(/SNAPSHOT_CONTROL_DIR/); // not adjusted at all
        },
      });
      expect(events.slice(eventsBefore).some((e) => e.pod.endsWith('/rst-criu-failed-before'))).toBe(false);
      expect(stats.restoreFallbacksAtCreate.get('RESTORE_CHECKPOINT_FAILED_BEFORE')).toBeGreaterThanOrEqual(1);
      // Cleared by the operator (the API's ClearRestoreFailure): the next pod restores again.
      expect(await store.clearRestoreFailure(KEY)).toBe(true);
      const { pod } = await runTarget('rst-criu-cleared', CHECKPOINT);
      try {
        const again = await waitFor(() => events.slice(eventsBefore).find((e) => e.containerId === pod.containerId), 'the restore event after the clear', 120_000, 50);
        expect(again, JSON.stringify(again)).toMatchObject({ outcome: 'restored' });
      } finally {
        await handle.stack.cri.removePod(pod.podId);
      }
    } finally {
      beforeCriu = undefined;
      if (existsSync(`${file}.aside`)) await rename(`${file}.aside`, file);
      await store.clearRestoreFailure(KEY);
    }
  }, TEST_TIMEOUT_MS);

  it('a fallback that cannot undo the diff (its backup swapped for a symlink to a host directory): the container is killed, cause RESTORE_UNDO_FAILED', async () => {
    const { stack } = handle;
    const opened = await store.open(KEY);
    const pages = opened.manifest.files.map((f) => f.path).find((p) => /pages-\d+\.img$/.test(p)) as string;
    const file = path.join(opened.paths.dir, pages);
    const canary = await mkdtemp('/tmp/thaw-undo-canary-');
    await writeFile(path.join(canary, 'keep'), 'host bytes\n');
    const canaryBefore = readdirSync(canary).sort();
    let swapped: string | undefined;
    // CRIU fails (a pages file gone), and the diff's backup in the target's rootfs is now a symlink to the canary:
    // the undo, which never follows a symlink, cannot put the originals back.
    beforeCriu = async (ctx) => {
      const root = `/proc/${ctx.targetPid}/root`;
      const backup = (await readdir(root)).find((e) => e.startsWith('.thaw-undo-'));
      if (backup === undefined) throw new Error('no undo backup in the target rootfs');
      await rename(path.join(root, backup), path.join(root, '.thaw-moved-backup'));
      execFileSync('ln', ['-s', canary, path.join(root, backup)]);
      swapped = backup;
      await rename(file, `${file}.aside`);
    };
    const fallbacksBefore = stats.fallbacksByCause.get('RESTORE_UNDO_FAILED') ?? 0;
    const { pod, before } = await runTarget('rst-undo-fail', CHECKPOINT, { ...workerEnv, WORKER_MEMORY_MB: '32' });
    try {
      const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 60_000, 50);
      expect(swapped).toBeDefined();
      expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'fallback', cause: 'RESTORE_UNDO_FAILED', killed: true, fellBackFor: 'RESTORE_CRIU' });
      expect(ev.reason).toMatch(/ROOTFS_UNDO_FAILED|symlink|undo/i);
      expect(stats.fallbacksByCause.get('RESTORE_UNDO_FAILED') ?? 0).toBe(fallbacksBefore + 1);
      // Killed, never cold-started on the changed rootfs: the container exits by SIGKILL and its original command never ran.
      const status = await waitFor(async () => {
        const s = (await stack.cri.containerStatus(pod.containerId)).status;
        return s.state === 'CONTAINER_EXITED' ? s : undefined;
      }, 'the container to exit', 30_000, 100);
      expect(status.exit_code).toBe(137);
      const log = await readFile(pod.logPath, 'utf8').catch(() => '');
      expect(log).not.toMatch(/thaw-pause: fallback: exec/);
      expect((await workerEvents(pod.logPath)).map((e) => e.event)).not.toContain('listening');
      // The host directory behind the symlink is untouched.
      expect(readdirSync(canary).sort()).toEqual(canaryBefore);
      expect(await readFile(path.join(canary, 'keep'), 'utf8')).toBe('host bytes\n');
    } finally {
      beforeCriu = undefined;
      await stack.cri.removePod(pod.podId);
      if (existsSync(`${file}.aside`)) await rename(`${file}.aside`, file);
      await store.clearRestoreFailure(KEY);
      await rm(canary, { recursive: true, force: true });
    }
  }, TEST_TIMEOUT_MS);

  it('a create-runtime hook that fails (its rootfs diff is not a valid archive): the original command runs, cause RESTORE_HOOK_FAILED', async () => {
    // The seam: rootfs-diff.tar with its first header's checksum broken (one byte of the name flipped; the same
    // size), and the manifest's sha256 of it fixed up, so the store and the hook's digest check pass and the
    // failure is the hook's own apply (its validation pass rejects the archive before anything is written).
    const opened = await store.open(KEY);
    const tarFile = path.join(opened.paths.dir, 'rootfs-diff.tar');
    const original = await readFile(tarFile);
    const originalManifest = await readFile(opened.paths.manifest, 'utf8');
    const corrupt = Buffer.from(original);
    corrupt[0] = (corrupt[0] ?? 0) ^ 0x01;
    const m = JSON.parse(originalManifest) as { files: { path: string; sha256: string }[] };
    const entry = m.files.find((f) => f.path === 'rootfs-diff.tar');
    expect(entry).toBeDefined();
    (entry as { sha256: string }).sha256 = createHash('sha256').update(corrupt).digest('hex');
    await writeFile(tarFile, corrupt);
    await writeFile(opened.paths.manifest, JSON.stringify(m));
    try {
      const ev = await expectColdStart('rst-hook-fail', CHECKPOINT, 'RESTORE_HOOK_FAILED', true);
      expect(ev?.reason).toMatch(/HOOK_ROOTFS_DIFF_FAILED/);
      // A diff the hook refuses marks that checkpoint (the edited manifest) failed, not the original one.
      expect(await store.restoreFailure(KEY, (await store.open(KEY)).manifest)).toMatchObject({ cause: 'RESTORE_HOOK_FAILED' });
    } finally {
      await writeFile(tarFile, original);
      await writeFile(opened.paths.manifest, originalManifest);
    }
    expect(await store.restoreFailure(KEY, (await store.open(KEY)).manifest)).toBeUndefined();
  }, TEST_TIMEOUT_MS);

  it('a name that tries to escape the store is rejected by the policy: cold start', async () => {
    const { stack } = handle;
    const before = stats.rejectionsByAnnotation.get(`${PREFIX}restore`) ?? 0;
    const { pod } = await runTarget('rst-escape', '../x', { ...workerEnv, WORKER_MEMORY_MB: '32' });
    try {
      const listening = await waitForEvent(pod.logPath, 'listening');
      expect(await getJson<WorkerState>(listening.port as number, '/state')).toMatchObject({ requests: 1, restored: false });
      expect(stats.rejectionsByAnnotation.get(`${PREFIX}restore`) ?? 0).toBe(before + 1);
      const env = await stack.cri.execSync(pod.containerId, ['/bin/sh', '-c', 'tr "\\0" "\\n" < /proc/1/environ'], 5);
      expect(env.stdout).not.toContain('SNAPSHOT_CONTROL_DIR');
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, TEST_TIMEOUT_MS);
  it('an entrypoint that lives on a bind mount (a GPU pod running the node\'s Python from /usr): restored', async () => {
    // The create-runtime hook must resolve the entrypoint through the container's mounts: here the worker's
    // node binary comes from a host directory mounted at /opt/hostbin, which the bundle's rootfs alone lacks.
    const { stack } = handle;
    const name = 'demo-bindmount-entry';
    const hostBin = await mkdtemp('/tmp/thaw-rst-hostbin-');
    await copyFile(process.execPath, path.join(hostBin, 'node'));
    const spec = {
      image: image.ref,
      containerName: 'worker',
      command: ['/opt/hostbin/node', `/app/${WORKER_ENTRY_REL}`],
      mounts: [{ host_path: hostBin, container_path: '/opt/hostbin', readonly: true }],
      env: { ...workerEnv, WORKER_MEMORY_MB: '32' },
    };
    try {
      const src = await stack.cri.runPod({ ...spec, name: 'rst-bm-src', annotations: { [`${PREFIX}checkpoint`]: name } });
      try {
        const { entry, pid } = await waitFor(() => sourcesStarted.get('rst-bm-src'), 'PostStart of the source', 30_000);
        await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
        const v = await criu.version();
        await checkpointContainer({
          store, criu, containerId: entry.containerId, pid, controlDir: entry.controlDir, checkpointName: entry.checkpointName,
          onCheckpoint: 'continue', imageRef: entry.imageRef ?? image.ref,
          source: { containerName: entry.containerName, pod: { name: entry.podName, namespace: entry.podNamespace, uid: entry.podUid }, ...(entry.specArgs ? { args: entry.specArgs } : {}) },
          containerdVersion: stack.containerdVersion, criuVersion: `${v.major}.${v.minor}.${v.sublevel}`, logger, workRoot,
          containerd: { socket: stack.address, root: stack.rootDir },
        });
      } finally {
        await stack.cri.removePod(src.podId);
      }
      const before = events.length;
      const pod = await stack.cri.runPod({ ...spec, name: 'rst-bm-target', annotations: { [`${PREFIX}restore`]: name } });
      try {
        const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 120_000, 50);
        expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'restored', mode: 'overlay' });
        const restored = await waitForEvent(pod.logPath, 'restored');
        expect((await getJson<WorkerState>(restored.port as number, '/state')).restored).toBe(true);
      } finally {
        await stack.cri.removePod(pod.podId);
      }
    } finally {
      await rm(hostBin, { recursive: true, force: true });
    }
  }, TEST_TIMEOUT_MS);

  it('without the native hook (not built): the Node.js hook does the same work, restored', async () => {
    const { stack } = handle;
    const native = restoreConfig.nativeHook;
    delete restoreConfig.nativeHook;
    const served = hookServer!.served();
    try {
      const { pod, before } = await runTarget('rst-node-hook', CHECKPOINT);
      try {
        const ev = await waitFor(() => events.slice(before).find((e) => e.containerId === pod.containerId), 'the restore event', 120_000, 50);
        expect(ev, JSON.stringify(ev)).toMatchObject({ outcome: 'restored', mode: 'overlay' });
        const restored = await waitForEvent(pod.logPath, 'restored');
        expect((await getJson<WorkerState>(restored.port as number, '/state')).restored).toBe(true);
        // The rootfs diff reached the target through the Node hook; the agent's hook server did nothing.
        expect((await stack.cri.execSync(pod.containerId, ['/bin/cat', '/tmp/thaw-diff-probe'], 10)).stdout.trim()).toBe('from-source');
        expect(hookServer!.served()).toBe(served);
      } finally {
        await stack.cri.removePod(pod.podId);
      }
    } finally {
      if (native !== undefined) restoreConfig.nativeHook = native;
    }
  }, TEST_TIMEOUT_MS);
});
