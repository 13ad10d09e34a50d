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

import ctypes
import gc
import os

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
]

LIBCUDA_ENV = "THAW_LIBCUDA"
LIBCUDA_SONAME = "libcuda.so.1"
CUDA_SUCCESS = 0

# Enum values from cuda.h (CUDA 12/13 driver API reference).
CU_MEM_ALLOCATION_TYPE_PINNED = 1  # CUmemAllocationType
CU_MEM_LOCATION_TYPE_DEVICE = 1  # CUmemLocationType
CU_MEM_HANDLE_TYPE_NONE = 0  # CUmemAllocationHandleType: not exportable
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


def _device_prop(device):
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    return prop


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
        granularity = ctypes.c_size_t()
        self.driver.call(
            "get allocation granularity", "cuMemGetAllocationGranularity",
            ctypes.byref(granularity), ctypes.byref(self._prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
        self.granularity = granularity.value
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
