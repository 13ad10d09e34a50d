/**
 * NVML (libnvidia-ml.so.1) through koffi: the node's driver version, its GPUs, and which processes use
 * how much GPU memory (to tell which pids of a container hold GPU state, and how big a checkpoint's GPU
 * part will be). Like CudaDriver, an Nvml is an object the caller owns; tests load the fake
 * (native/fake-libcuda/build/libnvidia-ml.so.1) through this same code. All calls are fast and synchronous.
 */
import koffi from 'koffi';

import { CudaError, CudaErrorCode } from './errors.js';

export const LIBNVML_SONAME = 'libnvidia-ml.so.1';
const NVML_SUCCESS = 0;
/** nvmlReturn_t NVML_ERROR_INSUFFICIENT_SIZE (nvml.h): the buffer was too small; the count says how many. */
const NVML_ERROR_INSUFFICIENT_SIZE = 7;
/** NVML_DEVICE_NAME_V2_BUFFER_SIZE / NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE / NVML_DEVICE_UUID_V2_BUFFER_SIZE are 96, 80, 96. */
const STRING_BUFFER_BYTES = 96;
/** nvmlMemory_t (v1, nvml.h): {unsigned long long total, free, used} = 24 bytes. */
const MEMORY_BYTES = 24;
/**
 * nvmlProcessInfo_t as nvmlDeviceGetComputeRunningProcesses_v3 fills it (nvml.h, same layout as v2):
 * `unsigned int pid` @0, `unsigned long long usedGpuMemory` @8 (after 4 bytes of alignment padding),
 * `unsigned int gpuInstanceId` @16, `unsigned int computeInstanceId` @20 = 24 bytes.
 */
const PROCESS_INFO_BYTES = 24;
/** NVML reports usedGpuMemory as this when it cannot tell (NVML_VALUE_NOT_AVAILABLE, (unsigned long long)-1). */
const NVML_VALUE_NOT_AVAILABLE = 0xffffffffffffffffn;
/** A process list can grow between the sizing call and the filling call; retried this many times. */
const PROCESS_LIST_ATTEMPTS = 3;

/** An nvmlDevice_t: opaque to thaw. */
export type NvmlDevice = unknown;

export interface NvmlMemoryInfo {
  totalBytes: number;
  freeBytes: number;
  usedBytes: number;
}

export interface NvmlProcess {
  pid: number;
  /** undefined where NVML cannot tell (NVML_VALUE_NOT_AVAILABLE). */
  usedGpuMemoryBytes: number | undefined;
  /** 0xFFFFFFFF when MIG is off. */
  gpuInstanceId: number;
  computeInstanceId: number;
}

export type NvmlLoadResult = { ok: true; nvml: Nvml } | { ok: false; reason: string; error: CudaError };

type Fn = koffi.KoffiFunction;

export interface NvmlBindings {
  nvmlInit_v2: Fn;
  nvmlShutdown: Fn;
  nvmlErrorString: Fn;
  nvmlSystemGetDriverVersion: Fn;
  nvmlDeviceGetCount_v2: Fn;
  nvmlDeviceGetHandleByIndex_v2: Fn;
  nvmlDeviceGetName: Fn;
  nvmlDeviceGetUUID: Fn;
  nvmlDeviceGetMemoryInfo: Fn;
  nvmlDeviceGetComputeRunningProcesses_v3: Fn;
}

function bind(lib: koffi.IKoffiLib): NvmlBindings {
  const device = koffi.pointer(koffi.opaque());
  return {
    nvmlInit_v2: lib.func('nvmlInit_v2', 'int', []),
    nvmlShutdown: lib.func('nvmlShutdown', 'int', []),
    nvmlErrorString: lib.func('nvmlErrorString', 'const char *', ['int']),
    nvmlSystemGetDriverVersion: lib.func('nvmlSystemGetDriverVersion', 'int', ['void *', 'uint32_t']),
    nvmlDeviceGetCount_v2: lib.func('nvmlDeviceGetCount_v2', 'int', [koffi.out(koffi.pointer('uint32_t'))]),
    nvmlDeviceGetHandleByIndex_v2: lib.func('nvmlDeviceGetHandleByIndex_v2', 'int', ['uint32_t', koffi.out(koffi.pointer(device))]),
    nvmlDeviceGetName: lib.func('nvmlDeviceGetName', 'int', [device, 'void *', 'uint32_t']),
    nvmlDeviceGetUUID: lib.func('nvmlDeviceGetUUID', 'int', [device, 'void *', 'uint32_t']),
    nvmlDeviceGetMemoryInfo: lib.func('nvmlDeviceGetMemoryInfo', 'int', [device, 'void *']),
    nvmlDeviceGetComputeRunningProcesses_v3: lib.func('nvmlDeviceGetComputeRunningProcesses_v3', 'int', [
      device,
      koffi.inout(koffi.pointer('uint32_t')),
      'void *',
    ]),
  };
}

function unavailable(reason: string, path: string, extra: { cause?: unknown; result?: number; resultName?: string } = {}): NvmlLoadResult {
  const error = new CudaError(CudaErrorCode.NVML_UNAVAILABLE, reason, {
    step: 'load NVML',
    cause: extra.cause,
    evidence: { path },
    ...(extra.result !== undefined ? { result: extra.result } : {}),
    ...(extra.resultName !== undefined ? { resultName: extra.resultName } : {}),
  });
  return { ok: false, reason, error };
}

/** Loads NVML and calls nvmlInit_v2. No NVML (no driver) is `{ok: false}` with NVML_UNAVAILABLE, never a throw. */
export function tryLoadNvml(options: { path?: string } = {}): NvmlLoadResult {
  const path = options.path ?? LIBNVML_SONAME;
  let lib: koffi.IKoffiLib;
  try {
    lib = koffi.load(path);
  } catch (err) {
    return unavailable(`cannot load ${path} (no NVIDIA driver on this node?): ${(err as Error).message}`, path, { cause: err });
  }
  let fns: NvmlBindings;
  try {
    fns = bind(lib);
  } catch (err) {
    return unavailable(`${path}: a required entry point is missing: ${(err as Error).message}`, path, { cause: err });
  }
  const r = fns.nvmlInit_v2() as number;
  if (r !== NVML_SUCCESS) {
    const name = (fns.nvmlErrorString(r) as string | null) ?? `nvmlReturn_t(${r})`;
    return unavailable(`nvmlInit_v2 returned ${r} (${name})`, path, { result: r, resultName: name });
  }
  return { ok: true, nvml: new Nvml(path, fns) };
}

function cString(buf: Buffer): string {
  const end = buf.indexOf(0);
  return buf.subarray(0, end < 0 ? buf.length : end).toString('utf8');
}

export class Nvml {
  readonly path: string;
  readonly #fns: NvmlBindings;

  /** @internal Use tryLoadNvml. */
  constructor(path: string, fns: NvmlBindings) {
    this.path = path;
    this.#fns = fns;
  }

  #check(result: number, step: string): void {
    if (result === NVML_SUCCESS) return;
    const name = (this.#fns.nvmlErrorString(result) as string | null) ?? `nvmlReturn_t(${result})`;
    throw new CudaError(CudaErrorCode.NVML_CALL_FAILED, `${name} (${result})`, { step, result, resultName: name });
  }

  /** The kernel driver's version, e.g. "580.159.04". */
  driverVersion(): string {
    const buf = Buffer.alloc(STRING_BUFFER_BYTES);
    this.#check(this.#fns.nvmlSystemGetDriverVersion(buf, buf.length) as number, 'get driver version');
    return cString(buf);
  }

  deviceCount(): number {
    const out = [0];
    this.#check(this.#fns.nvmlDeviceGetCount_v2(out) as number, 'count devices');
    return out[0] ?? 0;
  }

  device(index: number): NvmlDevice {
    const out: unknown[] = [null];
    this.#check(this.#fns.nvmlDeviceGetHandleByIndex_v2(index, out) as number, `get device ${index}`);
    return out[0];
  }

  deviceName(device: NvmlDevice): string {
    const buf = Buffer.alloc(STRING_BUFFER_BYTES);
    this.#check(this.#fns.nvmlDeviceGetName(device, buf, buf.length) as number, 'get device name');
    return cString(buf);
  }

  /** "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (the same UUID cuDeviceGetUuid gives as bytes). */
  deviceUuid(device: NvmlDevice): string {
    const buf = Buffer.alloc(STRING_BUFFER_BYTES);
    this.#check(this.#fns.nvmlDeviceGetUUID(device, buf, buf.length) as number, 'get device UUID');
    return cString(buf);
  }

  memoryInfo(device: NvmlDevice): NvmlMemoryInfo {
    const buf = Buffer.alloc(MEMORY_BYTES);
    this.#check(this.#fns.nvmlDeviceGetMemoryInfo(device, buf) as number, 'get memory info');
    return {
      totalBytes: Number(buf.readBigUInt64LE(0)),
      freeBytes: Number(buf.readBigUInt64LE(8)),
      usedBytes: Number(buf.readBigUInt64LE(16)),
    };
  }

  /** The processes with a compute context on `device` and their GPU memory (nvmlDeviceGetComputeRunningProcesses_v3). */
  computeProcesses(device: NvmlDevice): NvmlProcess[] {
    const step = 'list compute processes';
    // Sizing call: count 0 → NVML_SUCCESS when none run, else INSUFFICIENT_SIZE with the count needed.
    const count = [0];
    let r = this.#fns.nvmlDeviceGetComputeRunningProcesses_v3(device, count, null) as number;
    if (r === NVML_SUCCESS) return [];
    for (let attempt = 0; attempt < PROCESS_LIST_ATTEMPTS && r === NVML_ERROR_INSUFFICIENT_SIZE; attempt++) {
      const capacity = (count[0] ?? 0) + 4; // room for processes started since the sizing call
      const buf = Buffer.alloc(capacity * PROCESS_INFO_BYTES);
      count[0] = capacity;
      r = this.#fns.nvmlDeviceGetComputeRunningProcesses_v3(device, count, buf) as number;
      if (r === NVML_SUCCESS) {
        const out: NvmlProcess[] = [];
        for (let i = 0; i < (count[0] ?? 0); i++) {
          const at = i * PROCESS_INFO_BYTES;
          const used = buf.readBigUInt64LE(at + 8);
          out.push({
            pid: buf.readUInt32LE(at),
            usedGpuMemoryBytes: used === NVML_VALUE_NOT_AVAILABLE ? undefined : Number(used),
            gpuInstanceId: buf.readUInt32LE(at + 16),
            computeInstanceId: buf.readUInt32LE(at + 20),
          });
        }
        return out;
      }
    }
    this.#check(r, step);
    return [];
  }

  /** GPU memory per pid over all devices (a process on two GPUs: the sum). */
  gpuMemoryByPid(): Map<number, number> {
    const byPid = new Map<number, number>();
    const n = this.deviceCount();
    for (let i = 0; i < n; i++) {
      for (const p of this.computeProcesses(this.device(i))) {
        byPid.set(p.pid, (byPid.get(p.pid) ?? 0) + (p.usedGpuMemoryBytes ?? 0));
      }
    }
    return byPid;
  }

  /** nvmlShutdown; the object must not be used after. */
  shutdown(): void {
    this.#check(this.#fns.nvmlShutdown() as number, 'shutdown');
  }
}
