import { ThawError } from '../errors.js';

/**
 * Codes of the neutral system facilities (src/sys/). A caller that has its own layer's code for the same
 * case passes it (e.g. forEachLimit's `aborted`: the store stops with STORE_ABORTED).
 */
export const SysErrorCode = {
  /** The caller's AbortSignal fired. */
  ABORTED: 'SYS_ABORTED',
} as const;
export type SysErrorCode = (typeof SysErrorCode)[keyof typeof SysErrorCode];

export class SysError extends ThawError {
  declare readonly code: SysErrorCode;

  constructor(code: SysErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'SysError';
  }
}

/** The error of an abort, for a caller that names none of its own. */
export function sysAborted(step: string): (cause: unknown) => SysError {
  return (cause) => new SysError(SysErrorCode.ABORTED, 'aborted by the caller', { step, cause });
}
