/**
 * The base of every error thaw raises on purpose.
 *
 * `code` is stable (callers, tests, metrics and the control API match on it, never on the message);
 * `step` names what thaw was doing when it failed ("register with NRI", "criu restore", "apply rootfs diff");
 * `evidence` carries what a human needs to see why: CRIU's log lines, a CUresult, a hook's stderr, the bytes
 * of a frame. Each layer defines its own codes next to its code (e.g. `src/nri-plugin/errors.ts`), all with a
 * prefix naming the layer (`NRI_`, `TTRPC_`, `MUX_`, `CRIU_`, `STACK_`, ...).
 */
export class ThawError extends Error {
  readonly code: string;
  readonly step: string;
  readonly evidence: Readonly<Record<string, unknown>>;

  constructor(
    code: string,
    message: string,
    options: { step: string; cause?: unknown; evidence?: Record<string, unknown> },
  ) {
    super(`${options.step}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'ThawError';
    this.code = code;
    this.step = options.step;
    this.evidence = Object.freeze({ ...(options.evidence ?? {}) });
  }

  /** A plain object for JSON logs and the control API: code, step, message, evidence, and the cause's message. */
  toJSON(): Record<string, unknown> {
    const cause = this.cause instanceof Error ? this.cause.message : this.cause;
    return { code: this.code, step: this.step, message: this.message, evidence: this.evidence, cause };
  }
}

/** True when `err` is a ThawError with the given code (or any ThawError when `code` is omitted). */
export function isThawError(err: unknown, code?: string): err is ThawError {
  return err instanceof ThawError && (code === undefined || err.code === code);
}

/** The message of anything thrown, for log lines. */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
