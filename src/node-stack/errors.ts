import { ThawError } from '../errors.js';

/**
 * Error codes of the private node stack (provisioning and the test/demo harness). Stable: tests and
 * scripts match on them.
 */
export const StackErrorCode = {
  /** apt-get, dpkg, patchelf or a version check failed while building a stack prefix. */
  PROVISION_FAILED: 'STACK_PROVISION_FAILED',
  /** A provisioned binary does not work here (`criu check` is not "Looks good", `runc --version` fails). */
  CHECK_FAILED: 'STACK_CHECK_FAILED',
  /** The prefix is missing or incomplete: run `npm run setup` (scripts/setup.sh). */
  NOT_PROVISIONED: 'STACK_NOT_PROVISIONED',
  /** An option has a value we cannot use (unknown flavor, socket path too long, ...). */
  INVALID_OPTION: 'STACK_INVALID_OPTION',
  /** containerd did not answer the CRI Version call within startTimeoutMs. */
  START_TIMEOUT: 'STACK_START_TIMEOUT',
  /** The test registry (docker-registry) exited at start or did not answer within its start timeout. */
  REGISTRY_START_FAILED: 'STACK_REGISTRY_START_FAILED',
  /** containerd exited while we waited for it. */
  CONTAINERD_EXITED: 'STACK_CONTAINERD_EXITED',
  /** A CRI call failed (gRPC status in evidence). */
  CRI_CALL_FAILED: 'STACK_CRI_CALL_FAILED',
  /** Building or importing an OCI image failed. */
  IMAGE_FAILED: 'STACK_IMAGE_FAILED',
  /** stop()/cleanup could not remove everything (what is left is in evidence). */
  CLEANUP_FAILED: 'STACK_CLEANUP_FAILED',
  /** The caller's AbortSignal fired. */
  ABORTED: 'STACK_ABORTED',
  /** A command ran past its timeout. */
  COMMAND_TIMEOUT: 'STACK_COMMAND_TIMEOUT',
} as const;

export type StackErrorCode = (typeof StackErrorCode)[keyof typeof StackErrorCode];

export class StackError extends ThawError {
  constructor(
    code: StackErrorCode,
    message: string,
    options: { step: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    super(code, message, options);
    this.name = 'StackError';
  }
}
