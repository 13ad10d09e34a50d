/**
 * `thaw doctor`: what thaw needs of a node, each check a line with its status and, when it does not pass, the
 * fix. A check that fails makes the command exit 1; a warning does not (thaw works, in a lesser way: no GPU,
 * the createRuntime overlay instead of NRI args). Every check runs even when an earlier one failed.
 */
import { execFile } from 'node:child_process';
import { access, constants, lstat, open, readFile, readdir, realpath } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import type { AgentConfig } from '../agent/index.js';
import { HOST_HELPERS } from '../agent/index.js';
import { gpuFacts, tryLoadCuda, tryLoadNvml } from '../cuda/index.js';
import { errorMessage } from '../errors.js';
import { NATIVE_HOOK_NAME } from '../defaults.js';
import { elfHasInterpreter } from '../elf.js';
import { parseVersion, supportsArgs } from '../nri-plugin/index.js';
import { readThpMode, THP_ENABLED_PATH } from '../sys/host-facts.js';
import { AgentClient } from './client.js';

const execFileP = promisify(execFile);

export const DOCTOR_COMMAND_TIMEOUT_MS = 30_000;
export const DOCTOR_SOCKET_TIMEOUT_MS = 2_000;

export type CheckStatus = 'pass' | 'warn' | 'fail';

export interface DoctorCheck {
  /** A stable id (tests and scripts match on it). */
  id: string;
  title: string;
  status: CheckStatus;
  detail: string;
  /** What to do about it (absent when it passes). */
  fix?: string;
}

export interface DoctorOptions {
  config: AgentConfig;
  /** The containerd binary; default `containerd` on PATH. */
  containerd?: string;
  requireGpu?: boolean;
  apiSocket: string;
}

async function run(file: string, args: string[], env?: NodeJS.ProcessEnv): Promise<{ code: number; out: string }> {
  try {
    const r = await execFileP(file, args, { timeout: DOCTOR_COMMAND_TIMEOUT_MS, ...(env ? { env } : {}) });
    return { code: 0, out: `${r.stdout}${r.stderr}` };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string };
    if (typeof e.code === 'string') return { code: -1, out: errorMessage(err) }; // ENOENT, EACCES: not run at all
    return { code: e.code ?? -1, out: `${e.stdout ?? ''}${e.stderr ?? ''}` };
  }
}

const exists = (p: string): Promise<boolean> => access(p).then(() => true, () => false);
const executable = (p: string): Promise<boolean> => access(p, constants.X_OK).then(() => true, () => false);

function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    const timer = setTimeout(() => (s.destroy(), resolve(false)), DOCTOR_SOCKET_TIMEOUT_MS);
    s.once('connect', () => (clearTimeout(timer), s.destroy(), resolve(true)));
    s.once('error', () => (clearTimeout(timer), resolve(false)));
  });
}

/** The version token of `containerd --version` ("containerd github.com/containerd/containerd 1.7.24~ds1 ..."). */
export function containerdVersionOf(output: string): string | undefined {
  const m = /^containerd\s+\S+\s+(v?\d+\.\d+\S*)/m.exec(output.trim());
  return m?.[1];
}

async function kernelChecks(): Promise<DoctorCheck[]> {
  const filesystems = await readFile('/proc/filesystems', 'utf8').catch(() => '');
  const overlay = /\toverlay$/m.test(filesystems) || (await exists('/sys/module/overlay'));
  return [
    (await exists('/proc/self/map_files'))
      ? { id: 'kernel.checkpoint_restore', title: 'kernel: CONFIG_CHECKPOINT_RESTORE', status: 'pass', detail: '/proc/self/map_files is present' }
      : { id: 'kernel.checkpoint_restore', title: 'kernel: CONFIG_CHECKPOINT_RESTORE', status: 'fail', detail: '/proc/self/map_files is missing', fix: 'boot a kernel built with CONFIG_CHECKPOINT_RESTORE=y (every major distribution kernel has it)' },
    overlay
      ? { id: 'kernel.overlayfs', title: 'kernel: overlayfs', status: 'pass', detail: 'overlay is a known filesystem' }
      : { id: 'kernel.overlayfs', title: 'kernel: overlayfs', status: 'fail', detail: 'overlay is not in /proc/filesystems', fix: 'modprobe overlay (and add it to /etc/modules-load.d/)' },
    (await exists('/proc/sys/vm/unprivileged_userfaultfd'))
      ? { id: 'kernel.userfaultfd', title: 'kernel: userfaultfd', status: 'pass', detail: 'CONFIG_USERFAULTFD is enabled' }
      : { id: 'kernel.userfaultfd', title: 'kernel: userfaultfd', status: 'warn', detail: 'no /proc/sys/vm/unprivileged_userfaultfd: no lazy restores, so CRIU fills restored memory on one thread (thaw-fill is not used)', fix: 'a kernel with CONFIG_USERFAULTFD=y' },
    thpCheck(await readThpMode()),
    (await exists('/sys/fs/cgroup/cgroup.controllers'))
      ? { id: 'kernel.cgroup2', title: 'kernel: cgroup v2', status: 'pass', detail: '/sys/fs/cgroup is the unified hierarchy' }
      : { id: 'kernel.cgroup2', title: 'kernel: cgroup v2', status: 'warn', detail: '/sys/fs/cgroup is not cgroup v2 (thaw is tested on v2 only)', fix: 'boot with systemd.unified_cgroup_hierarchy=1' },
  ];
}

/** Transparent huge pages decide CRIU's page-restore rate (bench/RESULTS.md, bench:gpu). */
export function thpCheck(mode: string | undefined): DoctorCheck {
  const title = 'kernel: transparent huge pages';
  if (mode === 'always') return { id: 'kernel.thp', title, status: 'pass', detail: 'always: CRIU restores anonymous memory in 2 MiB pages' };
  return {
    id: 'kernel.thp',
    title,
    status: 'warn',
    detail: `${mode ?? `no ${THP_ENABLED_PATH}`}: CRIU restores a worker's anonymous memory in 4 KiB page faults (on the H200 machine 1.6-2.0 GB/s, against 2.9-3.0 GB/s with always)`,
    fix: `on GPU nodes: echo always > ${THP_ENABLED_PATH} (boot: transparent_hugepage=always), weighing the memory it costs other workloads; measure this host with bench/gpu/criu-page-rate.sh`,
  };
}

async function toolkitChecks(c: AgentConfig): Promise<DoctorCheck[]> {
  const bin = join(c.paths.toolkitDir, 'bin');
  const criu = join(bin, 'criu');
  const fixToolkit = `install the toolkit (thaw install, or scripts/setup.sh in a checkout) or set paths.toolkitDir (now ${c.paths.toolkitDir})`;
  const out: DoctorCheck[] = [];
  const version = await run(criu, ['--version']);
  if (version.code !== 0) {
    out.push({ id: 'criu.version', title: 'CRIU', status: 'fail', detail: `${criu} does not run: ${version.out.trim().split('\n')[0]}`, fix: fixToolkit });
  } else {
    const v = /Version:\s*(\S+)/.exec(version.out)?.[1] ?? version.out.trim();
    out.push({ id: 'criu.version', title: 'CRIU', status: 'pass', detail: `${criu} version ${v}` });
    const check = await run(criu, ['check'], { ...process.env, PATH: `${bin}:${process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin'}` });
    const lines = check.out.trim().split('\n').filter((l) => l.trim() !== '');
    out.push(
      check.code === 0
        ? { id: 'criu.check', title: 'criu check', status: 'pass', detail: lines[lines.length - 1] ?? 'ok' }
        : { id: 'criu.check', title: 'criu check', status: 'fail', detail: `exit ${check.code}: ${lines.slice(-3).join(' | ')}`, fix: 'run `criu check` as root and fix what it reports (kernel features, or run as root)' },
    );
  }
  for (const tool of ['tar', 'gzip']) {
    const path = join(bin, tool);
    out.push(
      (await executable(path))
        ? { id: `toolkit.${tool}`, title: `toolkit ${tool}`, status: 'pass', detail: path }
        : { id: `toolkit.${tool}`, title: `toolkit ${tool}`, status: 'fail', detail: `${path} is missing`, fix: fixToolkit },
    );
  }
  out.push(
    (await executable(c.paths.thawPause))
      ? { id: 'thaw-pause', title: 'thaw-pause', status: 'pass', detail: c.paths.thawPause }
      : { id: 'thaw-pause', title: 'thaw-pause', status: 'fail', detail: `${c.paths.thawPause} is missing or not executable`, fix: 'make -C native (in a checkout) or thaw install; or set paths.thawPause' },
  );
  out.push(await nativeHookCheck(join(dirname(c.paths.thawPause), NATIVE_HOOK_NAME)));
  return out;
}

/** The native createRuntime hook beside thaw-pause: without it (or if it is not static) restores pay a Node.js start. */
export async function nativeHookCheck(path: string): Promise<DoctorCheck> {
  const id = 'thaw-hook';
  const title = 'native createRuntime hook';
  if (!(await executable(path))) {
    return { id, title, status: 'warn', detail: `${path} is missing or not executable: restores run the Node.js hook (its start is on every restore's critical path)`, fix: 'make -C native (in a checkout) or thaw install' };
  }
  // Static: runc runs it with no environment, and a loader or library to fault in would cost what it saves.
  const dynamic = await elfHasInterpreter(path).catch(() => true);
  return dynamic
    ? { id, title, status: 'warn', detail: `${path} is not a static ELF executable`, fix: 'rebuild it with make -C native (it links with -static)' }
    : { id, title, status: 'pass', detail: `${path} (static; the agent does its work, over a socket beside its API socket)` };
}

/**
 * Why `path` (absolute) is not a host binary only root can replace, or undefined when it is: its real path
 * (symlinks resolved, as exec resolves them) must be a regular executable ELF file owned by root and writable by
 * nobody else, and every directory up to `/`, of the path as named and of the real one, owned by root and
 * writable by nobody else (else a non-root user could swap what thaw runs as root).
 */
export async function hostBinaryProblem(path: string): Promise<string | undefined> {
  let real: string;
  try {
    real = await realpath(path);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT' ? `${path} does not exist` : `${path}: ${errorMessage(err)}`;
  }
  const via = real === path ? path : `${path} (${real})`;
  const st = await lstat(real);
  if (!st.isFile()) return `${via} is not a regular file`;
  if (st.uid !== 0) return `${via} is owned by uid ${st.uid}, not root`;
  if ((st.mode & 0o022) !== 0) return `${via} is writable by group or others (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')})`;
  if ((st.mode & 0o100) === 0) return `${via} is not executable`;
  const fh = await open(real, 'r');
  try {
    const head = Buffer.alloc(4);
    const { bytesRead } = await fh.read(head, 0, 4, 0);
    if (bytesRead < 4 || head.toString('latin1') !== '\x7fELF') return `${via} is not an ELF binary (a script would run an interpreter of its own choosing)`;
  } finally {
    await fh.close();
  }
  // The directories of the path as named and of the file it resolves to: whoever may write to one of them can
  // swap a symlink or the file.
  for (const start of new Set([dirname(path), dirname(real)])) {
    for (let dir = start; ; dir = dirname(dir)) {
      const d = await lstat(dir);
      // A symlinked directory (/bin -> usr/bin) has no mode of its own: its owner and its directory's count.
      if (d.uid !== 0 || (!d.isSymbolicLink() && (d.mode & 0o022) !== 0)) return `${via}: its directory ${dir} is owned by uid ${d.uid} with mode ${(d.mode & 0o7777).toString(8).padStart(4, '0')} (root only, not writable by group or others)`;
      if (dir === '/' || dir === '.') break;
    }
  }
  return undefined;
}

/**
 * The host programs thaw runs as root by absolute path (HOST_HELPERS): each must be a host binary only root can
 * replace. A required one missing or unsafe fails; setpriv missing warns (thaw works without it), unsafe fails.
 */
export async function hostHelperChecks(helpers: ReadonlyArray<{ name: string; path: string; required: boolean; role: string }> = HOST_HELPERS): Promise<DoctorCheck[]> {
  return Promise.all(
    helpers.map(async (h): Promise<DoctorCheck> => {
      const id = `host.${h.name}`;
      const title = `${h.name} (${h.role})`;
      const problem = await hostBinaryProblem(h.path).catch((err: unknown) => `${h.path}: ${errorMessage(err)}`);
      if (problem === undefined) return { id, title, status: 'pass', detail: h.path };
      const missing = problem === `${h.path} does not exist`;
      const fix = missing ? `install ${h.name} at ${h.path} from the distribution (${h.name === 'sh' ? 'dash or bash' : 'util-linux'})` : `chown root:root and chmod go-w ${h.path} and its directories, or reinstall it from the distribution's package`;
      return { id, title, status: missing && !h.required ? 'warn' : 'fail', detail: missing && !h.required ? `${problem}: a CRIU dumping a worker outlives a killed agent and traces the worker on` : problem, fix };
    }),
  );
}

async function containerdChecks(c: AgentConfig, binary: string): Promise<DoctorCheck[]> {
  const out: DoctorCheck[] = [];
  const v = await run(binary, ['--version']);
  const version = v.code === 0 ? containerdVersionOf(v.out) : undefined;
  if (version === undefined) {
    out.push({ id: 'containerd.version', title: 'containerd', status: 'fail', detail: `${binary} --version: ${v.out.trim().split('\n')[0] || `exit ${v.code}`}`, fix: 'install containerd ≥ 1.7, or pass --containerd PATH' });
  } else {
    const parsed = parseVersion(version);
    const tooOld = parsed !== undefined && (parsed[0] < 1 || (parsed[0] === 1 && parsed[1] < 7));
    out.push(
      tooOld
        ? { id: 'containerd.version', title: 'containerd', status: 'fail', detail: `containerd ${version}: NRI needs 1.7 or later`, fix: 'upgrade containerd to 1.7 or later' }
        : { id: 'containerd.version', title: 'containerd', status: 'pass', detail: `containerd ${version}` },
    );
    out.push(
      supportsArgs('containerd', version)
        ? { id: 'containerd.nri-args', title: 'NRI args adjustment', status: 'pass', detail: `containerd ${version} honours NRI args: thaw-pause is set as the process directly` }
        : { id: 'containerd.nri-args', title: 'NRI args adjustment', status: 'warn', detail: `containerd ${version} ignores NRI args (< 2.2): restores use the createRuntime overlay of the entrypoint`, fix: 'containerd 2.2 or later for the args path (the overlay path works)' },
    );
  }
  const st = await lstat(c.nri.socket).catch(() => undefined);
  const answers = st?.isSocket() ? await socketAnswers(c.nri.socket) : false;
  out.push(
    answers
      ? { id: 'containerd.nri', title: 'NRI enabled', status: 'pass', detail: `${c.nri.socket} answers` }
      : {
          id: 'containerd.nri',
          title: 'NRI enabled',
          status: 'fail',
          detail: st === undefined ? `${c.nri.socket} does not exist` : st.isSocket() ? `${c.nri.socket} does not answer` : `${c.nri.socket} is not a socket`,
          fix: 'enable NRI in containerd (1.7: [plugins."io.containerd.nri.v1.nri"] disable = false; 2.x: on by default) and restart containerd, or set nri.socket',
        },
  );
  return out;
}

function gpuCheck(c: AgentConfig, requireGpu: boolean): DoctorCheck {
  const cuda = tryLoadCuda(c.cuda.libcuda ? { path: c.cuda.libcuda } : {});
  if (!cuda.ok) {
    return { id: 'gpu.driver', title: 'GPU driver', status: requireGpu ? 'fail' : 'warn', detail: `no GPU driver: ${cuda.reason}; workers are checkpointed as CPU-only`, fix: 'install the NVIDIA driver r570+ (CUDA 12.8+) for GPU checkpoints' };
  }
  const nvml = tryLoadNvml(c.cuda.libnvml ? { path: c.cuda.libnvml } : {});
  const facts = gpuFacts({ cuda: cuda.driver, nvml: nvml.ok ? nvml.nvml : undefined });
  const api = `CUDA ${Math.floor(cuda.driver.driverVersion / 1000)}.${(cuda.driver.driverVersion % 1000) / 10}`;
  if (facts === undefined) return { id: 'gpu.driver', title: 'GPU driver', status: requireGpu ? 'fail' : 'warn', detail: `${cuda.driver.path}: ${api}, but no GPU is visible`, fix: 'check nvidia-smi' };
  return { id: 'gpu.driver', title: 'GPU driver', status: 'pass', detail: `${facts.uuids.length}× ${facts.model}, driver ${facts.driverVersion ?? '(NVML unavailable)'}, ${api}` };
}

async function storeCheck(c: AgentConfig): Promise<DoctorCheck> {
  const root = c.paths.storeRoot;
  const st = await lstat(root).catch(() => undefined);
  const title = 'checkpoint store permissions';
  if (st === undefined) return { id: 'store.permissions', title, status: 'warn', detail: `${root} does not exist yet (the agent creates it 0700)`, fix: `mkdir -m 0700 ${root}, or let the agent create it` };
  const mode = st.mode & 0o777;
  const problems: string[] = [];
  if (!st.isDirectory()) problems.push('not a directory');
  if (st.uid !== 0) problems.push(`owned by uid ${st.uid}`);
  if (mode !== 0o700) problems.push(`mode ${mode.toString(8).padStart(4, '0')}`);
  // Published checkpoints hold process memory: each directory must be root-only too.
  for (const entry of st.isDirectory() ? await readdir(root).catch(() => [] as string[]) : []) {
    const e = await lstat(join(root, entry)).catch(() => undefined);
    if (e?.isDirectory() && ((e.mode & 0o077) !== 0 || e.uid !== 0)) problems.push(`${entry}/ mode ${(e.mode & 0o777).toString(8).padStart(4, '0')} uid ${e.uid}`);
  }
  if (problems.length === 0) return { id: 'store.permissions', title, status: 'pass', detail: `${root}: 0700, root-owned` };
  return { id: 'store.permissions', title, status: 'fail', detail: `${root}: ${problems.join(', ')} (checkpoints hold process memory, secrets included)`, fix: `chown -R root:root ${root} && chmod 0700 ${root}` };
}

async function agentCheck(socket: string): Promise<DoctorCheck> {
  const client = new AgentClient(socket);
  try {
    const v = await client.version(DOCTOR_SOCKET_TIMEOUT_MS);
    return { id: 'agent', title: 'thaw agent', status: 'pass', detail: `answers on ${socket}: thaw ${v.version}, runtime ${v.runtime || 'not connected yet'}` };
  } catch (err) {
    return { id: 'agent', title: 'thaw agent', status: 'warn', detail: `does not answer on ${socket}: ${errorMessage(err)}`, fix: 'systemctl start thaw-agent (or run `thaw agent`)' };
  } finally {
    client.close();
  }
}

export async function runDoctor(o: DoctorOptions): Promise<DoctorCheck[]> {
  const uid = process.getuid?.() ?? 0;
  const root: DoctorCheck =
    uid === 0
      ? { id: 'root', title: 'running as root', status: 'pass', detail: 'uid 0' }
      : { id: 'root', title: 'running as root', status: 'fail', detail: `uid ${uid}: CRIU, NRI and the store need root`, fix: 'run thaw as root (sudo thaw doctor)' };
  const [kernel, helpers, toolkit, containerd, store, agent] = await Promise.all([
    kernelChecks(),
    hostHelperChecks(),
    toolkitChecks(o.config),
    containerdChecks(o.config, o.containerd ?? 'containerd'),
    storeCheck(o.config),
    agentCheck(o.apiSocket),
  ]);
  return [root, ...kernel, ...helpers, ...toolkit, ...containerd, gpuCheck(o.config, o.requireGpu ?? false), store, agent];
}

export function renderDoctor(checks: readonly DoctorCheck[]): string {
  const mark: Record<CheckStatus, string> = { pass: 'PASS', warn: 'WARN', fail: 'FAIL' };
  const lines = checks.map((c) => `${mark[c.status]}  ${c.title}: ${c.detail}${c.fix ? `\n      fix: ${c.fix}` : ''}`);
  const failed = checks.filter((c) => c.status === 'fail').length;
  const warned = checks.filter((c) => c.status === 'warn').length;
  lines.push('', failed === 0 ? `ok (${warned} warning${warned === 1 ? '' : 's'})` : `${failed} check${failed === 1 ? '' : 's'} failed, ${warned} warning${warned === 1 ? '' : 's'}`);
  return lines.join('\n');
}
