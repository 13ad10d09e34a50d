import { ThawError } from '../../errors.js';

/**
 * Stable codes of the CRIU RPC client. Callers (the restore flow, the control API, metrics) match on
 * these, never on messages.
 *
 * Connection-fatal (the swrk process is killed and the operation is over): CRIU_PROTOCOL,
 * CRIU_TRANSPORT, CRIU_EXITED, CRIU_TIMEOUT, CRIU_ABORTED, CRIU_NOTIFY_FAILED.
 * Request-level (CRIU answered and reported failure): CRIU_FAILED.
 * Before CRIU runs: CRIU_SPAWN, CRIU_INVALID_OPTIONS.
 */
export const CriuErrorCode = {
  /** CRIU answered `success=false`; evidence has cr_errno, cr_errmsg, the log path and its error lines. */
  FAILED: 'CRIU_FAILED',
  /** A response of the wrong type, an undecodable message, or a truncated one. */
  PROTOCOL: 'CRIU_PROTOCOL',
  /** A socket call failed (socketpair, send, recvmsg); evidence has the errno. */
  TRANSPORT: 'CRIU_TRANSPORT',
  /** The swrk process exited (or closed its socket) before answering; evidence has exit code and stderr tail. */
  EXITED: 'CRIU_EXITED',
  /** The operation ran past `timeoutMs`; CRIU was killed with SIGKILL. */
  TIMEOUT: 'CRIU_TIMEOUT',
  /** The caller's AbortSignal fired; CRIU was killed with SIGKILL. */
  ABORTED: 'CRIU_ABORTED',
  /** A notify handler threw: CRIU was told the script failed and aborted the operation. */
  NOTIFY_FAILED: 'CRIU_NOTIFY_FAILED',
  /** The swrk process could not be started (binary missing, not executable, ...). */
  SPAWN: 'CRIU_SPAWN',
  /** Domain options that cannot be turned into a CRIU request; the message names the field. */
  INVALID_OPTIONS: 'CRIU_INVALID_OPTIONS',
} as const;
export type CriuErrorCode = (typeof CriuErrorCode)[keyof typeof CriuErrorCode];

export class CriuError extends ThawError {
  declare readonly code: CriuErrorCode;

  constructor(
    code: CriuErrorCode,
    message: string,
    options: { step: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    super(code, message, options);
    this.name = 'CriuError';
  }
}

/** How many trailing lines of CRIU's log an error quotes. */
export const CRIU_LOG_TAIL_LINES = 30;
/** Lines of context quoted before each "Error" line (like runc's `grep -B5 Error`). */
export const CRIU_LOG_ERROR_CONTEXT_LINES = 5;

/**
 * Error lines CRIU prints on these machines that are not the cause of anything. CRIU's own cr_errmsg
 * is its FIRST error line, which on a machine without CAP_SYS_RESOURCE is always the rlimit one, so a
 * message built from cr_errmsg alone points at the wrong thing.
 */
export const HARMLESS_CRIU_ERRORS: readonly RegExp[] = [/Can't setup RLIMIT_NOFILE for self/, /tun: Unable to create tun/];

/** What an error shows of CRIU's log: its path, the last lines, and the Error lines with context. */
export interface CriuLogExcerpt {
  path: string;
  /** The first Error line that is not in HARMLESS_CRIU_ERRORS (usually the cause), without its timestamp. */
  firstError?: string;
  /** The last CRIU_LOG_TAIL_LINES lines. */
  tail: string[];
  /** Each line containing "Error" with CRIU_LOG_ERROR_CONTEXT_LINES lines before it; groups split by "--". */
  errorLines: string[];
  /** Set when the log could not be read (and why). */
  unreadable?: string;
}

/**
 * Picks the evidence out of a CRIU log's text. Pure, so the error rendering is testable without CRIU.
 * The Error lines are what a human needs first (CRIU's first error is usually the cause; later ones
 * are the unwinding), so they come complete, each with its context, like `grep -n -B5 Error`.
 */
export function excerptCriuLog(path: string, text: string): CriuLogExcerpt {
  const lines = text.split('\n');
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  const tail = lines.slice(-CRIU_LOG_TAIL_LINES);
  const errorLines: string[] = [];
  let firstError: string | undefined;
  let lastPrinted = -1;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i] ?? '';
    if (!/Error/.test(line)) continue;
    if (firstError === undefined && !HARMLESS_CRIU_ERRORS.some((re) => re.test(line))) {
      firstError = line.replace(/^\(\s*[\d.]+\)\s*/, '');
    }
    const from = Math.max(i - CRIU_LOG_ERROR_CONTEXT_LINES, lastPrinted + 1);
    if (lastPrinted >= 0 && from > lastPrinted + 1) errorLines.push('--');
    for (let j = from; j <= i; j++) errorLines.push(`${j + 1}: ${lines[j]}`);
    lastPrinted = i;
  }
  return firstError === undefined ? { path, tail, errorLines } : { path, tail, errorLines, firstError };
}

/** The multi-line text an operator reads: the Error lines if any, otherwise the log's tail. */
export function renderCriuLogExcerpt(excerpt: CriuLogExcerpt): string {
  if (excerpt.unreadable !== undefined) return `CRIU log ${excerpt.path}: unreadable (${excerpt.unreadable})`;
  if (excerpt.errorLines.length > 0) {
    return [`CRIU log ${excerpt.path}, Error lines:`, ...excerpt.errorLines.map((l) => `  ${l}`)].join('\n');
  }
  return [`CRIU log ${excerpt.path}, last ${excerpt.tail.length} lines:`, ...excerpt.tail.map((l) => `  ${l}`)].join('\n');
}
