/**
 * The checkpoint flow against real containerd, runc and CRIU (test/helpers/stack.ts): the demo worker runs
 * in a pod annotated `thaw.dev/checkpoint`, thaw's own NRI handlers (in-process, over the stack's NRI socket)
 * create its control dir and hand its pid over; once the worker wrote ready-for-checkpoint it is checkpointed
 * from the host into a real store, and goes on serving. Also: a dump that CRIU refuses (a container that is
 * not the init of its PID namespace) publishes nothing and lets the worker resume, and a second checkpoint of
 * the same name is refused with STORE_EXISTS.
 *
 * Runs as root; the stack's CRIU and containerd must be provisioned (their absence fails the run).
 */
import { lstat, mkdtemp, readdir, readFile, rm, symlink } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { buildWorkerImage, type WorkerImage } from '../../demo/worker-image.js';
import { ENDPOINT_FILE } from '../../demo/worker/worker.js';
import { CheckpointCoordinator, type CheckpointEvent } from '../../src/agent/checkpoint-coordinator.js';
import type { ManagedContainer, ThawCoordinator } from '../../src/agent/managed-container.js';
import { createThawNriHandlers } from '../../src/agent/thaw-nri.js';
import { isThawError } from '../../src/errors.js';
import { createCollectingLogger } from '../../src/log.js';
import { createNriPlugin, type NriPlugin } from '../../src/nri-plugin/index.js';
import { checkpointContainer, CheckpointErrorCode, type CheckpointContainerOptions } from '../../src/restore-engine/checkpoint.js';
import { CriuClient } from '../../src/restore-engine/criu/client.js';
import { overlayfsSnapshotsDir, readTarEntries } from '../../src/restore-engine/rootfs-diff/index.js';
import { waitForWorkerReady } from '../../src/sdk/control-dir.js';
import { CHECKPOINT_COMPLETE, SNAPSHOT_COMPLETE } from '../../src/sdk/protocol.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';

const WORKER_READY_TIMEOUT_MS = 90_000;
/** /state hashes all the memory: ~1 s for 256 MiB when the 2 cores are shared. */
const HTTP_TIMEOUT_MS = 15_000;
const IMAGE_BUILD_TIMEOUT_MS = 180_000;
const CHECKPOINT_TEST_TIMEOUT_MS = 240_000;
const PREFIX = 'thaw.dev/';

interface WorkerState { digest: string; requests: number; bootId: string; restored: boolean }
interface Endpoint { port: number; pid: number; startedAt: string }

async function getJson<T>(port: number, route: string): Promise<T> {
  const res = await fetch(`http://127.0.0.1:${port}${route}`, { signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
  expect(res.status).toBe(200);
  return (await res.json()) as T;
}

async function readEndpoint(controlDir: string): Promise<Endpoint | undefined> {
  const text = await readFile(path.join(controlDir, ENDPOINT_FILE), 'utf8').catch(() => undefined);
  return text === undefined ? undefined : (JSON.parse(text) as Endpoint);
}

async function readJson(file: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
}

/** Every file and dir under `dir` with its mode bits. */
async function modesUnder(dir: string): Promise<Array<{ rel: string; dir: boolean; mode: number }>> {
  const out: Array<{ rel: string; dir: boolean; mode: number }> = [];
  const visit = async (rel: string): Promise<void> => {
    for (const name of await readdir(path.join(dir, rel))) {
      const r = rel === '' ? name : `${rel}/${name}`;
      const st = await lstat(path.join(dir, r));
      out.push({ rel: r, dir: st.isDirectory(), mode: st.mode & 0o7777 });
      if (st.isDirectory()) await visit(r);
    }
  };
  out.push({ rel: '.', dir: true, mode: (await lstat(dir)).mode & 0o7777 });
  await visit('');
  return out;
}

/**
 * Records what the handlers hand over and passes it on to `delegate` when one is set: the first tests drive
 * the flow themselves, the coordinator test lets the real CheckpointCoordinator do it.
 */
function recordingCoordinator(): ThawCoordinator & { started: Map<string, { entry: ManagedContainer; pid: number }>; delegate?: ThawCoordinator } {
  const started = new Map<string, { entry: ManagedContainer; pid: number }>();
  const self: ThawCoordinator & { started: typeof started; delegate?: ThawCoordinator } = {
    started,
    checkpointSourceStarted(entry, pid) {
      started.set(entry.podName, { entry, pid });
      self.delegate?.checkpointSourceStarted?.(entry, pid);
    },
    containerGone(containerId) {
      self.delegate?.containerGone?.(containerId);
    },
  };
  return self;
}

describe.each(flavorsUnderTest())('checkpoint flow, containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  const logger = createCollectingLogger();
  const coordinator = recordingCoordinator();
  let image: WorkerImage;
  let plugin: NriPlugin;
  let controlRoot: string;
  let storeRoot: string;
  /** CRIU work dirs (dump.log), kept by the flow after a failure. */
  let workRoot: string;
  let store: LocalStore;
  let criu: CriuClient;
  let criuVersion: string;

  beforeAll(async () => {
    const { stack } = handle;
    if (process.getuid?.() !== 0) throw new Error('the checkpoint integration tests must run as root');
    image = await buildWorkerImage(stack);
    controlRoot = await mkdtemp('/tmp/thaw-ckpt-ctl-');
    storeRoot = await mkdtemp('/tmp/thaw-ckpt-store-');
    workRoot = await mkdtemp('/tmp/thaw-ckpt-work-');
    store = await openLocalStore({ root: storeRoot, logger });
    criu = new CriuClient({
      criuPath: stack.paths.criu,
      logger,
      // CRIU tars the container's /dev (a tmpfs) with GNU tar from its PATH.
      env: { ...process.env, PATH: `${stack.paths.binDir}:${process.env.PATH ?? '/usr/bin:/bin'}` },
    });
    const v = await criu.version();
    criuVersion = `${v.major}.${v.minor}.${v.sublevel}`;
    plugin = createNriPlugin({
      name: 'thaw-ckpt-test',
      idx: '40',
      logger,
      socketPath: stack.nriSocketPath,
      reconnect: false,
      handlers: createThawNriHandlers({ annotationPrefix: PREFIX, controlRoot, coordinator }),
    });
    await plugin.start();
    await plugin.waitForState('synchronized', { timeoutMs: 10_000 });
  }, IMAGE_BUILD_TIMEOUT_MS);

  afterAll(async () => {
    await plugin?.close();
    if (process.env.THAW_TEST_KEEP === undefined) {
      if (controlRoot) await rm(controlRoot, { recursive: true, force: true });
      if (storeRoot) await rm(storeRoot, { recursive: true, force: true });
      if (workRoot) await rm(workRoot, { recursive: true, force: true });
    }
  });

  /** Runs a demo worker pod marked as checkpoint source; resolves once thaw's handlers saw it start. */
  async function startSource(podName: string, checkpointName: string, env: Record<string, string>, pidMode: 'CONTAINER' | 'POD' = 'CONTAINER') {
    const { stack } = handle;
    const pod = await stack.cri.runPod({
      name: podName,
      image: image.ref,
      command: [],
      pidMode,
      // The annotation names the bare name; the store key is `<pod's namespace>/<name>` (the tests name keys).
      annotations: { [`${PREFIX}checkpoint`]: checkpointName.slice(checkpointName.indexOf('/') + 1) },
      env: { WORKER_SEED: '5', WORKER_WARMUP_MS: '200', ...env },
    });
    const started = await waitFor(() => coordinator.started.get(podName), `PostStartContainer of ${podName}`, 30_000);
    return { pod, ...started };
  }

  function flowOptions(entry: ManagedContainer, pid: number, extra: Partial<CheckpointContainerOptions> = {}): CheckpointContainerOptions {
    return {
      store,
      criu,
      containerId: entry.containerId,
      containerd: { socket: handle.stack.address, root: handle.stack.rootDir },
      pid,
      controlDir: entry.controlDir,
      checkpointName: entry.checkpointName,
      onCheckpoint: 'continue',
      imageRef: entry.imageRef ?? image.ref,
      imageDigest: image.manifestDigest,
      source: {
        containerName: entry.containerName,
        pod: { name: entry.podName, namespace: entry.podNamespace, uid: entry.podUid },
      },
      containerdVersion: handle.stack.containerdVersion,
      criuVersion,
      logger,
      workRoot,
      ...extra,
    };
  }

  it('checkpoints a 256 MiB worker into the store, and the worker goes on serving', async () => {
    const { stack } = handle;
    const name = 'default/demo-256';
    const { pod, entry, pid } = await startSource('ckpt-src', name, { WORKER_MEMORY_MB: '256', WORKER_CHECKPOINT_AFTER_MS: '1500' });
    try {
      expect(entry.controlDir).toBe(path.join(controlRoot, entry.containerId));
      expect((await stack.cri.containerStatus(pod.containerId, true)).pid).toBe(pid);
      const before = await waitFor(() => readEndpoint(entry.controlDir), ENDPOINT_FILE, WORKER_READY_TIMEOUT_MS, 50);
      const s1 = await getJson<WorkerState>(before.port, '/state');
      await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
      // A change of the container's own rootfs, which the checkpoint's diff must carry.
      const probe = await stack.cri.execSync(pod.containerId, ['/bin/busybox', 'sh', '-c', 'echo from-the-source > /tmp/thaw-upper-probe'], 10);
      expect(probe.exitCode, probe.stderr).toBe(0);

      const result = await checkpointContainer(flowOptions(entry, pid));
      const { manifest, phases } = result;
      // The upperdir came from containerd's snapshot record: one overlayfs snapshot under this stack's root.
      const inspected = logger.lines.find((l) => l.msg === 'container inspected' && l.fields['containerId'] === entry.containerId);
      expect(String(inspected?.fields['upperdir'])).toMatch(new RegExp(`^${overlayfsSnapshotsDir(stack.rootDir).replace(/[.]/g, '\\.')}/\\d+/fs$`));
      console.log(
        `checkpoint of a 256 MiB worker: ${JSON.stringify(phases)}; ${manifest.totals.bytes} bytes in ${manifest.totals.fileCount} files, live RSS ${manifest.totals.liveBytes}`,
      );

      // The manifest: identity, constraints, how CRIU dumped.
      const opened = await store.open(name);
      expect(opened.manifest).toEqual(manifest);
      expect(manifest).toMatchObject({
        name: 'demo-256',
        source: { container: { name: entry.containerName, id: entry.containerId }, pod: { name: 'ckpt-src' } },
        constraints: {
          criuVersion,
          containerdVersion: stack.containerdVersion,
          image: { ref: entry.imageRef ?? image.ref, digest: image.manifestDigest },
          arch: { node: process.arch },
        },
        criu: { pid, options: { leaveRunning: true, tcpEstablished: false, fileLocks: true, externalNetNs: false } },
      });
      expect(manifest.source.command).toEqual(['/usr/bin/node', '/app/demo/worker/worker.js']);
      expect(manifest.source.envKeys).toEqual(expect.arrayContaining(['SNAPSHOT_CONTROL_DIR', 'WORKER_MEMORY_MB', 'UV_USE_IO_URING']));
      expect(manifest.source.envKeys.every((k) => !k.includes('='))).toBe(true);
      expect(manifest.criu.netnsKey).toBeUndefined(); // host network
      expect(manifest.criu.stdioFds).toHaveLength(3);
      expect(manifest.criu.stdioFds[1]).toMatch(/^pipe:\[\d+\]$/);
      const mounts = manifest.criu.externalMounts.map((m) => m.path);
      console.log(`external mounts: ${mounts.join(' ')}`);
      expect(mounts).toEqual(expect.arrayContaining(['/etc/hosts', '/etc/resolv.conf', '/etc/hostname', '/dev/shm', '/snapshot-control']));
      for (const owned of ['/', '/proc', '/dev', '/dev/pts', '/dev/mqueue', '/sys']) expect(mounts).not.toContain(owned);
      for (const m of manifest.criu.externalMounts) expect(m.key).toBe(m.path);
      expect(manifest.totals.liveBytes).toBeGreaterThan(256 * 1024 * 1024);

      // The files: CRIU's images, the rootfs diff, every sha256 right, modes 0700/0600.
      const files = manifest.files.map((f) => f.path);
      expect(files).toEqual(expect.arrayContaining(['criu/inventory.img', 'rootfs-diff.tar', 'deleted-files.json']));
      expect(files.some((f) => /^criu\/pages-\d+\.img$/.test(f))).toBe(true);
      const pagesBytes = manifest.files.filter((f) => /^criu\/pages-/.test(f.path)).reduce((a, f) => a + f.size, 0);
      expect(pagesBytes).toBeGreaterThan(256 * 1024 * 1024);
      expect((await store.verify(name)).files).toBe(manifest.files.length);
      const diff = await readTarEntries(path.join(opened.paths.dir, 'rootfs-diff.tar'));
      expect(diff.map((e) => e.path.replace(/^\.\//, ''))).toContain('tmp/thaw-upper-probe');
      for (const m of await modesUnder(opened.paths.dir)) expect([m.rel, m.mode]).toEqual([m.rel, m.dir ? 0o700 : 0o600]);
      expect((await readdir(storeRoot)).filter((n) => n.startsWith('.tmp-'))).toEqual([]);

      // The worker was told, and serves again with its memory and counter intact.
      const marker = await readJson(path.join(entry.controlDir, CHECKPOINT_COMPLETE));
      expect(marker).toEqual({ ok: true, checkpoint: name, id: manifest.id, bytes: manifest.totals.bytes, onCheckpoint: 'continue' });
      expect(await readJson(path.join(entry.controlDir, SNAPSHOT_COMPLETE))).toEqual(marker);
      const after = await waitFor(async () => {
        const e = await readEndpoint(entry.controlDir);
        return e && e.startedAt > before.startedAt ? e : undefined;
      }, `${ENDPOINT_FILE} after checkpoint-complete`, WORKER_READY_TIMEOUT_MS, 50);
      const s2 = await getJson<WorkerState>(after.port, '/state');
      expect(s2).toMatchObject({ digest: s1.digest, bootId: s1.bootId, requests: s1.requests + 1, restored: false });

      // The same name again, without replace: refused before the worker is touched; the marker stays.
      const again = await checkpointContainer(flowOptions(entry, pid)).catch((e: unknown) => e);
      expect(isThawError(again, CheckpointErrorCode.FAILED)).toBe(true);
      expect((again as { evidence: Record<string, unknown> }).evidence).toMatchObject({ phase: 'precheck', causeCode: 'STORE_EXISTS' });
      expect((again as Error & { cause: { code: string } }).cause.code).toBe('STORE_EXISTS');
      expect(await readJson(path.join(entry.controlDir, CHECKPOINT_COMPLETE))).toEqual(marker);
      expect((await store.open(name)).manifest.id).toBe(manifest.id);
      const s3 = await getJson<WorkerState>(after.port, '/state');
      expect(s3.requests).toBe(s2.requests + 1);
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, CHECKPOINT_TEST_TIMEOUT_MS);

  it('a dump CRIU refuses publishes nothing, quotes CRIU, and the worker resumes serving', async () => {
    const { stack } = handle;
    const name = 'default/demo-not-init';
    // pidMode POD: the worker is not the init of its PID namespace, which CRIU cannot dump.
    const { pod, entry, pid } = await startSource('ckpt-fail', name, { WORKER_MEMORY_MB: '16' }, 'POD');
    try {
      await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
      const err = await checkpointContainer(flowOptions(entry, pid)).catch((e: unknown) => e);
      expect(isThawError(err, CheckpointErrorCode.FAILED)).toBe(true);
      const failure = err as Error & { evidence: Record<string, unknown> };
      console.log(`expected dump failure: ${failure.message.split('\n').slice(0, 3).join(' | ')}`);
      expect(failure.evidence).toMatchObject({ phase: 'dump', causeCode: 'CRIU_FAILED' });
      expect(failure.message).toMatch(/pid namespace without the process init/);
      // The work dir with dump.log is kept for a human to read.
      expect(String(failure.evidence.dumpLog)).toMatch(new RegExp(`^${workRoot}/`));
      expect(await readFile(String(failure.evidence.dumpLog), 'utf8')).toMatch(/without the process init/);

      await expect(store.open(name)).rejects.toMatchObject({ code: 'STORE_NOT_FOUND' });
      expect((await readdir(storeRoot)).filter((n) => n.startsWith('.tmp-'))).toEqual([]);
      expect(await readdir(path.join(storeRoot, 'default')).catch(() => [])).not.toContain('demo-not-init');

      const marker = await readJson(path.join(entry.controlDir, CHECKPOINT_COMPLETE));
      expect(marker).toMatchObject({ ok: false, checkpoint: name, error: { code: 'CHECKPOINT_FAILED', phase: 'dump', causeCode: 'CRIU_FAILED' } });
      const after = await waitFor(() => readEndpoint(entry.controlDir), `${ENDPOINT_FILE} after the failed checkpoint`, WORKER_READY_TIMEOUT_MS, 50);
      const s = await getJson<WorkerState>(after.port, '/state');
      expect(s.requests).toBe(1);
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, CHECKPOINT_TEST_TIMEOUT_MS);

  it('a checkpoint whose expected size the store cannot hold: refused before anything is written, nothing collected, the worker resumes', async () => {
    const { stack } = handle;
    const name = 'default/demo-no-room';
    const { pod, entry, pid } = await startSource('ckpt-no-room', name, { WORKER_MEMORY_MB: '16' });
    try {
      await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
      const listed = (await store.list()).map((l) => l.name);
      const tmpBefore = (await readdir(storeRoot)).filter((n) => n.startsWith('.tmp-'));
      const workBefore = (await readdir(workRoot)).filter((n) => n.startsWith('thaw-ckpt-default+demo-no-room'));
      // A namespace quota of 1 KiB: the worker's resident memory alone is more, whatever is collected.
      const limits = { namespaceQuotaBytes: (ns: string) => (ns === 'default' ? 1024 : undefined) };
      const err = await checkpointContainer(flowOptions(entry, pid, { makeRoom: async (bytes) => void (await store.makeRoom(limits, { namespace: 'default', bytes, name })) })).catch((e: unknown) => e);
      expect(isThawError(err, CheckpointErrorCode.FAILED), String(err)).toBe(true);
      const failure = err as Error & { evidence: Record<string, unknown> };
      expect(failure.evidence).toMatchObject({ phase: 'inspect', causeCode: 'STORE_NO_ROOM' });
      expect(failure.message).toMatch(/no room for \d+ bytes of namespace default: namespace default holds \d+ bytes and needs \d+ more; its quota is 1024/);
      // Nothing of it was written, and nothing else was collected for it.
      await expect(store.open(name)).rejects.toMatchObject({ code: 'STORE_NOT_FOUND' });
      expect((await readdir(storeRoot)).filter((n) => n.startsWith('.tmp-'))).toEqual(tmpBefore);
      expect((await readdir(workRoot)).filter((n) => n.startsWith('thaw-ckpt-default+demo-no-room'))).toEqual(workBefore);
      expect((await store.list()).map((l) => l.name)).toEqual(listed);
      const marker = await readJson(path.join(entry.controlDir, CHECKPOINT_COMPLETE));
      expect(marker).toMatchObject({ ok: false, checkpoint: name, error: { code: 'CHECKPOINT_FAILED', phase: 'inspect', causeCode: 'STORE_NO_ROOM' } });
      const after = await waitFor(() => readEndpoint(entry.controlDir), `${ENDPOINT_FILE} after the refused checkpoint`, WORKER_READY_TIMEOUT_MS, 50);
      expect((await getJson<WorkerState>(after.port, '/state')).requests).toBe(1);
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, CHECKPOINT_TEST_TIMEOUT_MS);

  it("an upperdir containerd names outside the configured snapshotter root: refused before the dump, the worker resumes", async () => {
    const { stack } = handle;
    const name = 'default/demo-foreign-root';
    const { pod, entry, pid } = await startSource('ckpt-root', name, { WORKER_MEMORY_MB: '16' });
    // The agent's containerd.root names another directory (here: a symlink to the real one, which is not
    // the path containerd reports): the snapshot containerd names is not under it, so nothing is captured.
    const otherRoot = await mkdtemp('/tmp/thaw-ckpt-otherroot-');
    await symlink(stack.rootDir, path.join(otherRoot, 'root'));
    try {
      await waitForWorkerReady(entry.controlDir, { timeoutMs: WORKER_READY_TIMEOUT_MS });
      const err = await checkpointContainer(flowOptions(entry, pid, { containerd: { socket: stack.address, root: path.join(otherRoot, 'root') } })).catch((e: unknown) => e);
      expect(isThawError(err, CheckpointErrorCode.FAILED), String(err)).toBe(true);
      const failure = err as Error & { evidence: Record<string, unknown> };
      expect(failure.evidence).toMatchObject({ phase: 'inspect', causeCode: 'ROOTFS_UPPERDIR_UNTRUSTED' });
      await expect(store.open(name)).rejects.toMatchObject({ code: 'STORE_NOT_FOUND' });
      const marker = await readJson(path.join(entry.controlDir, CHECKPOINT_COMPLETE));
      expect(marker).toMatchObject({ ok: false, checkpoint: name, error: { code: 'CHECKPOINT_FAILED', phase: 'inspect', causeCode: 'ROOTFS_UPPERDIR_UNTRUSTED' } });
      const after = await waitFor(() => readEndpoint(entry.controlDir), `${ENDPOINT_FILE} after the refused checkpoint`, WORKER_READY_TIMEOUT_MS, 50);
      expect((await getJson<WorkerState>(after.port, '/state')).requests).toBe(1);
    } finally {
      await stack.cri.removePod(pod.podId);
      await rm(otherRoot, { recursive: true, force: true });
    }
  }, CHECKPOINT_TEST_TIMEOUT_MS);

  it('the coordinator checkpoints a source once its worker is ready, and abandons one whose pod is removed', async () => {
    const { stack } = handle;
    const events: CheckpointEvent[] = [];
    const real = new CheckpointCoordinator({
      store,
      criu,
      criuVersion,
      containerdVersion: stack.containerdVersion,
      containerd: { socket: stack.address, root: stack.rootDir },
      logger,
      workRoot,
      imageDigestOf: async () => image.manifestDigest,
      onEvent: (e) => events.push(e),
    });
    coordinator.delegate = real;
    const auto = await startSource('ckpt-auto', 'default/demo-auto', { WORKER_MEMORY_MB: '64' });
    // This worker asks for its checkpoint only in 10 minutes: its pod goes away first.
    const late = await startSource('ckpt-late', 'default/demo-late', { WORKER_MEMORY_MB: '16', WORKER_CHECKPOINT_AFTER_MS: '600000' });
    try {
      expect(real.status(late.entry.containerId)?.state).toBe('waiting-for-worker');
      await waitFor(() => events.find((e) => e.containerId === auto.entry.containerId), 'the checkpoint event of ckpt-auto', WORKER_READY_TIMEOUT_MS, 100);
      const event = events.find((e) => e.containerId === auto.entry.containerId)!;
      console.log(`coordinator event: ${JSON.stringify(event)}`);
      expect(event).toMatchObject({ event: 'checkpoint', name: 'default/demo-auto', namespace: 'default', pod: 'default/ckpt-auto', container: auto.entry.containerName, outcome: 'succeeded' });
      const manifest = (await store.open('default/demo-auto')).manifest;
      expect(event.id).toBe(manifest.id);
      expect(event.bytes).toBe(manifest.totals.bytes);
      expect(manifest.constraints.image.digest).toBe(image.manifestDigest);
      expect(logger.lines.some((l) => l.msg === 'checkpoint' && l.fields.event === 'checkpoint' && l.fields.outcome === 'succeeded')).toBe(true);
      const endpoint = await waitFor(() => readEndpoint(auto.entry.controlDir), `${ENDPOINT_FILE} after the checkpoint`, WORKER_READY_TIMEOUT_MS, 50);
      expect((await getJson<WorkerState>(endpoint.port, '/state')).restored).toBe(false);

      await stack.cri.removePod(late.pod.podId);
      await waitFor(() => events.find((e) => e.containerId === late.entry.containerId), 'the cancelled event of ckpt-late', 30_000, 50);
      expect(real.status(late.entry.containerId)?.state).toBe('cancelled');
      await real.idle();
      await expect(store.open('default/demo-late')).rejects.toMatchObject({ code: 'STORE_NOT_FOUND' });
    } finally {
      coordinator.delegate = undefined;
      await real.close();
      await stack.cri.removePod(auto.pod.podId);
      await stack.cri.removePod(late.pod.podId).catch(() => undefined);
    }
  }, CHECKPOINT_TEST_TIMEOUT_MS);
});
