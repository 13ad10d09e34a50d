"""thaw CUDA helpers for workers: what to release before a checkpoint, and how to get it back.

One file, Python standard library only (``ctypes`` on the CUDA driver, ``libcuda.so.1``), Python >= 3.8.
PyTorch, vLLM and SGLang are imported lazily, only by the helpers that need them.

Why: a checkpoint saves every byte of GPU memory the worker holds. A serving engine's KV cache is most
of it (16 of 18.5 GiB for the reference worker, ``bench/gpu/``) and is empty at checkpoint time, so it
should not be saved: release it before the checkpoint, get fresh memory back after restore.

The KV pool (``VmmPool``)
    GPU memory from the CUDA virtual memory API: a virtual address range is reserved once
    (``cuMemAddressReserve``), physical memory is created and mapped into it (``cuMemCreate``,
    ``cuMemMap``, ``cuMemSetAccess``). ``release()`` unmaps and frees the physical memory
    (``cuMemUnmap``, ``cuMemRelease``) but keeps the virtual range, so pointers into it - tensors and
    captured CUDA graphs - stay valid; ``remap()`` maps new physical memory at the same addresses
    (optionally zero-filled). The pool is exposed to PyTorch through ``__cuda_array_interface__``::

        pool = thaw_cuda.VmmPool.from_free_memory(fraction=0.9)
        kv = pool.as_tensor(torch.bfloat16, (layers, 2, blocks, block_size, heads, head_dim))
        ...  # warm up, capture CUDA graphs that read and write kv
        thaw_worker.checkpoint_and_wait(*thaw_cuda.combine_hooks(pool.hooks(), torch_hooks()))

    Seen on the H100 (reference/gpu-baseline.md): an 8 GiB pool unmapped this way took the driver
    checkpoint from 4.82 s to 0.41 s and restore from 1.63 s to 0.24 s; a CUDA graph captured before
    the checkpoint replayed correctly into the remapped memory.

Quiesce helpers
    Each returns a ``(release, resume)`` pair for ``thaw_worker.checkpoint_and_wait(release, resume)``:
    ``torch_hooks()`` (``torch.cuda.empty_cache``), ``vllm_hooks(llm)`` (``llm.sleep`` /
    ``llm.wake_up``), ``sglang_hooks(engine)`` (``release_memory_occupation`` /
    ``resume_memory_occupation``), ``VmmPool.hooks()``; ``combine_hooks`` chains them.

The library is found by the dynamic loader as ``libcuda.so.1`` (the NVIDIA driver installs it), or at
``$THAW_LIBCUDA`` (tests point it at thaw's fake driver, ``native/fake-libcuda``).

Errors: ``ThawCudaError`` with a stable ``code`` (``CUDA_UNAVAILABLE``, ``CUDA_CALL_FAILED``,
``CUDA_INVALID_ARGUMENT``, ``CUDA_FRAMEWORK_MISSING``), like the agent's TypeScript codes; a failed
driver call carries ``result`` (the CUresult number), ``name`` (``cuGetErrorName``) and ``step``.
"""

import array
import ctypes
import gc
import hashlib
import json
import os
import socket
import stat
import struct
import time

__all__ = [
    "LIBCUDA_ENV",
    "ThawCudaError",
    "Driver",
    "VmmPool",
    "PoolView",
    "release_pytorch_cache",
    "memory_payload",
    "torch_hooks",
    "vllm_hooks",
    "sglang_hooks",
    "combine_hooks",
    "WEIGHTS_FILE",
    "WEIGHTS_SOCKET",
    "WEIGHTS_SCHEMA",
    "WeightsRegion",
    "read_safetensors_header",
    "write_weights_file",
    "receive_weight_handles",
    "accept_weight_handles",
    "weights_hooks",
]

LIBCUDA_ENV = "THAW_LIBCUDA"
LIBCUDA_SONAME = "libcuda.so.1"
CUDA_SUCCESS = 0

# Enum values from cuda.h (CUDA 12/13 driver API reference).
CU_MEM_ALLOCATION_TYPE_PINNED = 1  # CUmemAllocationType
CU_MEM_LOCATION_TYPE_DEVICE = 1  # CUmemLocationType
CU_MEM_HANDLE_TYPE_NONE = 0  # CUmemAllocationHandleType: not exportable
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1  # CUmemAllocationHandleType: exportable as an fd
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3  # CUmemAccess_flags
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0  # CUmemAllocationGranularity_flags

CUdeviceptr = ctypes.c_ulonglong  # 64-bit on every platform CUDA supports
CUmemGenericAllocationHandle = ctypes.c_ulonglong
CUresult = ctypes.c_int


# Struct layouts: cuda.h as the driver API reference documents them (CUDA 12.x/13.0), the same ones seen
# working on the H100 (reference/gpu-baseline.md, last section).
class CUmemLocation(ctypes.Structure):
    """{CUmemLocationType type; int id;} = 8 bytes."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CUmemAllocFlags(ctypes.Structure):
    """The allocFlags member: {u8 compressionType; u8 gpuDirectRDMACapable; u16 usage; u8 reserved[4]} = 8 bytes."""

    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    """{type; requestedHandleTypes; CUmemLocation location; void *win32HandleMetaData; allocFlags} = 32 bytes."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    """{CUmemLocation location; CUmemAccess_flags flags;} = 12 bytes."""

    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class ThawCudaError(Exception):
    """Base of this module's errors; ``code`` is stable. Driver failures carry result, name and step."""

    code = "CUDA_CALL_FAILED"

    def __init__(self, message, code=None, result=None, name=None, step=None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.result = result
        self.name = name
        self.step = step


# (name, restype, argtypes) of every entry point used; cuMemGetInfo/cuMemsetD8 are the _v2 symbols that
# cuda.h maps those names to since CUDA 3.2.
_SIGNATURES = (
    ("cuInit", CUresult, [ctypes.c_uint]),
    ("cuGetErrorName", CUresult, [CUresult, ctypes.POINTER(ctypes.c_char_p)]),
    ("cuGetErrorString", CUresult, [CUresult, ctypes.POINTER(ctypes.c_char_p)]),
    ("cuDeviceGet", CUresult, [ctypes.POINTER(ctypes.c_int), ctypes.c_int]),
    ("cuDevicePrimaryCtxRetain", CUresult, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]),
    ("cuCtxGetCurrent", CUresult, [ctypes.POINTER(ctypes.c_void_p)]),
    ("cuCtxSetCurrent", CUresult, [ctypes.c_void_p]),
    ("cuCtxSynchronize", CUresult, []),
    ("cuMemGetInfo_v2", CUresult, [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
    ("cuMemGetAllocationGranularity", CUresult,
     [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(CUmemAllocationProp), ctypes.c_int]),
    ("cuMemAddressReserve", CUresult,
     [ctypes.POINTER(CUdeviceptr), ctypes.c_size_t, ctypes.c_size_t, CUdeviceptr, ctypes.c_ulonglong]),
    ("cuMemAddressFree", CUresult, [CUdeviceptr, ctypes.c_size_t]),
    ("cuMemCreate", CUresult,
     [ctypes.POINTER(CUmemGenericAllocationHandle), ctypes.c_size_t, ctypes.POINTER(CUmemAllocationProp),
      ctypes.c_ulonglong]),
    ("cuMemRelease", CUresult, [CUmemGenericAllocationHandle]),
    ("cuMemMap", CUresult,
     [CUdeviceptr, ctypes.c_size_t, ctypes.c_size_t, CUmemGenericAllocationHandle, ctypes.c_ulonglong]),
    ("cuMemUnmap", CUresult, [CUdeviceptr, ctypes.c_size_t]),
    ("cuMemSetAccess", CUresult, [CUdeviceptr, ctypes.c_size_t, ctypes.POINTER(CUmemAccessDesc), ctypes.c_size_t]),
    ("cuMemsetD8_v2", CUresult, [CUdeviceptr, ctypes.c_ubyte, ctypes.c_size_t]),
    ("cuMemExportToShareableHandle", CUresult,
     [ctypes.c_void_p, CUmemGenericAllocationHandle, ctypes.c_int, ctypes.c_ulonglong]),
    ("cuMemImportFromShareableHandle", CUresult,
     [ctypes.POINTER(CUmemGenericAllocationHandle), ctypes.c_void_p, ctypes.c_int]),
    ("cuMemHostAlloc", CUresult, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]),
    ("cuMemFreeHost", CUresult, [ctypes.c_void_p]),
    ("cuMemcpyHtoD_v2", CUresult, [CUdeviceptr, ctypes.c_void_p, ctypes.c_size_t]),
    ("cuMemcpyDtoH_v2", CUresult, [ctypes.c_void_p, CUdeviceptr, ctypes.c_size_t]),
)


class Driver:
    """The CUDA driver through ctypes: ``cuInit``-ed on construction, one per process is plenty.

    In a PyTorch process this is the same libcuda (and the same primary context) torch uses.
    """

    def __init__(self, path=None):
        self.path = path or os.environ.get(LIBCUDA_ENV) or LIBCUDA_SONAME
        try:
            self._lib = ctypes.CDLL(self.path)
        except OSError as e:
            raise ThawCudaError("cannot load %s (no NVIDIA driver?): %s" % (self.path, e), "CUDA_UNAVAILABLE")
        for name, restype, argtypes in _SIGNATURES:
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                raise ThawCudaError("%s has no %s" % (self.path, name), "CUDA_UNAVAILABLE")
            fn.restype = restype
            fn.argtypes = argtypes
        result = self._lib.cuInit(0)
        if result != CUDA_SUCCESS:
            raise ThawCudaError(
                "cuInit(0) returned %d %s" % (result, self.error_name(result)),
                "CUDA_UNAVAILABLE", result, self.error_name(result), "cuInit",
            )

    def error_name(self, result):
        out = ctypes.c_char_p()
        if self._lib.cuGetErrorName(result, ctypes.byref(out)) == CUDA_SUCCESS and out.value:
            return out.value.decode()
        return "CUresult(%d)" % result

    def error_string(self, result):
        out = ctypes.c_char_p()
        if self._lib.cuGetErrorString(result, ctypes.byref(out)) == CUDA_SUCCESS and out.value:
            return out.value.decode()
        return "unknown CUresult"

    def call(self, step, name, *args):
        """Calls entry point ``name``; a CUresult other than CUDA_SUCCESS raises ThawCudaError."""
        result = getattr(self._lib, name)(*args)
        if result != CUDA_SUCCESS:
            err_name = self.error_name(result)
            raise ThawCudaError(
                "%s: %s (%d): %s" % (step, err_name, result, self.error_string(result)),
                "CUDA_CALL_FAILED", result, err_name, step,
            )

    def ensure_context(self, device=0):
        """Makes a context current on this thread if none is: the device's primary context (torch's)."""
        ctx = ctypes.c_void_p()
        self.call("get current context", "cuCtxGetCurrent", ctypes.byref(ctx))
        if ctx.value:
            return
        dev = ctypes.c_int()
        self.call("get device %d" % device, "cuDeviceGet", ctypes.byref(dev), device)
        self.call("retain primary context of device %d" % device, "cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        self.call("make the primary context current", "cuCtxSetCurrent", ctx)

    def mem_get_info(self):
        """(free, total) bytes of the current context's GPU."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.call("get GPU memory info", "cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def synchronize(self):
        self.call("synchronize the context", "cuCtxSynchronize")


def _device_prop(device, handle_types=CU_MEM_HANDLE_TYPE_NONE):
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = handle_types
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    return prop


def _granularity(driver, prop):
    """The minimum VMM granularity for allocations like ``prop`` (sizes and reservations are multiples of it)."""
    g = ctypes.c_size_t()
    driver.call(
        "get allocation granularity", "cuMemGetAllocationGranularity",
        ctypes.byref(g), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM,
    )
    return g.value


class VmmPool:
    """A GPU memory pool at a fixed virtual address whose physical memory can be released and remapped.

    ``size_bytes`` is rounded up to the allocation granularity (2 MiB on an H100). The pool is mapped
    (and zero-filled unless ``zero_fill=False``) on construction. ``release()`` before a checkpoint,
    ``remap()`` after it (restore-complete or checkpoint-complete); ``free()`` gives back the address
    range too (only when nothing will touch it again). Not thread-safe: call from one thread.
    """

    def __init__(self, size_bytes, device=0, driver=None, zero_fill=True):
        if int(size_bytes) <= 0:
            raise ThawCudaError("size_bytes must be positive, got %r" % (size_bytes,), "CUDA_INVALID_ARGUMENT")
        self.driver = driver if driver is not None else Driver()
        self.device = device
        self.driver.ensure_context(device)
        self._prop = _device_prop(device)
        self.granularity = _granularity(self.driver, self._prop)
        self.size = -(-int(size_bytes) // self.granularity) * self.granularity
        ptr = CUdeviceptr()
        self.driver.call(
            "reserve %d bytes of address space" % self.size, "cuMemAddressReserve", ctypes.byref(ptr), self.size, 0, 0, 0
        )
        self.ptr = ptr.value
        self._handle = None
        self._reserved = True
        try:
            self.remap(zero_fill=zero_fill)
        except BaseException:
            self.free()
            raise

    @classmethod
    def from_free_memory(cls, fraction=0.9, keep_bytes=0, device=0, driver=None, zero_fill=True):
        """A pool of ``fraction`` of the GPU's free memory less ``keep_bytes`` (what serving engines do)."""
        driver = driver if driver is not None else Driver()
        driver.ensure_context(device)
        free, _total = driver.mem_get_info()
        size = int(free * fraction) - int(keep_bytes)
        if size <= 0:
            raise ThawCudaError(
                "no room for a pool: %d bytes free, fraction %s, keep %d" % (free, fraction, keep_bytes),
                "CUDA_INVALID_ARGUMENT",
            )
        # Round down so that the rounded-up size still fits.
        granularity = 2 << 20
        return cls(max(granularity, size // granularity * granularity), device, driver, zero_fill)

    @property
    def mapped(self):
        """True while physical memory backs the range."""
        return self._handle is not None

    def release(self):
        """Frees the physical memory, keeping the addresses (cuMemUnmap + cuMemRelease). Idempotent.

        Waits for the GPU first: a kernel still reading the pool would fault on unmapped memory.
        """
        if self._handle is None:
            return
        self.driver.ensure_context(self.device)
        self.driver.synchronize()
        self.driver.call("unmap the pool", "cuMemUnmap", self.ptr, self.size)
        handle, self._handle = self._handle, None
        self.driver.call("release the pool's memory", "cuMemRelease", handle)

    def remap(self, zero_fill=True):
        """Maps new physical memory at the same addresses (cuMemCreate + cuMemMap + cuMemSetAccess).

        Idempotent. New memory holds garbage: ``zero_fill`` (default) clears it, which an engine whose
        KV blocks are all free does not need. On failure nothing stays mapped or allocated.
        """
        if self._handle is not None:
            return
        if not self._reserved:
            raise ThawCudaError("the pool was freed", "CUDA_INVALID_ARGUMENT")
        self.driver.ensure_context(self.device)
        handle = CUmemGenericAllocationHandle()
        self.driver.call(
            "create %d bytes of GPU memory" % self.size, "cuMemCreate",
            ctypes.byref(handle), self.size, ctypes.byref(self._prop), 0,
        )
        try:
            self.driver.call("map the pool", "cuMemMap", self.ptr, self.size, 0, handle, 0)
            try:
                access = CUmemAccessDesc()
                access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
                access.location.id = self.device
                access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                self.driver.call("allow access to the pool", "cuMemSetAccess", self.ptr, self.size, ctypes.byref(access), 1)
                if zero_fill:
                    self.driver.call("zero the pool", "cuMemsetD8_v2", self.ptr, 0, self.size)
                    self.driver.synchronize()
            except BaseException:
                self.driver.call("unmap the pool after a failed remap", "cuMemUnmap", self.ptr, self.size)
                raise
        except BaseException:
            self.driver.call("release memory after a failed remap", "cuMemRelease", handle)
            raise
        self._handle = handle.value

    def free(self):
        """Releases the memory and the address range. Tensors and graphs into the pool become invalid."""
        self.release()
        if self._reserved:
            self._reserved = False
            self.driver.call("free the pool's address range", "cuMemAddressFree", self.ptr, self.size)

    def hooks(self, zero_fill=True):
        """``(release, resume)`` for ``thaw_worker.checkpoint_and_wait``."""
        return self.release, lambda: self.remap(zero_fill=zero_fill)

    @property
    def __cuda_array_interface__(self):
        """The whole pool as a 1-D array of bytes (CUDA Array Interface, version 3)."""
        return PoolView(self, (self.size,), "|u1").__cuda_array_interface__

    def view(self, shape, typestr, offset=0):
        """A typed view of part of the pool (``typestr`` as in NumPy, e.g. ``"<f2"``, ``"<u2"`` for bf16 bits)."""
        return PoolView(self, tuple(int(d) for d in shape), typestr, offset)

    def as_tensor(self, dtype=None, shape=None):
        """A torch tensor over the pool (``dtype`` a torch dtype, default uint8; ``shape`` default flat)."""
        import torch  # lazily: this module must import without PyTorch

        flat = torch.as_tensor(self, device="cuda:%d" % self.device)
        if dtype is not None:
            flat = flat.view(dtype)
        return flat if shape is None else flat.view(shape)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


class PoolView:
    """A typed window onto a VmmPool for ``__cuda_array_interface__``; keeps the pool alive."""

    def __init__(self, pool, shape, typestr, offset=0):
        itemsize = int(typestr[2:]) if typestr[:1] in "<>|=" else int(typestr[1:])
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if offset < 0 or offset + nbytes > pool.size:
            raise ThawCudaError(
                "a view of %d bytes at offset %d does not fit a pool of %d" % (nbytes, offset, pool.size),
                "CUDA_INVALID_ARGUMENT",
            )
        self.pool = pool
        self.shape = shape
        self.typestr = typestr
        self.offset = offset

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": self.typestr,
            "data": (self.pool.ptr + self.offset, False),
            "strides": None,  # C-contiguous
            "version": 3,
            # No "stream": the consumer need not synchronise with any stream before using the memory.
        }


def release_pytorch_cache():
    """Returns PyTorch's cached, unused GPU memory to the driver; False when torch/CUDA is not in use.

    ``torch.cuda.synchronize`` first (no kernel still owns a block), ``gc.collect`` so that unreachable
    tensors give their blocks back, then ``torch.cuda.empty_cache``.
    """
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    return True


def memory_payload(extra_tensor_bytes=0):
    """The ready-for-checkpoint payload keys the agent reads: GPU bytes held by tensors and reserved by PyTorch's
    allocator (``gpuTensorBytes``, ``gpuAllocatorReservedBytes``). The agent warns when most of the GPU memory
    a checkpoint saved is allocator cache. ``extra_tensor_bytes``: live memory outside PyTorch's allocator (a
    mapped ``VmmPool``). ``{}`` when torch/CUDA is not in use.
    """
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    torch.cuda.synchronize()
    return {
        "gpuTensorBytes": int(torch.cuda.memory_allocated()) + int(extra_tensor_bytes),
        "gpuAllocatorReservedBytes": int(torch.cuda.memory_reserved()) + int(extra_tensor_bytes),
    }


def torch_hooks():
    """``(release, resume)``: empty PyTorch's cache before the checkpoint; nothing to do after."""
    def release():
        release_pytorch_cache()

    return release, (lambda: None)


def vllm_hooks(llm, level=1):
    """``(release, resume)`` for a vLLM ``LLM`` created with ``enable_sleep_mode=True``.

    ``llm.sleep(level=1)`` frees the KV cache and moves the weights to pinned host memory (level 2
    drops them; they must then be reloaded); ``llm.wake_up()`` brings both back. For an async engine,
    call its ``sleep``/``wake_up`` coroutines in your own release/resume.
    """
    if not callable(getattr(llm, "sleep", None)) or not callable(getattr(llm, "wake_up", None)):
        raise ThawCudaError(
            "%r has no sleep()/wake_up(): vLLM's LLM with enable_sleep_mode=True is needed" % (llm,),
            "CUDA_FRAMEWORK_MISSING",
        )
    return (lambda: llm.sleep(level=level)), llm.wake_up


def sglang_hooks(engine, tags=None):
    """``(release, resume)`` for an SGLang ``Engine`` started with ``enable_memory_saver=True``.

    ``release_memory_occupation`` frees the KV cache and weights through torch_memory_saver (which,
    like VmmPool, keeps virtual addresses for the CUDA graphs); ``resume_memory_occupation`` maps them
    again. ``tags`` (e.g. ``["kv_cache"]``) limits both to part of the memory, where the version has tags.
    """
    release = getattr(engine, "release_memory_occupation", None)
    resume = getattr(engine, "resume_memory_occupation", None)
    if not callable(release) or not callable(resume):
        raise ThawCudaError(
            "%r has no release_memory_occupation()/resume_memory_occupation(): SGLang's Engine is needed" % (engine,),
            "CUDA_FRAMEWORK_MISSING",
        )
    if tags is None:
        return release, resume
    return (lambda: release(tags=tags)), (lambda: resume(tags=tags))


def combine_hooks(*pairs):
    """One ``(release, resume)`` from several: releases in order, resumes in reverse order."""
    pairs = [p for p in pairs if p is not None]

    def release():
        for r, _ in pairs:
            if r is not None:
                r()

    def resume():
        for _, r in reversed(pairs):
            if r is not None:
                r()

    return release, resume


# ---- Weights regions: model weights that a checkpoint does not carry ------------------------------------
#
# Weights are immutable and already on the node (the image, a model cache, a volume), so a checkpoint need
# not copy them and a restore can read them at storage speed while CRIU rebuilds the rest. A WeightsRegion
# loads safetensors files into one reserved VA range (one physical allocation per file, each at a
# granularity-aligned offset); tensors are views into it (``__cuda_array_interface__``), so CUDA graphs
# captured over them keep their pointers. The worker tells thaw where every byte came from in
# ``<control dir>/weights-regions.json`` (``write_weights_file``); before the checkpoint ``release()``
# unmaps and frees the physical memory, keeping the VA; after a restore thaw has already read the files
# into GPU allocations made with a POSIX-fd shareable handle and hands one fd per allocation over
# ``<control dir>/weights.sock`` (``receive_weight_handles``); ``map_handles(fds)`` imports and maps them at
# the recorded addresses. Without handles (a checkpoint that the same process survives, or a thaw without
# the weights service) ``reload()`` reads the files again. docs/weights.md: how an engine's loader uses it.

WEIGHTS_FILE = "weights-regions.json"
WEIGHTS_SOCKET = "weights.sock"
WEIGHTS_SCHEMA = "thaw.dev/weights-regions/v1"
# Caps that thaw enforces on what the worker writes (src/restore-engine/weights/regions-file.ts); the SDK
# refuses to write what thaw would refuse to read.
WEIGHTS_FILE_MAX_BYTES = 1 << 20
WEIGHTS_MAX_ALLOCATIONS = 4096
SAFETENSORS_HEADER_MAX_BYTES = 100 << 20  # the format's own limit (safetensors crate)
_READ_CHUNK = 16 << 20

# safetensors dtype -> (item size, __cuda_array_interface__ typestr, torch dtype name). bf16 and fp8 have no
# NumPy typestr: views carry unsigned ints of the same size; as_tensor reinterprets them.
_ST_DTYPES = {
    "F64": (8, "<f8", "float64"), "F32": (4, "<f4", "float32"), "F16": (2, "<f2", "float16"),
    "BF16": (2, "<u2", "bfloat16"), "I64": (8, "<i8", "int64"), "I32": (4, "<i4", "int32"),
    "I16": (2, "<i2", "int16"), "I8": (1, "|i1", "int8"), "U8": (1, "|u1", "uint8"), "BOOL": (1, "|b1", "bool"),
    "F8_E4M3": (1, "|u1", "float8_e4m3fn"), "F8_E5M2": (1, "|u1", "float8_e5m2"),
}


def read_safetensors_header(f):
    """(data_start, {name: (dtype, shape, begin, end)}) of an open safetensors file; begin/end are data offsets.

    Validates what the loader relies on: the header length, JSON, known dtypes, offsets inside the file and
    matching the shape.
    """
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise ThawCudaError("not a safetensors file: shorter than its header length", "CUDA_INVALID_ARGUMENT")
    (n,) = struct.unpack("<Q", raw)
    if n > SAFETENSORS_HEADER_MAX_BYTES or 8 + n > file_size:
        raise ThawCudaError("safetensors header length %d does not fit the file" % n, "CUDA_INVALID_ARGUMENT")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except ValueError as e:
        raise ThawCudaError("safetensors header is not JSON: %s" % e, "CUDA_INVALID_ARGUMENT")
    if not isinstance(header, dict):
        raise ThawCudaError("safetensors header is not an object", "CUDA_INVALID_ARGUMENT")
    data_start = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ThawCudaError("safetensors tensor %r is malformed" % name, "CUDA_INVALID_ARGUMENT")
        if dtype not in _ST_DTYPES:
            raise ThawCudaError("safetensors tensor %r has dtype %r" % (name, dtype), "CUDA_INVALID_ARGUMENT")
        count = 1
        for d in shape:
            if d < 0:
                raise ThawCudaError("safetensors tensor %r has a negative dimension" % name, "CUDA_INVALID_ARGUMENT")
            count *= d
        if not (0 <= begin <= end <= file_size - data_start) or end - begin != count * _ST_DTYPES[dtype][0]:
            raise ThawCudaError("safetensors tensor %r has offsets that do not fit" % name, "CUDA_INVALID_ARGUMENT")
        tensors[name] = (dtype, tuple(shape), begin, end)
    return data_start, tensors


class _Allocation:
    """One physical allocation of a region: [offset, offset + size) of its VA, and where its bytes come from."""

    def __init__(self, offset, size, kind, source=None):
        self.offset = offset
        self.size = size
        self.kind = kind  # "file" or "raw"
        self.source = source  # file: {"path", "fileOffset", "length", "fileSize", "sha256"}
        self.handle = None


class WeightsRegion:
    """Model weights in one reserved VA range whose physical memory thaw can hand back after a restore.

    ``WeightsRegion.load(files)`` reads safetensors files in (one allocation per file, the file's data
    section at the start of it); ``tensor(name)`` / ``view(name)`` are views into the region;
    ``add_raw(nbytes)`` adds an allocation whose bytes are not a file (quantised or fused at load): thaw
    keeps it in the checkpoint (it is not released). ``describe()`` is this region's entry of the weights
    file. Not thread-safe.
    """

    def __init__(self, size_bytes, name="weights", device=0, driver=None):
        if int(size_bytes) <= 0:
            raise ThawCudaError("size_bytes must be positive, got %r" % (size_bytes,), "CUDA_INVALID_ARGUMENT")
        self.name = str(name)
        self.driver = driver if driver is not None else Driver()
        self.device = device
        self.driver.ensure_context(device)
        self._prop = _device_prop(device)
        self.granularity = _granularity(self.driver, self._prop)
        self.size = self._round(int(size_bytes))
        ptr = CUdeviceptr()
        self.driver.call(
            "reserve %d bytes for weights" % self.size, "cuMemAddressReserve", ctypes.byref(ptr), self.size, 0, 0, 0
        )
        self.ptr = ptr.value
        self._next = 0
        self.allocations = []
        self.tensors_info = {}  # name -> (dtype, shape, region offset)
        self._reserved = True

    def _round(self, n):
        return max(1, -(-n // self.granularity)) * self.granularity

    @classmethod
    def load(cls, files, name="weights", device=0, driver=None):
        """A region holding every tensor of ``files`` (paths of safetensors files), read through pinned memory."""
        files = [os.fspath(p) for p in files]
        driver = driver if driver is not None else Driver()
        driver.ensure_context(device)
        layout = []
        granularity = None
        for path in files:
            with open(path, "rb") as f:
                data_start, tensors = read_safetensors_header(f)
                f.seek(0, os.SEEK_END)
                layout.append((path, data_start, f.tell() - data_start, tensors))
        granularity = _granularity(driver, _device_prop(device))
        total = sum(max(1, -(-length // granularity)) * granularity for _p, _s, length, _t in layout)
        region = cls(total, name, device, driver)
        try:
            for path, data_start, length, tensors in layout:
                offset = region._next
                alloc = _Allocation(offset, region._round(length), "file", {
                    "path": os.path.abspath(path), "fileOffset": data_start, "length": length,
                })
                region._map_new(alloc)
                alloc.source.update(region._fill_from_file(alloc))
                for tname, (dtype, shape, begin, _end) in tensors.items():
                    if tname in region.tensors_info:
                        raise ThawCudaError("tensor %r is in more than one file" % tname, "CUDA_INVALID_ARGUMENT")
                    region.tensors_info[tname] = (dtype, shape, offset + begin)
        except BaseException:
            region.free()
            raise
        return region

    def add_raw(self, nbytes):
        """Maps a new allocation of ``nbytes`` (rounded up) for bytes made at load; returns its region offset."""
        alloc = _Allocation(self._next, self._round(int(nbytes)), "raw")
        self._map_new(alloc)
        return alloc.offset

    def _map_new(self, alloc):
        if alloc.offset + alloc.size > self.size:
            raise ThawCudaError("the region has no room for %d more bytes" % alloc.size, "CUDA_INVALID_ARGUMENT")
        handle = CUmemGenericAllocationHandle()
        self.driver.call("create %d bytes for weights" % alloc.size, "cuMemCreate",
                         ctypes.byref(handle), alloc.size, ctypes.byref(self._prop), 0)
        try:
            self._map_handle(alloc, handle.value)
        except BaseException:
            self.driver.call("release weights memory after a failed map", "cuMemRelease", handle)
            raise
        alloc.handle = handle.value
        self.allocations.append(alloc)
        self._next = alloc.offset + alloc.size

    def _map_handle(self, alloc, handle):
        ptr = self.ptr + alloc.offset
        self.driver.call("map weights", "cuMemMap", ptr, alloc.size, 0, handle, 0)
        try:
            access = CUmemAccessDesc()
            access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = self.device
            access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            self.driver.call("allow access to weights", "cuMemSetAccess", ptr, alloc.size, ctypes.byref(access), 1)
        except BaseException:
            self.driver.call("unmap weights after a failed access grant", "cuMemUnmap", ptr, alloc.size)
            raise

    def _fill_from_file(self, alloc):
        """Copies the file's data section into the allocation; returns the file's size and sha256 (whole file)."""
        src = alloc.source
        digest = hashlib.sha256()
        host = ctypes.c_void_p()
        self.driver.call("allocate pinned host memory", "cuMemHostAlloc", ctypes.byref(host), _READ_CHUNK, 0)
        try:
            buf = (ctypes.c_ubyte * _READ_CHUNK).from_address(host.value)
            view = memoryview(buf).cast("B")
            with open(src["path"], "rb") as f:
                head = f.read(src["fileOffset"])
                digest.update(head)
                done = 0
                while done < src["length"]:
                    n = f.readinto(view[:min(_READ_CHUNK, src["length"] - done)])
                    if not n:
                        raise ThawCudaError("%s shrank while being read" % src["path"], "CUDA_INVALID_ARGUMENT")
                    digest.update(view[:n])
                    self.driver.call("copy weights to the GPU", "cuMemcpyHtoD_v2",
                                     self.ptr + alloc.offset + done, host, n)
                    done += n
                if f.read(1):
                    raise ThawCudaError("%s grew while being read" % src["path"], "CUDA_INVALID_ARGUMENT")
                file_size = f.tell()
            del view, buf
        finally:
            self.driver.call("free pinned host memory", "cuMemFreeHost", host)
        tail = alloc.size - src["length"]
        if tail:
            self.driver.call("zero the weights' padding", "cuMemsetD8_v2", self.ptr + alloc.offset + src["length"], 0, tail)
        self.driver.synchronize()
        return {"fileSize": file_size, "sha256": digest.hexdigest()}

    @property
    def mapped(self):
        """True while every file allocation has physical memory."""
        return all(a.handle is not None for a in self.allocations)

    @property
    def file_allocations(self):
        return [a for a in self.allocations if a.kind == "file"]

    def release(self):
        """Frees the file allocations' memory, keeping the VA (raw ones stay: thaw checkpoints them). Idempotent."""
        self.driver.ensure_context(self.device)
        self.driver.synchronize()
        for alloc in self.file_allocations:
            if alloc.handle is None:
                continue
            self.driver.call("unmap weights", "cuMemUnmap", self.ptr + alloc.offset, alloc.size)
            handle, alloc.handle = alloc.handle, None
            self.driver.call("release weights memory", "cuMemRelease", handle)

    def map_handles(self, fds):
        """Imports one POSIX fd per file allocation (in ``describe()`` order) and maps each at its address.

        All or nothing: on any failure what was mapped is unmapped and released, and ThawCudaError is raised
        (the caller then ``reload()``s or gives up). The fds are closed either way.
        """
        try:
            allocs = self.file_allocations
            if len(fds) != len(allocs):
                raise ThawCudaError("%d weight handles for %d allocations" % (len(fds), len(allocs)),
                                    "CUDA_INVALID_ARGUMENT")
            if any(a.handle is not None for a in allocs):
                raise ThawCudaError("the weights are still mapped", "CUDA_INVALID_ARGUMENT")
            self.driver.ensure_context(self.device)
            done = []
            try:
                for alloc, fd in zip(allocs, fds):
                    handle = CUmemGenericAllocationHandle()
                    self.driver.call("import a weights handle", "cuMemImportFromShareableHandle",
                                     ctypes.byref(handle), ctypes.c_void_p(int(fd)),
                                     CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
                    try:
                        self._map_handle(alloc, handle.value)
                    except BaseException:
                        self.driver.call("release an imported handle", "cuMemRelease", handle)
                        raise
                    alloc.handle = handle.value
                    done.append(alloc)
            except BaseException:
                for alloc in done:
                    self.driver.call("unmap weights after a failed import", "cuMemUnmap", self.ptr + alloc.offset, alloc.size)
                    handle, alloc.handle = alloc.handle, None
                    self.driver.call("release weights after a failed import", "cuMemRelease", handle)
                raise
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def reload(self):
        """Maps new memory and reads the files again (the path without thaw's handles). Idempotent."""
        self.driver.ensure_context(self.device)
        for alloc in self.file_allocations:
            if alloc.handle is not None:
                continue
            handle = CUmemGenericAllocationHandle()
            self.driver.call("create %d bytes for weights" % alloc.size, "cuMemCreate",
                             ctypes.byref(handle), alloc.size, ctypes.byref(self._prop), 0)
            try:
                self._map_handle(alloc, handle.value)
            except BaseException:
                self.driver.call("release weights memory after a failed map", "cuMemRelease", handle)
                raise
            alloc.handle = handle.value
            got = self._fill_from_file(alloc)
            if got["sha256"] != alloc.source["sha256"]:
                raise ThawCudaError("%s changed since it was loaded" % alloc.source["path"], "CUDA_INVALID_ARGUMENT")

    def free(self):
        """Unmaps everything and gives back the VA: views into the region become invalid."""
        self.driver.ensure_context(self.device)
        self.driver.synchronize()
        for alloc in self.allocations:
            if alloc.handle is not None:
                self.driver.call("unmap weights", "cuMemUnmap", self.ptr + alloc.offset, alloc.size)
                handle, alloc.handle = alloc.handle, None
                self.driver.call("release weights memory", "cuMemRelease", handle)
        if self._reserved:
            self._reserved = False
            self.driver.call("free the weights' address range", "cuMemAddressFree", self.ptr, self.size)

    def describe(self):
        """This region's entry in the weights file (VA as a hex string: JSON numbers stop at 2**53)."""
        return {
            "name": self.name,
            "device": self.device,
            "va": "0x%x" % self.ptr,
            "size": self.size,
            "granularity": self.granularity,
            "allocations": [
                dict({"offset": a.offset, "size": a.size, "kind": a.kind}, **({"source": dict(a.source)} if a.source else {}))
                for a in self.allocations
            ],
        }

    def view(self, name):
        """A PoolView (``__cuda_array_interface__``) of tensor ``name``; bf16/fp8 as unsigned ints of their size."""
        dtype, shape, offset = self.tensors_info[name]
        return PoolView(self, shape, _ST_DTYPES[dtype][1], offset)

    def tensor(self, name):
        """Tensor ``name`` as a torch tensor viewing the region (needs PyTorch)."""
        import torch  # lazily: this module must import without PyTorch

        dtype, shape, offset = self.tensors_info[name]
        typestr = _ST_DTYPES[dtype][1]
        # PyTorch reads every CAI integer type but uint16 only in recent versions: bf16 bits come as int16.
        view = PoolView(self, shape, "<i2" if typestr == "<u2" else typestr, offset)
        t = torch.as_tensor(view, device="cuda:%d" % self.device)
        want = getattr(torch, _ST_DTYPES[dtype][2])
        return t if t.dtype == want else t.view(want)

    def hooks(self, control_dir=None, timeout_s=30.0):
        """``(release, resume)`` for ``thaw_worker.checkpoint_and_wait``: see ``weights_hooks``."""
        return weights_hooks([self], control_dir, timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


def write_weights_file(regions, control_dir):
    """Tells thaw the regions (``<control_dir>/weights-regions.json``, written atomically). Returns the dict."""
    import thaw_worker  # the same directory; lazily so that thaw_cuda alone stays importable

    doc = {"schema": WEIGHTS_SCHEMA, "regions": [r.describe() for r in regions]}
    if len(json.dumps(doc)) > WEIGHTS_FILE_MAX_BYTES:
        raise ThawCudaError("the weights file would exceed %d bytes" % WEIGHTS_FILE_MAX_BYTES, "CUDA_INVALID_ARGUMENT")
    if sum(len(r.allocations) for r in regions) > WEIGHTS_MAX_ALLOCATIONS:
        raise ThawCudaError("more than %d weight allocations" % WEIGHTS_MAX_ALLOCATIONS, "CUDA_INVALID_ARGUMENT")
    thaw_worker._write_atomic(os.fspath(control_dir), WEIGHTS_FILE, doc, mode=0o644)
    return doc


def _connect_weights(control_dir, timeout_s):
    path = os.path.join(os.fspath(control_dir), WEIGHTS_SOCKET)
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    raise ThawCudaError("no weights socket at %s" % path, "CUDA_UNAVAILABLE")
                time.sleep(0.005)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        return sock
    except BaseException:
        sock.close()
        raise


def _receive_handles_on(sock, max_fds):
    fds = array.array("i")
    chunks = []
    while True:
        msg, ancdata, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(max_fds * fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not msg:
            break
        chunks.append(msg)
        if sum(len(c) for c in chunks) > WEIGHTS_FILE_MAX_BYTES:
            for fd in fds:
                os.close(fd)
            raise ThawCudaError("the weights message is too long", "CUDA_INVALID_ARGUMENT")
    received = list(fds)
    try:
        doc = json.loads(b"".join(chunks).decode("utf-8"))
        out, at = {}, 0
        for entry in doc["regions"]:
            n = int(entry["fds"])
            if n < 0 or at + n > len(received):
                raise ValueError("fd counts do not match")
            out[str(entry["name"])] = received[at:at + n]
            at += n
        if at != len(received) or doc.get("schema") != WEIGHTS_SCHEMA:
            raise ValueError("fd counts or schema do not match")
        return out
    except (ValueError, KeyError, TypeError) as e:
        for fd in received:
            os.close(fd)
        raise ThawCudaError("thaw's weights message is malformed: %s" % e, "CUDA_INVALID_ARGUMENT")


def receive_weight_handles(control_dir, timeout_s=30.0, max_fds=WEIGHTS_MAX_ALLOCATIONS):
    """Connects to thaw's ``weights.sock`` in the control directory and receives the weight handles.

    thaw sends one message: a JSON object ``{"schema", "regions": [{"name", "fds": <count>}]}`` whose
    SCM_RIGHTS carry the fds in that order, then shuts its side for writing. Returns ``{region name: [fd,
    ...]}`` (the caller owns them). A socket that is not there within ``timeout_s`` raises ThawCudaError
    (code CUDA_UNAVAILABLE). The restore flow waits for the worker's answer: ``accept_weight_handles``.
    """
    sock = _connect_weights(control_dir, timeout_s)
    try:
        return _receive_handles_on(sock, max_fds)
    finally:
        sock.close()


def accept_weight_handles(regions, control_dir, timeout_s=30.0):
    """The restored worker's side of the hand-over: receive thaw's handles, map every region, answer thaw.

    All or nothing over ``regions``: when a region's handles are missing or cannot be imported and mapped,
    every region mapped here is released again and thaw is told ``{"ok": false, "error"}`` (it abandons the
    restore: the pod cold-starts); otherwise ``{"ok": true}`` (thaw then writes restore-complete). Returns
    True when every region is mapped.
    """
    sock = _connect_weights(control_dir, timeout_s)
    done = []
    try:
        error = None
        try:
            handles = _receive_handles_on(sock, WEIGHTS_MAX_ALLOCATIONS)
        except (ThawCudaError, OSError) as e:
            handles, error = {}, "receive: %s" % e
        for r in regions:
            if error is not None:
                break
            fds = handles.pop(r.name, None)
            if fds is None:
                error = "no handles for region %s" % r.name
                break
            try:
                r.map_handles(fds)
                done.append(r)
            except ThawCudaError as e:
                error = "%s: %s" % (e.step or e.code, e)
        for fds in handles.values():
            for fd in fds:
                os.close(fd)
        if error is not None:
            for r in done:
                r.release()
        answer = {"ok": error is None}
        if error is not None:
            answer["error"] = error[:1000]
        try:
            sock.sendall(json.dumps(answer).encode("utf-8"))
        except OSError:
            pass
        return error is None
    finally:
        sock.close()


def weights_hooks(regions, control_dir=None, timeout_s=30.0):
    """``(release, resume)`` for ``thaw_worker.checkpoint_and_wait`` over WeightsRegions.

    release: writes the weights file, frees the file allocations, and has the wait for thaw's answer take
    the hand-over: a restored worker sees thaw's ``weights.sock`` appear in its control directory before
    ``restore-complete`` and maps the handles there (``accept_weight_handles``; one try, since thaw
    abandons the restore when it fails). resume: what is not mapped by then (``checkpoint-complete``, the
    same process going on; or a thaw without the weights service) is ``reload()``ed from its files.
    """
    import thaw_worker

    cd = control_dir if control_dir is not None else thaw_worker.ControlDir()
    state = {"tried": False}

    def during_wait():
        if state["tried"]:
            return
        try:
            st = os.lstat(os.path.join(cd.path, WEIGHTS_SOCKET))
        except OSError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            return
        state["tried"] = True
        try:
            accept_weight_handles(regions, cd.path, timeout_s)
        except ThawCudaError:
            pass

    def release():
        write_weights_file(regions, cd.path)
        for r in regions:
            r.release()
        state["tried"] = False
        thaw_worker.add_wait_hook(during_wait)

    def resume():
        thaw_worker.remove_wait_hook(during_wait)
        for r in regions:
            r.reload()

    return release, resume
