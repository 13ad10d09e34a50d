import { ThawError } from '../errors.js';

/**
 * Codes the neutral system layer (`src/sys/`) raises. They say what the kernel (or the caller's signal)
 * answered, never what a caller was doing with it: the caller wraps or maps them to its own layer's codes
 * where a cause must name its domain (e.g. forEachLimit's `aborted`: the store stops with STORE_ABORTED).
 */
export const SysErrorCode = {
  /** The caller's AbortSignal fired. */
  ABORTED: 'SYS_ABORTED',
  /** A path resolved under RESOLVE_BENEATH or RESOLVE_IN_ROOT tried to leave its root (the kernel's EXDEV). */
  OUTSIDE_ROOT: 'SYS_OUTSIDE_ROOT',
  /** A symlink met where the call forbade one (RESOLVE_NO_SYMLINKS, O_NOFOLLOW, RESOLVE_NO_MAGICLINKS: ELOOP). */
  SYMLINK_REFUSED: 'SYS_SYMLINK_REFUSED',
  /** openat2 is not available (kernel < 5.6, ENOSYS) or the CPU architecture has no known syscall number. */
  UNSUPPORTED: 'SYS_UNSUPPORTED',
  /** Any other failed call; evidence: call, path, errno, errnoName (callers test `errnoName`, e.g. ENOENT). */
  CALL_FAILED: 'SYS_CALL_FAILED',
} as const;
export type SysErrorCode = (typeof SysErrorCode)[keyof typeof SysErrorCode];

export class SysError extends ThawError {
  declare readonly code: SysErrorCode;
  /** The errno the kernel answered (0 when the failure is not a syscall's). */
  readonly errno: number;
  /** Its symbolic name (`ENOENT`, ...), or `E<number>` when this OS's table has none; '' when not a syscall's. */
  readonly errnoName: string;

  constructor(
    code: SysErrorCode,
    message: string,
    options: { step: string; errno?: number; errnoName?: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    const errno = options.errno ?? 0;
    const errnoName = options.errnoName ?? '';
    super(code, message, {
      step: options.step,
      cause: options.cause,
      evidence: errno === 0 ? { ...options.evidence } : { errno, errnoName, ...options.evidence },
    });
    this.name = 'SysError';
    this.errno = errno;
    this.errnoName = errnoName;
  }
}

/** The error of an abort, for a caller that names none of its own. */
export function sysAborted(step: string): (cause: unknown) => SysError {
  return (cause) => new SysError(SysErrorCode.ABORTED, 'aborted by the caller', { step, cause });
}
