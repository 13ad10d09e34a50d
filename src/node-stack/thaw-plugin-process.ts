/**
 * Runs the thaw agent as a real process (`thaw agent`: dist/src/cli/main.js agent) beside a private stack, the
 * way a node runs it, and reads its JSON log. Used by the tests, the demo and the benchmarks, so that the
 * product path is what they exercise. The build must exist: scripts/setup.sh builds it (`ensureBuilt()` builds
 * when a single test file runs alone). Each agent gets its own API socket (`<log file>.sock` unless given) and
 * a /metrics port picked by the kernel (`agentEndpoints` reads both back from the log).
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { packageRoot } from '../util.js';


export const PACKAGE_ROOT = packageRoot();
export const CLI_MAIN = join(PACKAGE_ROOT, 'dist/src/cli/main.js');
export const PLUGIN_STOP_GRACE_MS = 5_000;
/** libuv's default pool is 4 threads; each CRIU operation in flight holds one for its whole duration. */
export const PLUGIN_UV_THREADPOOL_SIZE = 16;

/** Every .ts file under `dir` (recursively). */
function tsFilesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? tsFilesUnder(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : []));
}

/** Builds dist/ when it is missing or older than any source under src/ (a test must not run a stale agent). */
export function ensureBuilt(): void {
  const sources = tsFilesUnder(join(PACKAGE_ROOT, 'src'));
  if (existsSync(CLI_MAIN) && sources.every((s) => statSync(CLI_MAIN).mtimeMs >= statSync(s).mtimeMs)) return;
  execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: PACKAGE_ROOT, stdio: 'inherit' });
}

export interface LogRecord {
  level: string;
  msg: string;
  [key: string]: unknown;
}

export async function readJsonLog(path: string): Promise<LogRecord[]> {
  const text = await readFile(path, 'utf8').catch(() => '');
  return text
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => JSON.parse(line) as LogRecord);
}

/** Polls the log until a record matches; throws after `timeoutMs` with the log's last lines. */
export async function waitForLog(path: string, match: (r: LogRecord) => boolean, what: string, timeoutMs = 15_000, signal?: AbortSignal): Promise<LogRecord> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const records = await readJsonLog(path);
    const found = records.find(match);
    if (found) return found;
    if (Date.now() > deadline) {
      const tail = records.slice(-5).map((r) => JSON.stringify(r)).join('\n');
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last log lines of ${path}:\n${tail}`);
    }
    await sleep(50, undefined, signal ? { signal } : undefined);
  }
}

export interface ThawPluginProcess {
  proc: ChildProcess;
  logFile: string;
  /** Resolves with the exit code or signal once the process has exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGTERM, then SIGKILL after PLUGIN_STOP_GRACE_MS. */
  stop(): Promise<void>;
}

/** Where a plugin process keeps its state: tests and the demo keep all of it under their own temp dir. */
export interface ThawPluginDirs {
  controlRoot: string;
  /** The checkpoint store. */
  storeRoot: string;
  /** The toolkit (the stack's prefix: CRIU, GNU tar, gzip). */
  stackPrefix: string;
  /** CRIU work dirs of restores. */
  workRoot: string;
  logFile: string;
  /** The control API's socket; default `<logFile>.sock`. */
  apiSocket?: string;
}

/** The plugin's dirs under one work dir (control/, checkpoints/, restore/), with the stack's prefix as toolkit. */
export function pluginDirsUnder(workDir: string, stackPrefix: string, logFile: string): ThawPluginDirs {
  return { controlRoot: join(workDir, 'control'), storeRoot: join(workDir, 'checkpoints'), workRoot: join(workDir, 'restore'), stackPrefix, logFile };
}

export function apiSocketOf(o: ThawPluginDirs): string {
  return o.apiSocket ?? `${o.logFile}.sock`;
}

function pluginArgs(o: ThawPluginDirs): string[] {
  return [
    'agent',
    '--paths-control-root', o.controlRoot,
    '--paths-store-root', o.storeRoot,
    '--paths-toolkit-dir', o.stackPrefix,
    '--paths-work-root', o.workRoot,
    '--api-socket', apiSocketOf(o),
    '--metrics-listen', '127.0.0.1:0',
    '--log-file', o.logFile,
    '--log-level', 'debug',
  ];
}

/** Where the agent that logs to `logFile` serves (its latest start): the API socket and the /metrics URL. */
export async function agentEndpoints(logFile: string, timeoutMs = 30_000): Promise<{ apiSocket: string; metricsUrl: string; pid: number }> {
  const started = (await readJsonLog(logFile)).filter((r) => r.msg === 'thaw agent started');
  const last = started.length > 0 ? started[started.length - 1] : await waitForLog(logFile, (r) => r.msg === 'thaw agent started', 'the agent to start', timeoutMs);
  return { apiSocket: String(last!['apiSocket']), metricsUrl: String(last!['metrics']), pid: Number(last!['pid']) };
}

/** `env` adds to (and overrides) this process's environment for the plugin (e.g. the fake CUDA driver's settings). */
/**
 * `containerd`: the stack's gRPC socket and root directory (`NodeStack.address`, `.rootDir`), where the agent
 * learns a checkpointed container's upperdir; required, since the node's defaults name another containerd.
 */
export function startThawPluginProcess(
  o: ThawPluginDirs & { socketPath: string; containerd: { socket: string; root: string }; extraArgs?: string[]; env?: Record<string, string> },
): ThawPluginProcess {
  // The CRIU client holds a libuv threadpool thread per operation in flight (src/restore-engine/criu):
  // a larger pool keeps file I/O moving while restores run.
  const proc = spawn(process.execPath, [CLI_MAIN, ...pluginArgs(o), '--nri-socket', o.socketPath, '--containerd-socket', o.containerd.socket, '--containerd-root', o.containerd.root, ...(o.extraArgs ?? [])], {
    stdio: ['ignore', 'inherit', 'inherit'],
    env: { ...process.env, UV_THREADPOOL_SIZE: process.env['UV_THREADPOOL_SIZE'] ?? String(PLUGIN_UV_THREADPOOL_SIZE), ...o.env },
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => proc.once('exit', (code, signal) => res({ code, signal })));
  return {
    proc,
    logFile: o.logFile,
    exited,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), PLUGIN_STOP_GRACE_MS);
      await exited;
      clearTimeout(timer);
    },
  };
}

/**
 * Writes the executable containerd launches from its plugin dir: a runtime-launched plugin gets no PATH,
 * so the interpreter is named by its absolute path.
 */
export async function writeLaunchedPluginScript(path: string, o: ThawPluginDirs): Promise<void> {
  const quote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  const argv = [process.execPath, CLI_MAIN, ...pluginArgs(o)].map(quote).join(' ');
  await writeFile(path, `#!/bin/sh\nUV_THREADPOOL_SIZE=${PLUGIN_UV_THREADPOOL_SIZE} exec ${argv}\n`);
  await chmod(path, 0o755);
}
