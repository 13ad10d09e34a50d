/**
 * The CUDA driver (libcuda.so.1) through koffi: device queries and the checkpoint API
 * (`cuCheckpointProcess*`, CUDA 12.8+ / driver r570+, GPU remapping on restore since CUDA 13.0 / r580).
 *
 * One CudaDriver per long-running process (the agent): it is loaded and `cuInit`-ed once, and every
 * checkpoint action is a function call on it. No process is spawned per action (Dynamo's per-action
 * `cuda-checkpoint` execs cost it seconds per restore; NVCF measured ~2.7 s of cuInit per exec).
 *
 * The object is the caller's: nothing here is a module-level handle. Tests load the fake driver
 * (native/fake-libcuda) through this same code by passing its path; in production the dynamic loader
 * finds the real one by soname.
 *
 * Blocking: lock, checkpoint, restore and unlock take seconds on a real worker (18.5 GiB checkpointed in
 * 14.7 s on the H100, reference/gpu-baseline.md), so they run through koffi's `.async` on a libuv
 * threadpool thread, never on the event loop. Each call in flight holds one of those threads
 * (UV_THREADPOOL_SIZE, 4 by default, shared with fs and the CRIU socket waits). Device and state queries
 * are microseconds and stay synchronous. A driver call cannot be interrupted: a timeout exists only for
 * lock (the driver's own `timeoutMs`).
 */
import koffi from 'koffi';

import { CudaError, CudaErrorCode } from './errors.js';

/** The soname the dynamic loader resolves (the NVIDIA driver installs it; the toolkit is not needed). */
export const LIBCUDA_SONAME = 'libcuda.so.1';

export const CUDA_SUCCESS = 0;

/**
 * CUresult numbers thaw names itself, from cuda.h's `enum cudaError_enum` (CUDA 13.0 driver API reference;
 * the same numbers since they were introduced). The message of a failed call uses cuGetErrorName; these are
 * for code that must recognise a result, and for naming one when cuGetErrorName itself fails.
 */
export const CUresult = {
  CUDA_ERROR_INVALID_VALUE: 1,
  CUDA_ERROR_OUT_OF_MEMORY: 2,
  CUDA_ERROR_NOT_INITIALIZED: 3,
  CUDA_ERROR_NO_DEVICE: 100,
  CUDA_ERROR_INVALID_DEVICE: 101,
  CUDA_ERROR_INVALID_HANDLE: 400,
  CUDA_ERROR_ILLEGAL_STATE: 401,
  CUDA_ERROR_NOT_FOUND: 500,
  CUDA_ERROR_NOT_PERMITTED: 800,
  CUDA_ERROR_NOT_SUPPORTED: 801,
  CUDA_ERROR_TIMEOUT: 909,
  CUDA_ERROR_UNKNOWN: 999,
} as const;

/**
 * CUprocessState (cuda.h, CUDA 12.8+): RUNNING=0, LOCKED=1, CHECKPOINTED=2, FAILED=3. Newer headers
 * (cuda-python's generated bindings) add CHECKPOINTING=4 and RESTORING=5, seen only while an operation runs.
 */
export const CUprocessState = {
  RUNNING: 0,
  LOCKED: 1,
  CHECKPOINTED: 2,
  FAILED: 3,
  CHECKPOINTING: 4,
  RESTORING: 5,
} as const;

// ---- Struct layouts of the checkpoint API's arguments (x86-64 / aarch64 LP64, natural alignment). ----
// Each is 64 bytes in every published version; reserved fields "must be zeroed" (the driver docs), which
// koffi does for members the JS object leaves out. The fake driver rejects non-zero reserved bytes, so the
// unit tests check these layouts.

/**
 * CUcheckpointLockArgs (CUDA 12.8+ driver API reference, struct CUcheckpointLockArgs):
 * `unsigned int timeoutMs` @0 (0 = no timeout), `unsigned int reserved0` @4, `cuuint64_t reserved1[7]` @8.
 */
const LockArgs = koffi.struct({
  timeoutMs: 'uint32_t',
  reserved0: 'uint32_t',
  reserved1: koffi.array('uint64_t', 7),
});

/**
 * CUcheckpointCheckpointArgs and CUcheckpointUnlockArgs (CUDA 12.8+): `cuuint64_t reserved[8]`. CUDA 13.4
 * turns the first 8 bytes of the checkpoint args into `customStorageInfo_out`, NULL meaning "to host
 * memory", so all-zero keeps the 12.8 behaviour on every version.
 */
const ReservedArgs = koffi.struct({ reserved: koffi.array('uint64_t', 8) });

/** CUcheckpointGpuPair (CUDA 13.0+): `CUuuid oldUuid` @0, `CUuuid newUuid` @16; CUuuid is `char bytes[16]`. */
const GpuPair = koffi.struct({
  oldUuid: koffi.array('uint8_t', 16),
  newUuid: koffi.array('uint8_t', 16),
});

/**
 * CUcheckpointRestoreArgs, CUDA 13.0 layout (driver API reference 13.0, struct CUcheckpointRestoreArgs):
 * `CUcheckpointGpuPair *gpuPairs` @0, `unsigned int gpuPairsCount` @8,
 * `char reserved[52 - sizeof(CUcheckpointGpuPair *)]` @12 (44 bytes), `cuuint64_t reserved1` @56.
 * 13.3 merges the reserved parts (`reserved[64 - sizeof(ptr) - sizeof(unsigned)]`); 13.4 adds
 * `unsigned padding0` @12 and `customStorageInfo_out` @16 (NULL: restore from host memory). Pointer and
 * count keep their offsets in all of them, and zero elsewhere means the same thing, so this one layout
 * works on 13.0 through 13.4. A driver before 13.0 (r570/r575) has only `reserved[8]` and rejects pairs.
 */
const RestoreArgs = koffi.struct({
  gpuPairs: koffi.pointer(GpuPair),
  gpuPairsCount: 'uint32_t',
  reserved: koffi.array('uint8_t', 44),
  reserved1: 'uint64_t',
});

/** The struct sizes, for tests that pin the layouts (all 64, GpuPair 32). */
export const CHECKPOINT_STRUCT_SIZES = Object.freeze({
  CUcheckpointLockArgs: koffi.sizeof(LockArgs),
  CUcheckpointCheckpointArgs: koffi.sizeof(ReservedArgs),
  CUcheckpointUnlockArgs: koffi.sizeof(ReservedArgs),
  CUcheckpointGpuPair: koffi.sizeof(GpuPair),
  CUcheckpointRestoreArgs: koffi.sizeof(RestoreArgs),
  restoreGpuPairsCountOffset: koffi.offsetof(RestoreArgs, 'gpuPairsCount'),
  restoreReserved1Offset: koffi.offsetof(RestoreArgs, 'reserved1'),
});

/** A GPU remapping for restore, as raw CUuuid bytes (16 each). */
export interface GpuUuidPair {
  oldUuid: Uint8Array;
  newUuid: Uint8Array;
}

export interface LoadCudaOptions {
  /** The library to load; default LIBCUDA_SONAME, found by the dynamic loader. Tests pass the fake's path. */
  path?: string;
}

export type CudaLoadResult =
  | { ok: true; driver: CudaDriver }
  | { ok: false; reason: string; error: CudaError };

type Fn = koffi.KoffiFunction;

/** The bound entry points. Only the checkpoint calls that block run through `.async`. */
export interface CudaBindings {
  cuInit: Fn;
  cuDriverGetVersion: Fn;
  cuGetErrorName: Fn;
  cuGetErrorString: Fn;
  cuDeviceGetCount: Fn;
  cuDeviceGet: Fn;
  cuDeviceGetName: Fn;
  cuDeviceGetUuid: Fn;
  cuDeviceTotalMem: Fn;
  cuCheckpointProcessGetState: Fn;
  cuCheckpointProcessGetRestoreThreadId: Fn;
  cuCheckpointProcessLock: Fn;
  cuCheckpointProcessCheckpoint: Fn;
  cuCheckpointProcessRestore: Fn;
  cuCheckpointProcessUnlock: Fn;
}

const CHECKPOINT_SYMBOLS = [
  'cuCheckpointProcessGetState',
  'cuCheckpointProcessGetRestoreThreadId',
  'cuCheckpointProcessLock',
  'cuCheckpointProcessCheckpoint',
  'cuCheckpointProcessRestore',
  'cuCheckpointProcessUnlock',
] as const;

function bind(lib: koffi.IKoffiLib): CudaBindings {
  const intOut = koffi.out(koffi.pointer('int'));
  const strOut = koffi.out(koffi.pointer('const char *'));
  const sizeOut = koffi.out(koffi.pointer('size_t'));
  // v2 where the header maps the name to it: cuDeviceGetUuid_v2 (CUDA 11.4+), cuDeviceTotalMem_v2 (3.2+).
  const uuidFn = (() => {
    try {
      return lib.func('cuDeviceGetUuid_v2', 'int', ['void *', 'int']);
    } catch {
      return lib.func('cuDeviceGetUuid', 'int', ['void *', 'int']);
    }
  })();
  return {
    cuInit: lib.func('cuInit', 'int', ['uint32_t']),
    cuDriverGetVersion: lib.func('cuDriverGetVersion', 'int', [intOut]),
    cuGetErrorName: lib.func('cuGetErrorName', 'int', ['int', strOut]),
    cuGetErrorString: lib.func('cuGetErrorString', 'int', ['int', strOut]),
    cuDeviceGetCount: lib.func('cuDeviceGetCount', 'int', [intOut]),
    cuDeviceGet: lib.func('cuDeviceGet', 'int', [intOut, 'int']),
    cuDeviceGetName: lib.func('cuDeviceGetName', 'int', ['void *', 'int', 'int']),
    cuDeviceGetUuid: uuidFn,
    cuDeviceTotalMem: lib.func('cuDeviceTotalMem_v2', 'int', [sizeOut, 'int']),
    // CUprocessState is a C enum: int-sized.
    cuCheckpointProcessGetState: lib.func('cuCheckpointProcessGetState', 'int', ['int', intOut]),
    cuCheckpointProcessGetRestoreThreadId: lib.func('cuCheckpointProcessGetRestoreThreadId', 'int', ['int', intOut]),
    cuCheckpointProcessLock: lib.func('cuCheckpointProcessLock', 'int', ['int', koffi.pointer(LockArgs)]),
    cuCheckpointProcessCheckpoint: lib.func('cuCheckpointProcessCheckpoint', 'int', ['int', koffi.pointer(ReservedArgs)]),
    cuCheckpointProcessRestore: lib.func('cuCheckpointProcessRestore', 'int', ['int', koffi.pointer(RestoreArgs)]),
    cuCheckpointProcessUnlock: lib.func('cuCheckpointProcessUnlock', 'int', ['int', koffi.pointer(ReservedArgs)]),
  };
}

function unavailable(reason: string, extra: { cause?: unknown; result?: number; resultName?: string; path: string }): CudaLoadResult {
  const error = new CudaError(CudaErrorCode.UNAVAILABLE, reason, {
    step: 'load libcuda',
    cause: extra.cause,
    evidence: { path: extra.path },
    ...(extra.result !== undefined ? { result: extra.result } : {}),
    ...(extra.resultName !== undefined ? { resultName: extra.resultName } : {}),
  });
  return { ok: false, reason, error };
}

/**
 * Loads libcuda, checks that it has the checkpoint API, and calls `cuInit(0)`. A node without the driver
 * or without a GPU is an expected condition: `{ok: false, reason, error}` with code CUDA_UNAVAILABLE
 * (never a throw), and the engine treats its workers as CPU-only.
 */
export function tryLoadCuda(options: LoadCudaOptions = {}): CudaLoadResult {
  const path = options.path ?? LIBCUDA_SONAME;
  let lib: koffi.IKoffiLib;
  try {
    lib = koffi.load(path);
  } catch (err) {
    return unavailable(`cannot load ${path} (no NVIDIA driver on this node?): ${(err as Error).message}`, { cause: err, path });
  }
  let fns: CudaBindings;
  try {
    fns = bind(lib);
  } catch (err) {
    const missing = CHECKPOINT_SYMBOLS.some((s) => (err as Error).message.includes(s));
    const why = missing
      ? 'the driver has no checkpoint API (cuCheckpointProcess* needs driver r570+ / CUDA 12.8+)'
      : 'a required entry point is missing';
    return unavailable(`${path}: ${why}: ${(err as Error).message}`, { cause: err, path });
  }
  const result = fns.cuInit(0) as number;
  if (result !== CUDA_SUCCESS) {
    const name = errorNameOf(fns, result);
    return unavailable(`cuInit(0) returned ${result} ${name} (${errorStringOf(fns, result)})`, { result, resultName: name, path });
  }
  const version = [0];
  const vr = fns.cuDriverGetVersion(version) as number;
  if (vr !== CUDA_SUCCESS) {
    const name = errorNameOf(fns, vr);
    return unavailable(`cuDriverGetVersion returned ${vr} ${name}`, { result: vr, resultName: name, path });
  }
  return { ok: true, driver: new CudaDriver(path, fns, version[0] ?? 0) };
}

/** tryLoadCuda for callers that need the driver: throws its CUDA_UNAVAILABLE error. */
export function loadCuda(options: LoadCudaOptions = {}): CudaDriver {
  const loaded = tryLoadCuda(options);
  if (!loaded.ok) throw loaded.error;
  return loaded.driver;
}

function errorNameOf(fns: CudaBindings, result: number): string {
  const out: Array<string | null> = [null];
  const r = fns.cuGetErrorName(result, out) as number;
  return r === CUDA_SUCCESS && out[0] ? out[0] : `CUresult(${result})`;
}

function errorStringOf(fns: CudaBindings, result: number): string {
  const out: Array<string | null> = [null];
  const r = fns.cuGetErrorString(result, out) as number;
  return r === CUDA_SUCCESS && out[0] ? out[0] : 'unknown CUresult';
}

function checkPid(pid: number, step: string): void {
  if (!Number.isInteger(pid) || pid <= 0 || pid > 0x7fffffff) {
    throw new CudaError(CudaErrorCode.INVALID_ARGUMENT, `pid must be a positive 32-bit integer, got ${pid}`, { step });
  }
}

function checkUuid(bytes: Uint8Array, what: string, step: string): number[] {
  if (bytes.length !== 16) {
    throw new CudaError(CudaErrorCode.INVALID_ARGUMENT, `${what} must be 16 bytes (a CUuuid), got ${bytes.length}`, { step });
  }
  return Array.from(bytes);
}

/**
 * The loaded, initialised driver. Every failing call throws CudaError CUDA_CALL_FAILED with the CUresult
 * number and name (cuGetErrorName), the driver's text, the step ("lock pid 1234") and the pid.
 */
export class CudaDriver {
  /** What was loaded (the soname or the path given). */
  readonly path: string;
  /** cuDriverGetVersion: the CUDA API version the driver supports, 1000 × major + 10 × minor (13000 = 13.0). */
  readonly driverVersion: number;
  readonly #fns: CudaBindings;

  /** @internal Use tryLoadCuda/loadCuda. */
  constructor(path: string, fns: CudaBindings, driverVersion: number) {
    this.path = path;
    this.#fns = fns;
    this.driverVersion = driverVersion;
  }

  /** cuGetErrorName, e.g. "CUDA_ERROR_TIMEOUT"; `CUresult(n)` for a number the driver does not know. */
  errorName(result: number): string {
    return errorNameOf(this.#fns, result);
  }

  /** cuGetErrorString, e.g. "the wait operation has timed out". */
  errorString(result: number): string {
    return errorStringOf(this.#fns, result);
  }

  #check(result: number, step: string, pid?: number): void {
    if (result === CUDA_SUCCESS) return;
    const name = this.errorName(result);
    const text = this.errorString(result);
    throw new CudaError(CudaErrorCode.CALL_FAILED, `${name} (${result}): ${text}`, {
      step,
      result,
      resultName: name,
      evidence: { text },
      ...(pid !== undefined ? { pid } : {}),
    });
  }

  /** Runs a blocking checkpoint call on the threadpool; resolves when the driver returned CUDA_SUCCESS. */
  #callAsync(fn: Fn, step: string, pid: number, args: unknown): Promise<void> {
    return new Promise((resolve, reject) => {
      fn.async(pid, args, (err: unknown, result: number) => {
        if (err) {
          reject(new CudaError(CudaErrorCode.CALL_FAILED, `koffi call failed: ${(err as Error).message}`, { step, pid, cause: err }));
          return;
        }
        try {
          this.#check(result, step, pid);
          resolve();
        } catch (checkErr) {
          reject(checkErr);
        }
      });
    });
  }

  deviceCount(): number {
    const out = [0];
    this.#check(this.#fns.cuDeviceGetCount(out) as number, 'count devices');
    return out[0] ?? 0;
  }

  /** cuDeviceGet: the CUdevice of an ordinal (0..deviceCount-1). */
  device(ordinal: number): number {
    const out = [0];
    this.#check(this.#fns.cuDeviceGet(out, ordinal) as number, `get device ${ordinal}`);
    return out[0] ?? 0;
  }

  deviceName(device: number): string {
    const buf = Buffer.alloc(256);
    this.#check(this.#fns.cuDeviceGetName(buf, buf.length, device) as number, `name of device ${device}`);
    const end = buf.indexOf(0);
    return buf.subarray(0, end < 0 ? buf.length : end).toString('utf8');
  }

  /** cuDeviceGetUuid(_v2): the 16 bytes of the GPU's UUID (formatGpuUuid gives NVML's "GPU-…" form). */
  deviceUuid(device: number): Uint8Array {
    const buf = Buffer.alloc(16);
    this.#check(this.#fns.cuDeviceGetUuid(buf, device) as number, `uuid of device ${device}`);
    return new Uint8Array(buf);
  }

  deviceTotalMemBytes(device: number): number {
    const out: Array<number | bigint> = [0];
    this.#check(this.#fns.cuDeviceTotalMem(out, device) as number, `total memory of device ${device}`);
    return Number(out[0] ?? 0);
  }

  /** cuCheckpointProcessGetState: a CUprocessState number. */
  checkpointGetState(pid: number): number {
    const step = `get checkpoint state of pid ${pid}`;
    checkPid(pid, step);
    const out = [0];
    this.#check(this.#fns.cuCheckpointProcessGetState(pid, out) as number, step, pid);
    return out[0] ?? 0;
  }

  /** cuCheckpointProcessGetRestoreThreadId: the tid of the driver's restore thread in that process. */
  checkpointGetRestoreThreadId(pid: number): number {
    const step = `get restore thread of pid ${pid}`;
    checkPid(pid, step);
    const out = [0];
    this.#check(this.#fns.cuCheckpointProcessGetRestoreThreadId(pid, out) as number, step, pid);
    return out[0] ?? 0;
  }

  /**
   * cuCheckpointProcessLock: blocks further CUDA calls of the process (RUNNING → LOCKED). With `timeoutMs`
   * > 0 the driver gives up after that long (CUDA_ERROR_TIMEOUT) and leaves the process RUNNING; 0 waits
   * without limit.
   */
  checkpointLock(pid: number, timeoutMs: number): Promise<void> {
    const step = `lock pid ${pid}`;
    checkPid(pid, step);
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 0xffffffff) {
      return Promise.reject(
        new CudaError(CudaErrorCode.INVALID_ARGUMENT, `timeoutMs must be an unsigned 32-bit integer, got ${timeoutMs}`, { step, pid }),
      );
    }
    return this.#callAsync(this.#fns.cuCheckpointProcessLock, step, pid, { timeoutMs });
  }

  /** cuCheckpointProcessCheckpoint: GPU memory to driver-managed host memory, GPU released (LOCKED → CHECKPOINTED). */
  checkpointCheckpoint(pid: number): Promise<void> {
    const step = `checkpoint pid ${pid}`;
    checkPid(pid, step);
    return this.#callAsync(this.#fns.cuCheckpointProcessCheckpoint, step, pid, {});
  }

  /**
   * cuCheckpointProcessRestore (CHECKPOINTED → LOCKED). `gpuPairs` remaps GPUs (CUDA 13.0+); when given it
   * must name every checkpointed GPU. Empty or absent: restore onto the same GPUs.
   */
  checkpointRestore(pid: number, gpuPairs: readonly GpuUuidPair[] = []): Promise<void> {
    const step = `restore pid ${pid}`;
    try {
      checkPid(pid, step);
      const pairs = gpuPairs.map((p) => ({
        oldUuid: checkUuid(p.oldUuid, 'oldUuid', step),
        newUuid: checkUuid(p.newUuid, 'newUuid', step),
      }));
      const args = pairs.length > 0 ? { gpuPairs: pairs, gpuPairsCount: pairs.length } : {};
      return this.#callAsync(this.#fns.cuCheckpointProcessRestore, step, pid, args);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** cuCheckpointProcessUnlock: lets the process make CUDA calls again (LOCKED → RUNNING). */
  checkpointUnlock(pid: number): Promise<void> {
    const step = `unlock pid ${pid}`;
    checkPid(pid, step);
    return this.#callAsync(this.#fns.cuCheckpointProcessUnlock, step, pid, {});
  }
}

/** NVML's and nvidia-smi's form of a GPU UUID: "GPU-" + 8-4-4-4-12 lowercase hex of the 16 CUuuid bytes. */
export function formatGpuUuid(bytes: Uint8Array): string {
  const hex = Buffer.from(bytes).toString('hex');
  return `GPU-${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Parses "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (the "GPU-" prefix and dashes optional) into 16 bytes. */
export function parseGpuUuid(text: string): Uint8Array {
  const hex = text.replace(/^GPU-/i, '').replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) {
    throw new CudaError(CudaErrorCode.INVALID_ARGUMENT, `not a GPU UUID: ${JSON.stringify(text)}`, { step: 'parse GPU UUID' });
  }
  return new Uint8Array(Buffer.from(hex, 'hex'));
}
