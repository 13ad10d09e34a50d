/**
 * Runtime-launched plugins: what the executable containerd starts from its plugin_path runs.
 *
 * containerd starts `<plugin_path>/NN-name` with exactly three environment variables (NRI_PLUGIN_NAME,
 * NRI_PLUGIN_IDX, NRI_PLUGIN_SOCKET=3 — no PATH, no HOME), the socketpair end on fd 3, and stdout/stderr on
 * /dev/null. So: the executable is a tiny shell launcher with an absolute node path, and the plugin logs to
 * a file. containerd relaunches plugins only when it starts; when the trunk ends the process exits.
 */
import { appendFileSync, chmodSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { createJsonLogger, parseLogLevel, type Logger } from '../log.js';
import { NriErrorCode, NriError } from './errors.js';
import { createNriPlugin, readLaunchEnv, type NriHandlers, type NriPlugin, type NriStopInfo } from './plugin.js';

export interface LaunchedPluginOptions {
  handlers: NriHandlers;
  /** Where the plugin's JSON log lines go (its stdout/stderr are /dev/null). */
  logFile: string;
  /** Environment to read (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Called when the trunk ends (default: process.exit(0), or 1 after an error). */
  exit?: (code: number, info: NriStopInfo) => void;
  registrationTimeoutMs?: number;
  /** Lowest level logged (default: THAW_LOG_LEVEL from env, else 'info'). */
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
}

/** A logger appending JSON lines to `path` synchronously (a launched plugin may be SIGKILLed at any time). */
export function createFileLogger(path: string, level: 'debug' | 'info' | 'warn' | 'error' = 'info'): Logger {
  mkdirSync(dirname(path), { recursive: true });
  return createJsonLogger({ level, write: (line) => appendFileSync(path, line) });
}

/**
 * The body of a launched plugin: reads the NRI_PLUGIN_* environment, connects over the inherited fd, and
 * exits the process when the runtime closes the trunk. Resolves with the started plugin.
 */
export async function runLaunchedPlugin(options: LaunchedPluginOptions): Promise<NriPlugin> {
  const env = options.env ?? process.env;
  const logger = createFileLogger(options.logFile, options.logLevel ?? parseLogLevel(env['THAW_LOG_LEVEL']));
  let launch;
  try {
    launch = readLaunchEnv(env);
  } catch (err) {
    logger.error('not launched by an NRI runtime', { error: (err as Error).message });
    throw err;
  }
  logger.info('launched NRI plugin starting', { name: launch.name, idx: launch.idx, fd: launch.fd, pid: process.pid });
  const plugin = createNriPlugin({
    name: launch.name,
    idx: launch.idx,
    fd: launch.fd,
    handlers: options.handlers,
    logger,
    ...(options.registrationTimeoutMs ? { registrationTimeoutMs: options.registrationTimeoutMs } : {}),
  });
  const exit = options.exit ?? ((code: number) => process.exit(code));
  void plugin.stopped.then((info) => {
    logger.info('launched NRI plugin exiting', { reason: info.reason, error: info.error?.message });
    exit(info.reason === 'error' ? 1 : 0, info);
  });
  await plugin.start();
  return plugin;
}

export interface ShellLauncherOptions {
  /** Where to write it, e.g. /opt/nri/plugins/10-thaw (the name must be NN-name). */
  path: string;
  /** The JavaScript entry point to run (absolute). */
  scriptPath: string;
  /** Absolute node binary (default process.execPath: the launched env has no PATH). */
  nodePath?: string;
  /** Extra arguments for the script. */
  args?: string[];
  /** Extra environment for the script (e.g. THAW_LOG_LEVEL). */
  env?: Record<string, string>;
}

const shellQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * Writes the executable containerd launches: `#!/bin/sh` + `exec <abs node> <script> ...`, mode 0755,
 * written to a temporary name and renamed into place (containerd may scan the directory at any time).
 * Throws NRI_INVALID_OPTIONS for a relative path or a file name that is not NN-name (containerd 1.7
 * fails NRI start — and the CRI plugin — on a badly named executable there).
 */
export function writeShellLauncher(options: ShellLauncherOptions): string {
  const nodePath = options.nodePath ?? process.execPath;
  for (const [what, p] of [['path', options.path], ['scriptPath', options.scriptPath], ['nodePath', nodePath]] as const) {
    if (!p.startsWith('/')) throw new NriError(NriErrorCode.NRI_INVALID_OPTIONS, `${what} must be absolute, got ${p}`, { step: 'write NRI launcher' });
  }
  const base = options.path.slice(options.path.lastIndexOf('/') + 1);
  if (!/^[0-9]{2}-.+$/.test(base)) {
    throw new NriError(NriErrorCode.NRI_INVALID_OPTIONS, `a launched plugin's file name must be NN-name, got ${base}`, { step: 'write NRI launcher' });
  }
  const envLines = Object.entries(options.env ?? {}).map(([k, v]) => `export ${k}=${shellQuote(v)}`);
  const script = [
    '#!/bin/sh',
    '# Written by thaw: containerd runs this with only NRI_PLUGIN_{NAME,IDX,SOCKET} set and the trunk on fd 3.',
    ...envLines,
    `exec ${[nodePath, options.scriptPath, ...(options.args ?? [])].map(shellQuote).join(' ')}`,
    '',
  ].join('\n');
  mkdirSync(dirname(options.path), { recursive: true });
  const tmp = `${dirname(options.path)}/.${base}.tmp-${process.pid}`;
  writeFileSync(tmp, script, { mode: 0o755 });
  chmodSync(tmp, 0o755);
  renameSync(tmp, options.path);
  return script;
}
