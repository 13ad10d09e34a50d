/**
 * Runs thaw's NRI plugin as a real process (dist/src/agent/nri-main.js), the way a node runs it, and reads its
 * JSON log. The build must exist: `npm test` builds first (scripts/setup.sh); ensureBuilt() builds when a
 * test file runs alone.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { existsSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { waitFor } from './stack.js';

export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const NRI_MAIN = join(PACKAGE_ROOT, 'dist/src/agent/nri-main.js');

/** Builds dist/ when it is missing or older than the plugin's sources (a test file run on its own). */
export function ensureBuilt(): void {
  const source = join(PACKAGE_ROOT, 'src/agent/thaw-nri.ts');
  if (existsSync(NRI_MAIN) && statSync(NRI_MAIN).mtimeMs >= statSync(source).mtimeMs) return;
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

export async function waitForLog(path: string, match: (r: LogRecord) => boolean, what: string, timeoutMs = 15_000): Promise<LogRecord> {
  return waitFor(async () => (await readJsonLog(path)).find(match), what, timeoutMs);
}

export interface ThawPluginProcess {
  proc: ChildProcess;
  logFile: string;
  /** Resolves with the exit code or signal once the process has exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stop(): Promise<void>;
}

export function startThawPluginProcess(o: { socketPath: string; controlRoot: string; logFile: string; extraArgs?: string[] }): ThawPluginProcess {
  const proc = spawn(process.execPath, [NRI_MAIN, '--socket', o.socketPath, '--control-root', o.controlRoot, '--log-file', o.logFile, '--log-level', 'debug', ...(o.extraArgs ?? [])], {
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => proc.once('exit', (code, signal) => res({ code, signal })));
  return {
    proc,
    logFile: o.logFile,
    exited,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/**
 * Writes the executable containerd launches from its plugin dir: a runtime-launched plugin gets no PATH,
 * so the interpreter is named by its absolute path.
 */
export async function writeLaunchedPluginScript(path: string, o: { controlRoot: string; logFile: string }): Promise<void> {
  const quote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  await writeFile(
    path,
    `#!/bin/sh\nexec ${quote(process.execPath)} ${quote(NRI_MAIN)} --control-root ${quote(o.controlRoot)} --log-file ${quote(o.logFile)} --log-level debug\n`,
  );
  await chmod(path, 0o755);
}
