/**
 * `thaw agent` and the `thaw` CLI as an operator uses them, on the real private stack: the agent process with
 * its control API and /metrics, the CLI (bin/thaw.js) run as a process against it, and demo worker pods made
 * through CRI. Covers: the API socket's permissions and exclusivity, checkpoints through the CLI (a running
 * container now, and a checkpoint-source pod when its worker is ready), list, inspect, delete refused while a restore holds the checkpoint (exit 5) and accepted after,
 * /metrics counters moved by exactly one checkpoint and one restore, doctor's lines against facts read here,
 * and SIGTERM with a restore target in flight (clean exit, the pod falls back to a cold start under the next
 * agent, which also removes what an interrupted agent left in the store and the work root), and a bad
 * configuration (exit 2 naming the key). The agent killed mid-restore is e2e.test.ts's (it runs this same agent).
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { get } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseExposition } from '../../src/agent/metrics.js';
import { openLocalStore } from '../../src/store/local-store.js';
import { buildWorkerImage } from '../../demo/worker-image.js';
import { expectedDigest } from '../../demo/worker/memory.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerState } from '../../demo/scenario.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import {
  agentEndpoints,
  apiSocketOf,
  ensureBuilt,
  PACKAGE_ROOT,
  readJsonLog,
  pluginDirsUnder,
  startThawPluginProcess,
  waitForLog,
  type ThawPluginDirs,
  type ThawPluginProcess,
} from '../helpers/thaw-plugin-process.js';

const MEMORY_MB = 64;
const SEED = 23;
const CHECKPOINT = 'cli-worker';
const SLEEPER_CHECKPOINT = 'cli-sleeper';
/** Their store keys: the pods run in namespace default, and a bare name means default/. */
const KEY = `default/${CHECKPOINT}`;
const SLEEPER_KEY = `default/${SLEEPER_CHECKPOINT}`;
/**
 * A container that must keep running through a checkpoint: busybox's sleep returns early (exit 0) when CRIU's
 * dump interrupts its nanosleep, so the loop goes on sleeping.
 */
const SLEEP = ['/bin/sh', '-c', "trap 'exit 0' TERM; while :; do sleep 1; done"];
const THAW_BIN = join(PACKAGE_ROOT, 'bin/thaw.js');

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `thaw <args>` as a process (the package's bin), as an operator would. */
function thaw(args: string[]): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [THAW_BIN, ...args], { timeout: 180_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

function scrape(url: string): Promise<Map<string, number>> {
  return new Promise((resolve, reject) => {
    get(url, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => (res.statusCode === 200 ? resolve(parseExposition(body)) : reject(new Error(`GET ${url}: ${res.statusCode} ${body}`))));
    }).on('error', reject);
  });
}

describe.each(flavorsUnderTest())('thaw agent and CLI on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirs: ThawPluginDirs;
  let agent: ThawPluginProcess | undefined;
  let image: string;
  let socket: string;
  let sourceState: WorkerState;
  let checkpointBytes: number;

  const startAgent = async (): Promise<ThawPluginProcess> => {
    const syncs = async (): Promise<number> => (await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'nri plugin synchronized').length;
    const before = await syncs();
    const p = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs });
    await waitFor(async () => ((await syncs()) > before ? true : undefined), 'the agent to register and synchronize', 60_000);
    return p;
  };
  const metrics = async (): Promise<Map<string, number>> => scrape((await agentEndpoints(dirs.logFile)).metricsUrl);
  const common = () => ({ image, memoryMb: MEMORY_MB, seed: SEED, warmupMs: 300 });
  const restoreEventOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['event'] === 'restore' && r['containerId'] === containerId && r.msg === 'restore', `the restore event of ${containerId}`, 120_000);

  beforeAll(async () => {
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-cli-'));
    dirs = pluginDirsUnder(workDir, handle.stack.paths.prefix, join(workDir, 'agent.log'));
    socket = apiSocketOf(dirs);
    image = (await buildWorkerImage(handle.stack)).ref;
    agent = await startAgent();
  }, 240_000);

  afterAll(async () => {
    await agent?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it('serves its API on a root-only socket and refuses a second agent on it', async () => {
    const s = await stat(socket);
    expect(s.isSocket()).toBe(true);
    expect([s.mode & 0o777, s.uid]).toEqual([0o600, 0]);
    const d = await stat(dirname(socket));
    expect([d.mode & 0o777, d.uid]).toEqual([0o700, 0]);

    const second = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs, logFile: join(workDir, 'second.log'), apiSocket: socket });
    expect((await second.exited).code).toBe(1);
    const refused = (await readJsonLog(join(workDir, 'second.log'))).find((r) => r.msg === 'thaw agent cannot start');
    expect((refused?.['error'] as { code?: string } | undefined)?.code).toBe('AGENT_ALREADY_RUNNING');
    // The first agent still answers.
    const status = await thaw(['status', '--json', '--socket', socket]);
    expect(status.code, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({ pid: agent!.proc.pid, nri: 'connected' });
  });

  it('checkpoints pods through the CLI (a running container now; a checkpoint source when its worker is ready), then lists and inspects them', async () => {
    const stack = handle.stack;
    const before = await metrics();

    const missing = await thaw(['checkpoint', 'default/no-such-pod', '--name', CHECKPOINT, '--socket', socket]);
    expect([missing.code, missing.stderr]).toEqual([4, 'thaw checkpoint: find the container: no pod default/no-such-pod on this node (AGENT_CONTAINER_NOT_FOUND)\n']);

    // Any running container, by id prefix: checkpointed now, and left running.
    const sleeper = await stack.cri.runPod({ name: 'cli-sleeper', uid: 'cli-sleeper-uid', image: stack.images.busybox, command: SLEEP });
    const noName = await thaw(['checkpoint', sleeper.containerId.slice(0, 12), '--socket', socket]);
    expect(noName.code).toBe(2);
    expect(noName.stderr).toMatch(/a checkpoint name is required/);
    // A checkpoint belongs to its pod's namespace: a name in another is refused before anything runs.
    for (const args of [['--name', `team-a/${SLEEPER_CHECKPOINT}`], ['--name', SLEEPER_CHECKPOINT, '--namespace', 'team-a']]) {
      const other = await thaw(['checkpoint', sleeper.containerId.slice(0, 12), ...args, '--socket', socket]);
      expect([other.code, other.stderr]).toEqual([2, `thaw checkpoint: checkpoint name: checkpoint team-a/${SLEEPER_CHECKPOINT} is not of namespace default: a checkpoint belongs to the namespace of the pod it is taken from (STORE_INVALID_NAME)\n`]);
    }
    const now = await thaw(['checkpoint', sleeper.containerId.slice(0, 12), '--name', SLEEPER_CHECKPOINT, '--socket', socket]);
    expect(now.code, `${now.stderr}${now.stdout}`).toBe(0);
    expect(now.stderr).toBe(`thaw: checkpoint ${SLEEPER_KEY} of default/cli-sleeper (container ${sleeper.containerId.slice(0, 12)}): checkpointing\n`);
    expect(now.stdout).toMatch(new RegExp(`^checkpoint ${SLEEPER_KEY} \\(\\S+\\): \\S+ \\S+ in `));
    const sleeperStatus = (await stack.cri.containerStatus(sleeper.containerId)).status;
    expect(sleeperStatus.state, JSON.stringify(sleeperStatus)).toBe('CONTAINER_RUNNING');
    await stack.cri.removePod(sleeper.podId);

    // A checkpoint source, by pod name: the CLI follows (or reports) the checkpoint thaw takes when its worker asks.
    const source = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'cli-source', annotations: { 'thaw.dev/checkpoint': CHECKPOINT }, checkpointAfterMs: 1_000 });
    const first = await waitForServingWorker(source.controlDir);
    const r = await thaw(['checkpoint', 'default/cli-source', '--socket', socket]);
    expect(r.code, `${r.stderr}${r.stdout}`).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^checkpoint ${KEY} \\(\\S+\\): \\S+ \\S+ in `));
    const resumed = await waitForServingWorker(source.controlDir, { accept: (e) => e.port !== first.port });
    sourceState = await getJson<WorkerState>(resumed.port, '/state');

    const list = await thaw(['list', '--json', '--socket', socket]);
    expect(list.code, list.stderr).toBe(0);
    const listed = JSON.parse(list.stdout) as Array<{ name: string; bytes: number; in_use: boolean; source_pod: string; image: string; problem: string }>;
    expect(listed.map((c) => c.name)).toEqual([SLEEPER_KEY, KEY]);
    expect(JSON.parse((await thaw(['list', '--json', '--namespace', 'team-a', '--socket', socket])).stdout), 'another namespace has none').toEqual([]);
    expect(listed[1]).toMatchObject({ in_use: false, source_pod: 'default/cli-source', image, problem: '' });
    checkpointBytes = listed[1]!.bytes;
    const sleeperBytes = listed[0]!.bytes;
    expect(checkpointBytes).toBeGreaterThan(MEMORY_MB * 1024 * 1024);
    const human = await thaw(['list', '--socket', socket]);
    expect(human.stdout.split('\n')[0]).toMatch(/^NAME\s+CREATED\s+SIZE\s+GPU\s+IN USE\s+RESTORE\s+IMAGE$/);

    // A restore-failure mark (what the restore flow records after a fallback because of the checkpoint) shows in
    // list and inspect, and the operator clears it.
    const sameStore = await openLocalStore({ root: dirs.storeRoot });
    await sameStore.recordRestoreFailure(await sameStore.open(KEY), { cause: 'RESTORE_CRIU', reason: 'criu said no', containerId: 'c0ffee', pod: 'default/x' });
    const marked = JSON.parse((await thaw(['list', '--json', '--socket', socket])).stdout) as Array<{ name: string; restore_failure_json: string }>;
    expect(JSON.parse(marked.find((c) => c.name === KEY)!.restore_failure_json)).toMatchObject({ cause: 'RESTORE_CRIU', pod: 'default/x' });
    expect(marked.find((c) => c.name === SLEEPER_KEY)!.restore_failure_json).toBe('');
    expect((await thaw(['list', '--socket', socket])).stdout).toMatch(new RegExp(`^${KEY}\\s.*FAILED RESTORE_CRIU`, 'm'));
    expect((await thaw(['inspect', CHECKPOINT, '--socket', socket])).stdout).toMatch(/^restore failed here: RESTORE_CRIU at .* \(pod default\/x\): criu said no/m);
    const cleared = await thaw(['clear-failure', CHECKPOINT, '--socket', socket]);
    expect([cleared.code, cleared.stdout]).toEqual([0, `cleared the restore-failure mark of ${KEY}: pods naming it restore from it again\n`]);
    expect((await thaw(['clear-failure', CHECKPOINT, '--json', '--socket', socket])).stdout).toBe(`${JSON.stringify({ name: KEY, cleared: false }, null, 2)}\n`);
    expect((await thaw(['clear-failure', 'no-such-checkpoint', '--socket', socket])).code).toBe(4);
    expect(await sameStore.restoreFailure(KEY, (await sameStore.open(KEY)).manifest)).toBeUndefined();

    const inspect = await thaw(['inspect', CHECKPOINT, '--json', '--socket', socket]);
    expect(inspect.code, inspect.stderr).toBe(0);
    const doc = JSON.parse(inspect.stdout) as { restorable: boolean; directory: string; disk_bytes: number; manifest: { name: string; totals: { bytes: number }; source: { container: { id: string } } }; mismatches: Array<{ severity: string }> };
    expect(doc.restorable).toBe(true);
    expect(doc.mismatches.filter((m) => m.severity === 'fatal')).toEqual([]);
    expect(doc.directory).toBe(join(dirs.storeRoot, 'default', CHECKPOINT));
    expect(doc.manifest.totals.bytes).toBe(checkpointBytes);
    expect(doc.manifest.source.container.id).toBe(source.containerId);
    expect(doc.disk_bytes).toBeGreaterThan(checkpointBytes);
    expect((await stat(doc.directory)).mode & 0o777).toBe(0o700);
    expect((await thaw(['inspect', 'no-such-checkpoint', '--socket', socket])).code).toBe(4);
    expect((await thaw(['inspect', CHECKPOINT, '--namespace', 'team-a', '--socket', socket])).code, 'team-a has no such checkpoint').toBe(4);
    // Within the default bounds (no quota, 1 GiB kept free on this disk): a collection would take nothing.
    const gc = await thaw(['gc', '--dry-run', '--json', '--socket', socket]);
    expect(gc.code, gc.stderr).toBe(0);
    expect(JSON.parse(gc.stdout)).toMatchObject({ collected: [], bytes: 0, unmet: '', dry_run: true });
    expect((await thaw(['inspect', KEY, '--json', '--socket', socket])).code).toBe(0);

    const after = await metrics();
    expect(after.get('thaw_checkpoints_total{outcome="succeeded"}')).toBe(before.get('thaw_checkpoints_total{outcome="succeeded"}')! + 2);
    expect(after.get('thaw_checkpoints_total{outcome="failed"}')).toBe(before.get('thaw_checkpoints_total{outcome="failed"}'));
    expect(after.get('thaw_checkpoint_bytes_written_total')).toBe(before.get('thaw_checkpoint_bytes_written_total')! + checkpointBytes + sleeperBytes);
    expect(after.get('thaw_checkpoint_phase_seconds_count{phase="dump"}')).toBe((before.get('thaw_checkpoint_phase_seconds_count{phase="dump"}') ?? 0) + 2);
    expect(after.get('thaw_checkpoints_stored')).toBe(2);
    expect(after.get('thaw_checkpoints_stored_bytes')).toBe(checkpointBytes + sleeperBytes);
    await stack.cri.removePod(source.podId);
  }, 240_000);

  it('refuses to delete a checkpoint while a restore holds it (exit 5); the restore moves /metrics by exactly one', async () => {
    const stack = handle.stack;
    const before = await metrics();
    const target = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'cli-target', annotations: { 'thaw.dev/restore': CHECKPOINT }, start: false });
    // Created, not started: thaw holds the checkpoint for it.
    const status = JSON.parse((await thaw(['status', '--json', '--socket', socket])).stdout) as { restores: Array<{ container_id: string; phase: string; checkpoint: string }> };
    expect(status.restores).toEqual([expect.objectContaining({ container_id: target.containerId, phase: 'prepared', checkpoint: KEY })]);
    const refused = await thaw(['delete', CHECKPOINT, '--socket', socket]);
    expect([refused.code, refused.stderr]).toEqual([5, `thaw delete: delete checkpoint ${KEY}: checkpoint ${KEY} is in use by a restore (STORE_IN_USE)\n`]);
    const listed = JSON.parse((await thaw(['list', '--json', '--socket', socket])).stdout) as Array<{ name: string; in_use: boolean }>;
    expect(listed.map((c) => [c.name, c.in_use])).toEqual([[SLEEPER_KEY, false], [KEY, true]]);
    // Not started: containerd has no task for it, so there is no process to checkpoint (asked of containerd, exit 5).
    const early = await thaw(['checkpoint', target.containerId.slice(0, 12), '--name', 'too-early', '--socket', socket]);
    expect(early.code, early.stderr).toBe(5);
    expect(early.stderr).toMatch(new RegExp(`container ${target.containerId} has no task .*\\(AGENT_CONTAINER_NOT_RUNNING\\)\n$`));

    await stack.cri.startContainer(target.containerId);
    const event = await restoreEventOf(target.containerId);
    expect(event['outcome']).toBe('restored');
    const endpoint = await waitForServingWorker(target.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 });
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect([state.digest, state.bootId, state.restored]).toEqual([expectedDigest(MEMORY_MB, SEED), sourceState.bootId, true]);

    const after = await metrics();
    expect(after.get('thaw_restores_total{outcome="restored"}')).toBe(before.get('thaw_restores_total{outcome="restored"}')! + 1);
    expect(after.get('thaw_restores_total{outcome="fallback"}')).toBe(before.get('thaw_restores_total{outcome="fallback"}'));
    expect(after.get('thaw_restore_phase_seconds_count{phase="total"}')).toBe((before.get('thaw_restore_phase_seconds_count{phase="total"}') ?? 0) + 1);
    expect(after.get('thaw_restore_phase_seconds_count{phase="criu-restore"}')).toBe((before.get('thaw_restore_phase_seconds_count{phase="criu-restore"}') ?? 0) + 1);
    expect(after.get('thaw_restore_bytes_read_total')).toBe(before.get('thaw_restore_bytes_read_total')! + checkpointBytes);
    expect(after.get('thaw_restores_in_flight')).toBe(0);
    await stack.cri.removePod(target.podId);
  }, 240_000);

  it('stops cleanly on SIGTERM with a restore target in flight; the next agent falls it back to a cold start', async () => {
    const stack = handle.stack;
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'cli-sigterm', annotations: { 'thaw.dev/restore': CHECKPOINT }, start: false });
    await waitFor(async () => (existsSync(join(dirs.storeRoot, '.leases')) && (await readdir(join(dirs.storeRoot, '.leases'))).length > 0 ? true : undefined), 'the restore to lease the checkpoint');
    const victim = agent!;
    agent = undefined;
    victim.proc.kill('SIGTERM');
    expect(await victim.exited).toEqual({ code: 0, signal: null });
    const stopped = (await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'thaw agent stopped').pop();
    expect(stopped).toMatchObject({ reason: 'signal', exitCode: 0 });
    expect(existsSync(socket), 'the API socket is removed').toBe(false);
    expect(await readdir(join(dirs.storeRoot, '.leases')), 'the lease is released').toEqual([]);
    expect((await thaw(['status', '--socket', socket])).code).toBe(3);

    // What a crashed agent leaves: an unfinished publication (its writer pid is gone), a checkpoint's CRIU work
    // dir, the restore work dir and the control dir of a container that no longer exists. The next agent
    // removes them at start.
    const leftovers = [
      join(dirs.storeRoot, `.tmp-default+${CHECKPOINT}-999999-1-0123456789abcdef`),
      join(dirs.workRoot, 'thaw-ckpt-crashed-AbCdEf'),
      join(dirs.workRoot, 'f'.repeat(64)),
      join(dirs.controlRoot, 'e'.repeat(64)),
    ];
    for (const dir of leftovers) await mkdir(dir, { recursive: true, mode: 0o700 });

    const reconciled = (await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'work root reconciled with the runtime').length;
    agent = await startAgent();
    await waitFor(async () => ((await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'work root reconciled with the runtime').length > reconciled ? true : undefined), 'the agent to reconcile its work root');
    for (const dir of leftovers) expect(existsSync(dir), `${dir} is removed`).toBe(false);
    await stack.cri.startContainer(pod.containerId);
    const event = await restoreEventOf(pod.containerId);
    expect([event['outcome'], event['cause']]).toEqual(['fallback', 'RESTORE_AGENT_RESTARTED']);
    const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 120_000 });
    expect(endpoint.restored, 'a cold start, not a restore').toBe(false);
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect(state.bootId).not.toBe(sourceState.bootId);
    expect((await stack.cri.containerStatus(pod.containerId)).status.state).toBe('CONTAINER_RUNNING');
    await stack.cri.removePod(pod.podId);

    for (const name of [CHECKPOINT, SLEEPER_KEY]) {
      // A bare name is namespace default's (--namespace names another); the qualified one as it is.
      const deleted = await thaw(['delete', name, '--socket', socket]);
      expect([deleted.code, deleted.stdout]).toEqual([0, `deleted ${name.includes('/') ? name : `default/${name}`}\n`]);
    }
    expect((await thaw(['inspect', CHECKPOINT, '--socket', socket])).code).toBe(4);
    expect(JSON.parse((await thaw(['list', '--json', '--socket', socket])).stdout)).toEqual([]);
    expect((await metrics()).get('thaw_checkpoints_stored')).toBe(0);
  }, 300_000);

  it('doctor reports what is true of this machine, with a fix for each problem', async () => {
    const prefix = handle.stack.paths.prefix;
    const criuCheck = await new Promise<number>((resolve) =>
      execFile(join(prefix, 'bin/criu'), ['check'], { env: { ...process.env, PATH: `${join(prefix, 'bin')}:${process.env['PATH'] ?? ''}` } }, (err) => resolve(err ? 1 : 0)),
    );
    const containerdVersion = await new Promise<string>((resolve) => execFile(join(prefix, 'bin/containerd'), ['--version'], (_e, out) => resolve(out)));
    const overlay = /\toverlay$/m.test(await readFile('/proc/filesystems', 'utf8')) || existsSync('/sys/module/overlay');
    const cgroup2 = existsSync('/sys/fs/cgroup/cgroup.controllers');
    const thp = /\[(\w+)\]/.exec(await readFile('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8').catch(() => ''))?.[1];
    const libcuda = await new Promise<boolean>((resolve) => execFile('/sbin/ldconfig', ['-p'], (_e, out) => resolve(/libcuda\.so\.1 /.test(out))));

    const base = ['doctor', '--json', '--socket', socket, '--paths-toolkit-dir', prefix, '--containerd', join(prefix, 'bin/containerd')];
    const good = await thaw([...base, '--nri-socket', handle.stack.nriSocketPath, '--paths-store-root', dirs.storeRoot]);
    const report = JSON.parse(good.stdout) as { ok: boolean; checks: Array<{ id: string; status: string; detail: string; fix?: string }> };
    const status = (id: string): string | undefined => report.checks.find((c) => c.id === id)?.status;
    expect(status('root')).toBe('pass');
    expect(status('criu.check')).toBe(criuCheck === 0 ? 'pass' : 'fail');
    expect(status('kernel.overlayfs')).toBe(overlay ? 'pass' : 'fail');
    expect(status('kernel.cgroup2')).toBe(cgroup2 ? 'pass' : 'warn');
    expect(status('kernel.thp')).toBe(thp === 'always' ? 'pass' : 'warn');
    expect(status('host.setpriv')).toBe(existsSync('/usr/bin/setpriv') ? 'pass' : 'warn');
    // The host helpers of the restore chain and the hook, checked as host binaries only root can replace.
    for (const h of ['nsenter', 'unshare', 'sh', 'mount', 'umount']) expect([h, status(`host.${h}`)]).toEqual([h, 'pass']);
    expect(report.checks.find((c) => c.id === 'containerd.version')?.detail).toBe(`containerd ${containerdVersion.split(/\s+/)[2]}`);
    expect(status('containerd.nri-args')).toBe('warn'); // 1.7 and 2.1 both predate NRI args (2.2)
    expect(status('containerd.nri')).toBe('pass');
    expect(status('toolkit.tar')).toBe('pass');
    expect(status('thaw-pause')).toBe('pass');
    expect(status('thaw-hook')).toBe('pass');
    expect(status('store.permissions')).toBe('pass');
    expect(status('agent')).toBe('pass');
    expect(status('gpu.driver')).toBe(libcuda ? 'pass' : 'warn');
    if (!libcuda) expect(report.checks.find((c) => c.id === 'gpu.driver')?.detail).toMatch(/^no GPU driver: /);
    for (const c of report.checks) if (c.status !== 'pass') expect(c.fix, `${c.id} has a fix`).toBeTruthy();
    const failing = report.checks.filter((c) => c.status === 'fail');
    expect([good.code, report.ok]).toEqual(failing.length === 0 ? [0, true] : [1, false]);

    // A store open to others and a runtime without NRI fail, and say how to fix them.
    const openStore = join(workDir, 'open-store');
    await mkdir(openStore, { mode: 0o755 });
    await chmod(openStore, 0o755);
    const bad = await thaw([...base, '--nri-socket', join(workDir, 'no-nri.sock'), '--paths-store-root', openStore, ...(libcuda ? [] : ['--require-gpu'])]);
    const badReport = JSON.parse(bad.stdout) as typeof report;
    const badCheck = (id: string) => badReport.checks.find((c) => c.id === id);
    expect(bad.code).toBe(1);
    expect(badCheck('store.permissions')).toMatchObject({ status: 'fail', fix: `chown -R root:root ${openStore} && chmod 0700 ${openStore}` });
    expect(badCheck('store.permissions')?.detail).toMatch(/mode 0755/);
    expect(badCheck('containerd.nri')).toMatchObject({ status: 'fail', detail: `${join(workDir, 'no-nri.sock')} does not exist` });
    if (!libcuda) expect(badCheck('gpu.driver')?.status).toBe('fail');
    // Human output: one line per check, the fix under each problem.
    const human = await thaw(['doctor', '--socket', socket, '--paths-toolkit-dir', prefix, '--containerd', join(prefix, 'bin/containerd'), '--nri-socket', join(workDir, 'no-nri.sock'), '--paths-store-root', openStore]);
    expect(human.stdout).toMatch(/^FAIL  NRI enabled: .* does not exist\n      fix: enable NRI in containerd/m);
  }, 120_000);

  it('a bad configuration stops the agent before it touches anything: exit 2, the key named', async () => {
    const config = join(workDir, 'bad-agent.yaml');
    await writeFile(config, `paths:\n  storeRoot: ${join(workDir, 'never-created')}\ncuda:\n  lockTimeoutMs: ten\n`);
    const r = await thaw(['agent', '--config', config, '--api-socket', join(workDir, 'bad.sock')]);
    expect([r.code, r.stderr]).toEqual([2, `thaw agent: load agent configuration: cuda.lockTimeoutMs (file ${config}): expected a positive integer (milliseconds), got "ten" (a string, not an integer) (AGENT_CONFIG_INVALID)\n`]);
    const typo = await thaw(['agent', '--config', config, '--metrics-listn', 'x']);
    expect([typo.code, typo.stderr.split('\n')[0]]).toEqual([2, "thaw agent: Unknown option '--metrics-listn'"]);
    expect(existsSync(join(workDir, 'never-created'))).toBe(false);
    expect(existsSync(join(workDir, 'bad.sock'))).toBe(false);
  });
});
