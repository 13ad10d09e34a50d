import { ThawError } from '../errors.js';

/**
 * Error codes of the worker SDK (`SDK_*`, raised inside the worker) and of the agent-side control
 * directory (`CONTROL_DIR_*`). Stable: callers and tests match on them.
 */
export const SDK_ERROR_CODES = {
  /** wait()/checkpointAndWait() saw no outcome marker within timeoutMs. */
  WAIT_TIMEOUT: 'SDK_WAIT_TIMEOUT',
  /** The caller's AbortSignal fired while waiting. */
  ABORTED: 'SDK_ABORTED',
  /** Writing ready-for-checkpoint failed (evidence: path, errno code). */
  WRITE_FAILED: 'SDK_WRITE_FAILED',
  /** A payload is not a JSON object, or a marker file holds something that is not one. */
  INVALID_PAYLOAD: 'SDK_INVALID_PAYLOAD',
} as const;

export const CONTROL_DIR_ERROR_CODES = {
  /** A container id that is empty, too long, or could leave the control root (`/`, `..`, NUL, ...). */
  INVALID_ID: 'CONTROL_DIR_INVALID_ID',
  /** mkdir/chmod/chown of the control directory failed, or the path exists and is not a plain directory. */
  CREATE_FAILED: 'CONTROL_DIR_CREATE_FAILED',
  /** The worker wrote no ready marker within timeoutMs. */
  WAIT_TIMEOUT: 'CONTROL_DIR_WAIT_TIMEOUT',
  /** The caller's AbortSignal fired while waiting. */
  ABORTED: 'CONTROL_DIR_ABORTED',
  /** writeMarker was given a name the agent does not write. */
  INVALID_MARKER: 'CONTROL_DIR_INVALID_MARKER',
  /** Writing a marker failed. */
  WRITE_FAILED: 'CONTROL_DIR_WRITE_FAILED',
  /** Removing the control directory failed. */
  REMOVE_FAILED: 'CONTROL_DIR_REMOVE_FAILED',
  /** A marker holds something that is not a JSON object. */
  INVALID_PAYLOAD: 'CONTROL_DIR_INVALID_PAYLOAD',
  /**
   * An entry of a control directory that is not a plain marker: a symlink, FIFO, device, directory or
   * socket, a file with more than one hard link, a file above the size cap, or a name that is not one
   * path component. The directory is shared with the pod, so such an entry is refused, never followed.
   */
  UNSAFE_ENTRY: 'CONTROL_DIR_UNSAFE_ENTRY',
} as const;

export type SdkErrorCode =
  | (typeof SDK_ERROR_CODES)[keyof typeof SDK_ERROR_CODES]
  | (typeof CONTROL_DIR_ERROR_CODES)[keyof typeof CONTROL_DIR_ERROR_CODES];

export class SdkError extends ThawError {
  constructor(
    code: SdkErrorCode,
    message: string,
    options: { step: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    super(code, message, options);
    this.name = 'SdkError';
  }
}
