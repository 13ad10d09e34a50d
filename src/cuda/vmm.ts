/**
 * The CUDA virtual memory calls the weights service needs, in the agent's own process: GPU allocations made
 * with a POSIX-fd shareable handle (`CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`), mapped into the agent's
 * VA so that pinned host buffers can be copied into them, and exported as fds that a restored worker
 * imports (`cuMemImportFromShareableHandle`) and maps at its own recorded address.
 *
 * The same library as the CudaDriver (its `path`; dlopen returns the loaded one). Copies and file reads
 * block for milliseconds per chunk, so they run through koffi's `.async` on the libuv threadpool; the
 * setup calls are microseconds and stay synchronous. Every failure is CudaError CUDA_CALL_FAILED with the
 * CUresult, its name and the step.
 */
import koffi from 'koffi';

import { CudaError, CudaErrorCode } from './errors.js';
import type { CudaDriver } from './libcuda.js';
import { CUDA_SUCCESS } from './libcuda.js';

/** CUmemAllocationHandleType (cuda.h). */
export const CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1;

// cuda.h layouts (CUDA 12.x/13.0; the SDK's ctypes copies of them are checked against the same fake).
// CUmemAllocationProp: {int type; int requestedHandleTypes; {int type; int id} location; void *win32HandleMetaData;
// {u8 compressionType; u8 gpuDirectRDMACapable; u16 usage; u8 reserved[4]} allocFlags} = 32 bytes.
const AllocProp = koffi.struct({
  type: 'int',
  requestedHandleTypes: 'int',
  locationType: 'int',
  locationId: 'int',
  win32HandleMetaData: 'void *',
  allocFlags: koffi.array('uint8_t', 8),
});
// CUmemAccessDesc: {{int type; int id} location; int flags} = 12 bytes.
const AccessDesc = koffi.struct({ locationType: 'int', locationId: 'int', flags: 'int' });

const CU_MEM_ALLOCATION_TYPE_PINNED = 1;
const CU_MEM_LOCATION_TYPE_DEVICE = 1;
const CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3;

type Fn = koffi.KoffiFunction;
/** A device address or allocation handle as koffi gives it (a number below 2^53, else a bigint). */
export type CuU64 = number | bigint;
/** Pinned host memory (cuMemHostAlloc): an opaque koffi pointer. */
export type HostPointer = unknown;

export class CudaVmm {
  readonly #driver: CudaDriver;
  readonly #f: Record<string, Fn>;
  readonly #pread: Fn;

  constructor(driver: CudaDriver) {
    this.#driver = driver;
    const lib = koffi.load(driver.path);
    const u64Out = koffi.out(koffi.pointer('uint64_t'));
    this.#f = {
      cuDeviceGet: lib.func('cuDeviceGet', 'int', [koffi.out(koffi.pointer('int')), 'int']),
      cuDevicePrimaryCtxRetain: lib.func('cuDevicePrimaryCtxRetain', 'int', [koffi.out(koffi.pointer('void *')), 'int']),
      cuCtxSetCurrent: lib.func('cuCtxSetCurrent', 'int', ['void *']),
      cuMemGetAllocationGranularity: lib.func('cuMemGetAllocationGranularity', 'int', [koffi.out(koffi.pointer('size_t')), koffi.pointer(AllocProp), 'int']),
      cuMemCreate: lib.func('cuMemCreate', 'int', [u64Out, 'size_t', koffi.pointer(AllocProp), 'uint64_t']),
      cuMemRelease: lib.func('cuMemRelease', 'int', ['uint64_t']),
      cuMemAddressReserve: lib.func('cuMemAddressReserve', 'int', [u64Out, 'size_t', 'size_t', 'uint64_t', 'uint64_t']),
      cuMemAddressFree: lib.func('cuMemAddressFree', 'int', ['uint64_t', 'size_t']),
      cuMemMap: lib.func('cuMemMap', 'int', ['uint64_t', 'size_t', 'size_t', 'uint64_t', 'uint64_t']),
      cuMemUnmap: lib.func('cuMemUnmap', 'int', ['uint64_t', 'size_t']),
      cuMemSetAccess: lib.func('cuMemSetAccess', 'int', ['uint64_t', 'size_t', koffi.pointer(AccessDesc), 'size_t']),
      cuMemsetD8: lib.func('cuMemsetD8_v2', 'int', ['uint64_t', 'uint8_t', 'size_t']),
      cuMemHostAlloc: lib.func('cuMemHostAlloc', 'int', [koffi.out(koffi.pointer('void *')), 'size_t', 'uint32_t']),
      cuMemFreeHost: lib.func('cuMemFreeHost', 'int', ['void *']),
      cuMemcpyHtoD: lib.func('cuMemcpyHtoD_v2', 'int', ['uint64_t', 'void *', 'size_t']),
      cuMemExportToShareableHandle: lib.func('cuMemExportToShareableHandle', 'int', [koffi.out(koffi.pointer('int')), 'uint64_t', 'int', 'uint64_t']),
      cuCtxSynchronize: lib.func('cuCtxSynchronize', 'int', []),
    };
    this.#pread = koffi.load('libc.so.6').func('pread', 'intptr_t', ['int', 'void *', 'size_t', 'int64_t']);
  }

  /** The driver library's path: the weights load's reader threads load the same one. */
  get libraryPath(): string {
    return this.#driver.path;
  }

  #check(result: number, step: string): void {
    if (result === CUDA_SUCCESS) return;
    const name = this.#driver.errorName(result);
    const text = this.#driver.errorString(result);
    throw new CudaError(CudaErrorCode.CALL_FAILED, `${name} (${result}): ${text}`, { step, result, resultName: name, evidence: { text } });
  }

  /**
   * Makes device `device`'s primary context current on the calling thread (the event loop's). The threadpool
   * calls below make it current there too: a CUDA context is per thread.
   */
  useDevice(device: number): void {
    const dev = [0];
    this.#check(this.#f.cuDeviceGet!(dev, device) as number, `get device ${device}`);
    const ctx: unknown[] = [null];
    this.#check(this.#f.cuDevicePrimaryCtxRetain!(ctx, dev[0]) as number, `retain the primary context of device ${device}`);
    this.#check(this.#f.cuCtxSetCurrent!(ctx[0]) as number, 'make the primary context current');
  }

  #prop(device: number): Record<string, unknown> {
    return {
      type: CU_MEM_ALLOCATION_TYPE_PINNED,
      requestedHandleTypes: CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
      locationType: CU_MEM_LOCATION_TYPE_DEVICE,
      locationId: device,
      win32HandleMetaData: null,
      allocFlags: [0, 0, 0, 0, 0, 0, 0, 0],
    };
  }

  granularity(device: number): number {
    const out = [0];
    this.#check(this.#f.cuMemGetAllocationGranularity!(out, this.#prop(device), 0) as number, 'get allocation granularity');
    return Number(out[0]);
  }

  /** cuMemCreate with a POSIX-fd shareable handle. */
  createShareable(device: number, size: number): CuU64 {
    const out: CuU64[] = [0];
    this.#check(this.#f.cuMemCreate!(out, size, this.#prop(device), 0) as number, `create ${size} bytes of shareable GPU memory`);
    return out[0]!;
  }

  release(handle: CuU64): void {
    this.#check(this.#f.cuMemRelease!(handle) as number, 'release GPU memory');
  }

  reserve(size: number): CuU64 {
    const out: CuU64[] = [0];
    this.#check(this.#f.cuMemAddressReserve!(out, size, 0, 0, 0) as number, `reserve ${size} bytes of address space`);
    return out[0]!;
  }

  addressFree(va: CuU64, size: number): void {
    this.#check(this.#f.cuMemAddressFree!(va, size) as number, 'free an address range');
  }

  /** cuMemMap + cuMemSetAccess (read/write from `device`); on a failed access grant the map is undone. */
  map(va: CuU64, size: number, handle: CuU64, device: number): void {
    this.#check(this.#f.cuMemMap!(va, size, 0, handle, 0) as number, 'map GPU memory');
    try {
      const access = { locationType: CU_MEM_LOCATION_TYPE_DEVICE, locationId: device, flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE };
      this.#check(this.#f.cuMemSetAccess!(va, size, access, 1) as number, 'allow access to GPU memory');
    } catch (err) {
      this.#f.cuMemUnmap!(va, size);
      throw err;
    }
  }

  unmap(va: CuU64, size: number): void {
    this.#check(this.#f.cuMemUnmap!(va, size) as number, 'unmap GPU memory');
  }

  memset(va: CuU64, value: number, size: number): void {
    this.#check(this.#f.cuMemsetD8!(va, value, size) as number, 'set GPU memory');
  }

  synchronize(): void {
    this.#check(this.#f.cuCtxSynchronize!() as number, 'synchronize the context');
  }

  hostAlloc(size: number): HostPointer {
    const out: unknown[] = [null];
    this.#check(this.#f.cuMemHostAlloc!(out, size, 0) as number, `allocate ${size} bytes of pinned host memory`);
    return out[0];
  }

  freeHost(ptr: HostPointer): void {
    this.#check(this.#f.cuMemFreeHost!(ptr) as number, 'free pinned host memory');
  }

  /** The allocation as a new fd (the caller owns it). */
  exportFd(handle: CuU64): number {
    const out = [-1];
    this.#check(this.#f.cuMemExportToShareableHandle!(out, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) as number, 'export GPU memory as an fd');
    return out[0]!;
  }

  /** pread(2) of up to `n` bytes at `offset` into pinned memory, on the threadpool; resolves the count read. */
  preadInto(fd: number, ptr: HostPointer, n: number, offset: number): Promise<number> {
    return new Promise((resolve, reject) => {
      this.#pread.async(fd, ptr, n, offset, (err: unknown, got: number) => {
        if (err) reject(err as Error);
        else if (Number(got) < 0) reject(new CudaError(CudaErrorCode.CALL_FAILED, 'pread failed', { step: 'read a weights file' }));
        else resolve(Number(got));
      });
    });
  }

  /**
   * cuMemcpyHtoD from pinned memory, on the calling thread (the one `useDevice` made the context current
   * on: contexts are per thread, and koffi's `.async` calls land on any threadpool thread). From pinned
   * memory the copy runs at PCIe/NVLink-C2C rate (~50 GB/s on an H200: ~0.3 ms per 16 MiB chunk), so the
   * event loop is held that long per chunk while the file reads, the slow part, stay on the threadpool.
   */
  copyHtoD(dst: CuU64, src: HostPointer, n: number): void {
    this.#check(this.#f.cuMemcpyHtoD!(dst, src, n) as number, `copy ${n} bytes to the GPU`);
  }
}
