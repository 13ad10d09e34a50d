import { ThawError } from '../errors.js';
import { throwIfAborted as checkAborted } from '../util.js';

/**
 * Codes the local checkpoint store raises. Callers (the restore path, the CLI, the control API) match on
 * these, never on messages. Any of them on the restore path means "cold start and say why".
 */
export const StoreErrorCode = {
  /** A checkpoint name broke the name rule (src/checkpoint-name.ts): `..`, `/`, NUL, empty, too long. */
  INVALID_NAME: 'STORE_INVALID_NAME',
  /** publish() without `replace: true` onto a name that exists. */
  EXISTS: 'STORE_EXISTS',
  /** No checkpoint of that name. */
  NOT_FOUND: 'STORE_NOT_FOUND',
  /** manifest.json is missing, not JSON, of another schema version, or a field is wrong (the message names it). */
  MANIFEST_INVALID: 'STORE_MANIFEST_INVALID',
  /**
   * The manifest on disk is not the one the caller chose and checked (verify's `manifest`): the checkpoint was
   * replaced between the check and the use.
   */
  MANIFEST_CHANGED: 'STORE_MANIFEST_CHANGED',
  /** A file's size or sha256 differs from the manifest (evidence: file, expected, actual). */
  DIGEST_MISMATCH: 'STORE_DIGEST_MISMATCH',
  /** A file the manifest lists is not on disk. */
  FILE_MISSING: 'STORE_FILE_MISSING',
  /** A file on disk that the manifest does not list (something wrote into a published checkpoint). */
  FILE_UNEXPECTED: 'STORE_FILE_UNEXPECTED',
  /** A checkpoint directory not 0700, a file not 0600, or either not owned by the expected uid (root). */
  INSECURE_PERMISSIONS: 'STORE_INSECURE_PERMISSIONS',
  /** A path that would leave the store: a symlink, a device node, or a manifest path with `..` or `/`. */
  PATH_ESCAPE: 'STORE_PATH_ESCAPE',
  /** delete() (or replace) of a checkpoint that a lease holds: a restore is reading it. */
  IN_USE: 'STORE_IN_USE',
  /**
   * A checkpoint (written or pulled) does not fit: its declared or expected size over what the store's quota,
   * its namespace's quota or the filesystem's free space leaves once every least recently used checkpoint no
   * restore uses is collected. Refused before anything of it is written.
   */
  NO_ROOM: 'STORE_NO_ROOM',
  /** The caller's AbortSignal fired. */
  ABORTED: 'STORE_ABORTED',
  /** A PendingCheckpoint used after publish() or abort(). */
  BAD_STATE: 'STORE_BAD_STATE',
  /** A filesystem call failed for a reason not covered above (cause: the Node error with its errno). */
  IO: 'STORE_IO',
} as const;
export type StoreErrorCode = (typeof StoreErrorCode)[keyof typeof StoreErrorCode];

export class StoreError extends ThawError {
  declare readonly code: StoreErrorCode;

  constructor(
    code: StoreErrorCode,
    message: string,
    options: { step: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    super(code, message, options);
    this.name = 'StoreError';
  }
}

/** Throws STORE_ABORTED when `signal` has fired; called between units of work (files, chunks). */
export function throwIfAborted(signal: AbortSignal | undefined, step: string): void {
  checkAborted(signal, storeAborted(step));
}

/** STORE_IO for a filesystem call that failed, with its errno in the evidence. */
export function ioError(step: string, what: string, err: unknown): StoreError {
  return new StoreError(StoreErrorCode.IO, `${what}: ${(err as Error).message}`, {
    step,
    cause: err,
    evidence: { errno: (err as NodeJS.ErrnoException).code },
  });
}

/** The STORE_ABORTED error of an abort at `step` (forEachLimit's and prefetchFiles' `aborted`). */
export function storeAborted(step: string): (cause: unknown) => StoreError {
  return (cause) => new StoreError(StoreErrorCode.ABORTED, 'aborted by the caller', { step, cause });
}
