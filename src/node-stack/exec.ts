import { spawn } from 'node:child_process';
import { StackError, StackErrorCode } from './errors.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';
import { throwIfAborted as checkAborted } from '../util.js';

/** How much of a failed command's stderr/stdout goes into an error's evidence. */
export const EVIDENCE_TAIL_CHARS = 4000;

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Kill the command (SIGKILL) after this long; default 120 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Bytes to write to stdin. */
  input?: string | Buffer;
  /** What the caller was doing, for the error's `step`. */
  step: string;
  /** Code of the error thrown on a non-zero exit; default STACK_PROVISION_FAILED. */
  errorCode?: StackErrorCode;
  /** Resolve instead of throwing on a non-zero exit (timeouts and aborts still throw). */
  allowFailure?: boolean;
}

export interface RunResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  durationMs: number;
}

export const DEFAULT_COMMAND_TIMEOUT_MS = 120_000;

/** The last `n` characters of `text`, marked when cut. */
export function tail(text: string, n = EVIDENCE_TAIL_CHARS): string {
  return text.length <= n ? text : `…${text.slice(text.length - n)}`;
}

/**
 * Runs a command to completion and collects its output. Throws a StackError naming `step` with the
 * command line, exit code and the tails of stderr/stdout when it exits non-zero, runs past
 * `timeoutMs` (the process is SIGKILLed) or `signal` fires.
 */
export function runCommand(file: string, args: readonly string[], options: RunOptions): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
  const started = Date.now();
  const command = [file, ...args].join(' ');
  return new Promise<RunResult>((resolve, reject) => {
    if (options.signal?.aborted) {
      reject(new StackError(StackErrorCode.ABORTED, 'aborted before start', { step: options.step, evidence: { command } }));
      return;
    }
    const child = spawn(file, args, {
      cwd: options.cwd,
      env: options.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let why: 'timeout' | 'abort' | undefined;
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    const kill = (reason: 'timeout' | 'abort'): void => {
      why = reason;
      child.kill('SIGKILL');
    };
    const timer = setTimeout(() => kill('timeout'), Math.min(timeoutMs, MAX_TIMER_DELAY_MS));
    const onAbort = (): void => kill('abort');
    options.signal?.addEventListener('abort', onAbort, { once: true });
    const done = (): void => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
    };
    child.on('error', (e) => {
      done();
      reject(new StackError(options.errorCode ?? StackErrorCode.PROVISION_FAILED, `cannot run ${file}: ${e.message}`, {
        step: options.step,
        cause: e,
        evidence: { command },
      }));
    });
    child.on('close', (code, sig) => {
      done();
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8');
      const durationMs = Date.now() - started;
      const evidence = { command, exitCode: code, signal: sig, stderrTail: tail(stderr), stdoutTail: tail(stdout, 1000) };
      if (why === 'timeout') {
        reject(new StackError(StackErrorCode.COMMAND_TIMEOUT, `${file} ran past ${timeoutMs} ms`, { step: options.step, evidence }));
        return;
      }
      if (why === 'abort') {
        reject(new StackError(StackErrorCode.ABORTED, `${file} aborted`, { step: options.step, cause: options.signal?.reason, evidence }));
        return;
      }
      const exitCode = code ?? 128;
      if (exitCode !== 0 && !options.allowFailure) {
        const firstLine = stderr.trim().split('\n').slice(-1)[0] ?? '';
        reject(new StackError(options.errorCode ?? StackErrorCode.PROVISION_FAILED,
          `${file} exited with ${code ?? sig}${firstLine ? `: ${firstLine}` : ''}`, { step: options.step, evidence }));
        return;
      }
      resolve({ exitCode, stdout, stderr, durationMs });
    });
    child.stdin.on('error', () => undefined); // a command that does not read stdin closes it early
    child.stdin.end(options.input ?? '');
  });
}

/** Throws the ABORTED StackError when `signal` has fired. */
export function throwIfAborted(signal: AbortSignal | undefined, step: string): void {
  checkAborted(signal, (cause) => new StackError(StackErrorCode.ABORTED, 'aborted', { step, cause }));
}

/** Resolves after `ms`, or rejects with ABORTED when `signal` fires first. */
export function sleep(ms: number, signal?: AbortSignal, step = 'wait'): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(new StackError(StackErrorCode.ABORTED, 'aborted', { step, cause: signal.reason }));
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(new StackError(StackErrorCode.ABORTED, 'aborted', { step, cause: signal?.reason }));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, Math.min(ms, MAX_TIMER_DELAY_MS));
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
