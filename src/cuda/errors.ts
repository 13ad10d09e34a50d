import { ThawError } from '../errors.js';

/**
 * Stable codes of thaw's CUDA layer (libcuda and NVML through koffi). Callers (the restore engine, the
 * control API, metrics) match on these, never on messages.
 *
 * "Unavailable" codes are conditions, not bugs: a node without a GPU or driver gets them from
 * `tryLoadCuda`/`tryLoadNvml`, and the engine then treats the worker as CPU-only.
 */
export const CudaErrorCode = {
  /** libcuda.so.1 could not be loaded, lacks the checkpoint API (driver < r570), or cuInit failed. */
  UNAVAILABLE: 'CUDA_UNAVAILABLE',
  /** A driver call returned a CUresult other than CUDA_SUCCESS; evidence has its number, name, text and the pid. */
  CALL_FAILED: 'CUDA_CALL_FAILED',
  /** An argument thaw was given cannot be passed to the driver (a malformed GPU UUID, a bad pid, ...). */
  INVALID_ARGUMENT: 'CUDA_INVALID_ARGUMENT',
  /** The caller's AbortSignal fired between two driver calls (a call in progress cannot be interrupted). */
  ABORTED: 'CUDA_ABORTED',
  /** libnvidia-ml.so.1 could not be loaded or nvmlInit_v2 failed. */
  NVML_UNAVAILABLE: 'NVML_UNAVAILABLE',
  /** An NVML call returned an nvmlReturn_t other than NVML_SUCCESS; evidence has its number and text. */
  NVML_CALL_FAILED: 'NVML_CALL_FAILED',
} as const;
export type CudaErrorCode = (typeof CudaErrorCode)[keyof typeof CudaErrorCode];

export class CudaError extends ThawError {
  declare readonly code: CudaErrorCode;
  /** The CUresult (or nvmlReturn_t for NVML_*) the failing call returned, when a call failed. */
  readonly result: number | undefined;
  /** Its name from cuGetErrorName ("CUDA_ERROR_TIMEOUT"), or NVML's error string. */
  readonly resultName: string | undefined;
  /** The process the call was about, for the checkpoint API. */
  readonly pid: number | undefined;

  constructor(
    code: CudaErrorCode,
    message: string,
    options: {
      step: string;
      cause?: unknown;
      evidence?: Record<string, unknown>;
      result?: number;
      resultName?: string;
      pid?: number;
    },
  ) {
    const evidence: Record<string, unknown> = { ...options.evidence };
    if (options.result !== undefined) evidence['result'] = options.result;
    if (options.resultName !== undefined) evidence['resultName'] = options.resultName;
    if (options.pid !== undefined) evidence['pid'] = options.pid;
    super(code, message, { step: options.step, cause: options.cause, evidence });
    this.name = 'CudaError';
    this.result = options.result;
    this.resultName = options.resultName;
    this.pid = options.pid;
  }
}

/** True when `err` is a CudaError from a driver call that returned `resultName` (e.g. "CUDA_ERROR_TIMEOUT"). */
export function isCudaResult(err: unknown, resultName: string): err is CudaError {
  return err instanceof CudaError && err.resultName === resultName;
}
