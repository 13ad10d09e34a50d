"""Unit tests of thaw_cuda without a GPU: the fake CUDA driver (native/fake-libcuda) backs "device memory"
with host pages at the addresses it returns, so the pool's logic is checked through the real ctypes calls.

Run: ``python3 -m unittest test_thaw_cuda`` (builds the fake with make when it is missing).
"""

import ctypes
import os
import subprocess
import tempfile
import threading
import time
import unittest
from unittest import mock
import types
import sys

import thaw_cuda
import thaw_worker

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "native", "fake-libcuda"))
FAKE_LIBCUDA = os.path.join(FAKE_DIR, "build", "libcuda.so.1")
MiB = 1 << 20


def setUpModule():
    subprocess.run(["make", "-s", "-C", FAKE_DIR], check=True)


class FakeCase(unittest.TestCase):
    def setUp(self):
        self._saved = {k: os.environ.get(k) for k in ("FAKE_CUDA_FAIL", "FAKE_CUDA_TOTAL_MEM", "FAKE_CUDA_GPUS")}
        self.driver = thaw_cuda.Driver(FAKE_LIBCUDA)
        fake = ctypes.CDLL(FAKE_LIBCUDA)
        fake.fakeCudaAllocatedBytes.restype = ctypes.c_ulonglong
        self.allocated = fake.fakeCudaAllocatedBytes

    def tearDown(self):
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def read(self, ptr, n):
        return ctypes.string_at(ptr, n)


class StructLayoutTest(unittest.TestCase):
    def test_sizes_match_cuda_h(self):
        self.assertEqual(ctypes.sizeof(thaw_cuda.CUmemAllocationProp), 32)
        self.assertEqual(thaw_cuda.CUmemAllocationProp.location.offset, 8)
        self.assertEqual(thaw_cuda.CUmemAllocationProp.win32HandleMetaData.offset, 16)
        self.assertEqual(thaw_cuda.CUmemAllocationProp.allocFlags.offset, 24)
        self.assertEqual(ctypes.sizeof(thaw_cuda.CUmemAccessDesc), 12)


class DriverTest(FakeCase):
    def test_missing_library_is_cuda_unavailable(self):
        with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
            thaw_cuda.Driver("/nonexistent/libcuda.so.1")
        self.assertEqual(cm.exception.code, "CUDA_UNAVAILABLE")

    def test_path_from_environment(self):
        os.environ[thaw_cuda.LIBCUDA_ENV] = FAKE_LIBCUDA
        try:
            self.assertEqual(thaw_cuda.Driver().path, FAKE_LIBCUDA)
        finally:
            del os.environ[thaw_cuda.LIBCUDA_ENV]

    def test_failed_call_has_result_name_and_step(self):
        with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
            self.driver.call("unmap nothing", "cuMemUnmap", 0x1000, 2 * MiB)
        e = cm.exception
        self.assertEqual((e.code, e.result, e.name, e.step), ("CUDA_CALL_FAILED", 1, "CUDA_ERROR_INVALID_VALUE", "unmap nothing"))
        self.assertIn("unmap nothing: CUDA_ERROR_INVALID_VALUE (1): invalid argument", str(e))

    def test_ensure_context_sets_the_primary_context_on_a_thread_without_one(self):
        errors = []

        def other_thread():
            try:
                self.driver.ensure_context(0)
                self.driver.mem_get_info()
            except Exception as e:  # reported to the test thread
                errors.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        self.assertEqual(errors, [])


class VmmPoolTest(FakeCase):
    def test_size_rounds_up_to_granularity_and_memory_is_zeroed(self):
        with thaw_cuda.VmmPool(3 * MiB, driver=self.driver) as pool:
            self.assertEqual(pool.granularity, 2 * MiB)
            self.assertEqual(pool.size, 4 * MiB)
            self.assertEqual(pool.ptr % pool.granularity, 0)
            self.assertTrue(pool.mapped)
            self.assertEqual(self.allocated(), 4 * MiB)
            self.assertEqual(self.read(pool.ptr, 64), b"\0" * 64)
        self.assertEqual(self.allocated(), 0)

    def test_release_keeps_the_address_and_remap_gives_fresh_memory_there(self):
        pool = thaw_cuda.VmmPool(2 * MiB, driver=self.driver)
        try:
            ptr = pool.ptr
            ctypes.memset(ptr, 0x42, 16)
            pool.release()
            self.assertFalse(pool.mapped)
            self.assertEqual(pool.ptr, ptr)
            self.assertEqual(self.allocated(), 0)
            pool.release()  # idempotent
            pool.remap(zero_fill=False)
            self.assertEqual(pool.ptr, ptr)
            self.assertEqual(self.allocated(), 2 * MiB)
            # New physical memory: neither the old contents nor zeros (the fake fills it with 0xA5).
            self.assertEqual(self.read(ptr, 16), b"\xa5" * 16)
            pool.release()
            pool.remap()
            self.assertEqual(self.read(ptr, 16), b"\0" * 16)
            pool.remap()  # idempotent
            self.assertEqual(self.allocated(), 2 * MiB)
        finally:
            pool.free()
        with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
            pool.remap()
        self.assertEqual(cm.exception.code, "CUDA_INVALID_ARGUMENT")

    def test_a_failed_remap_leaves_nothing_allocated_and_can_be_retried(self):
        pool = thaw_cuda.VmmPool(2 * MiB, driver=self.driver)
        try:
            pool.release()
            os.environ["FAKE_CUDA_FAIL"] = "mem-map:error"
            with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
                pool.remap()
            self.assertEqual((cm.exception.name, cm.exception.step), ("CUDA_ERROR_UNKNOWN", "map the pool"))
            self.assertFalse(pool.mapped)
            self.assertEqual(self.allocated(), 0)
            del os.environ["FAKE_CUDA_FAIL"]
            pool.remap()
            self.assertTrue(pool.mapped)
        finally:
            pool.free()

    def test_out_of_memory_names_the_step(self):
        os.environ["FAKE_CUDA_TOTAL_MEM"] = str(8 * MiB)
        with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
            thaw_cuda.VmmPool(16 * MiB, driver=self.driver)
        self.assertEqual(cm.exception.name, "CUDA_ERROR_OUT_OF_MEMORY")
        self.assertIn("create 16777216 bytes of GPU memory", cm.exception.step)

    def test_from_free_memory_takes_a_fraction_of_what_is_free(self):
        os.environ["FAKE_CUDA_TOTAL_MEM"] = str(64 * MiB)
        with thaw_cuda.VmmPool.from_free_memory(fraction=0.5, keep_bytes=4 * MiB, driver=self.driver) as pool:
            self.assertEqual(pool.size, 28 * MiB)
        with self.assertRaises(thaw_cuda.ThawCudaError):
            thaw_cuda.VmmPool.from_free_memory(fraction=0.5, keep_bytes=64 * MiB, driver=self.driver)

    def test_cuda_array_interface(self):
        with thaw_cuda.VmmPool(4 * MiB, driver=self.driver) as pool:
            self.assertEqual(
                pool.__cuda_array_interface__,
                {"shape": (4 * MiB,), "typestr": "|u1", "data": (pool.ptr, False), "strides": None, "version": 3},
            )
            view = pool.view((2, 1024, 512), "<f2", offset=2 * MiB)
            cai = view.__cuda_array_interface__
            self.assertEqual((cai["shape"], cai["typestr"], cai["data"]), ((2, 1024, 512), "<f2", (pool.ptr + 2 * MiB, False)))
            with self.assertRaises(thaw_cuda.ThawCudaError):
                pool.view((4 * MiB,), "<f2")

    def test_as_tensor_needs_torch(self):
        try:
            import torch  # noqa: F401
        except ImportError:
            with thaw_cuda.VmmPool(2 * MiB, driver=self.driver) as pool, self.assertRaises(ImportError):
                pool.as_tensor()
        else:
            self.skipTest("torch is installed: as_tensor is checked by bench/gpu/worker.py --selftest on a GPU")


class HooksTest(FakeCase):
    def test_combine_releases_in_order_and_resumes_in_reverse(self):
        calls = []
        a = (lambda: calls.append("release a"), lambda: calls.append("resume a"))
        b = (lambda: calls.append("release b"), lambda: calls.append("resume b"))
        release, resume = thaw_cuda.combine_hooks(a, None, b)
        release()
        resume()
        self.assertEqual(calls, ["release a", "release b", "resume b", "resume a"])

    def test_vllm_and_sglang_hooks_call_the_engine(self):
        calls = []

        class FakeLLM:
            def sleep(self, level):
                calls.append(("sleep", level))

            def wake_up(self):
                calls.append(("wake_up",))

        class FakeSGLang:
            def release_memory_occupation(self, tags=None):
                calls.append(("release", tags))

            def resume_memory_occupation(self, tags=None):
                calls.append(("resume", tags))

        for release, resume in (thaw_cuda.vllm_hooks(FakeLLM(), level=2), thaw_cuda.sglang_hooks(FakeSGLang(), ["kv_cache"])):
            release()
            resume()
        self.assertEqual(calls, [("sleep", 2), ("wake_up",), ("release", ["kv_cache"]), ("resume", ["kv_cache"])])
        for make in (thaw_cuda.vllm_hooks, thaw_cuda.sglang_hooks):
            with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
                make(object())
            self.assertEqual(cm.exception.code, "CUDA_FRAMEWORK_MISSING")

    def test_torch_hooks_without_torch_do_nothing(self):
        release, resume = thaw_cuda.torch_hooks()
        self.assertIsNone(release())
        self.assertIsNone(resume())

    def test_pool_hooks_with_checkpoint_and_wait(self):
        """The worker releases the pool, says ready, and gets memory back at the same address on restore."""
        pool = thaw_cuda.VmmPool(2 * MiB, driver=self.driver)
        seen = {}
        with tempfile.TemporaryDirectory() as d:
            def agent():
                ready = os.path.join(d, thaw_worker.READY_FOR_CHECKPOINT)
                deadline = time.monotonic() + 10
                while not os.path.exists(ready) and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen["mapped_at_ready"] = pool.mapped
                seen["allocated_at_ready"] = self.allocated()
                open(os.path.join(d, thaw_worker.RESTORE_COMPLETE), "w").close()

            t = threading.Thread(target=agent)
            t.start()
            ptr = pool.ptr
            outcome = thaw_worker.checkpoint_and_wait(
                *pool.hooks(), timeout_s=10, control_dir=thaw_worker.ControlDir(d, poll_interval_s=0.01)
            )
            t.join()
        try:
            self.assertEqual(outcome, thaw_worker.Outcome.RESTORE_COMPLETE)
            self.assertEqual(seen, {"mapped_at_ready": False, "allocated_at_ready": 0})
            self.assertTrue(pool.mapped)
            self.assertEqual(pool.ptr, ptr)
            self.assertEqual(self.read(ptr, 8), b"\0" * 8)
        finally:
            pool.free()



class MemoryPayloadTest(unittest.TestCase):
    def test_tensor_and_allocator_bytes_from_torch_plus_memory_outside_it(self):
        cuda = types.SimpleNamespace(
            is_available=lambda: True, is_initialized=lambda: True, synchronize=lambda: None,
            memory_allocated=lambda: 1000, memory_reserved=lambda: 5000,
        )
        with mock.patch.dict(sys.modules, {"torch": types.SimpleNamespace(cuda=cuda)}):
            self.assertEqual(thaw_cuda.memory_payload(extra_tensor_bytes=24),
                             {"gpuTensorBytes": 1024, "gpuAllocatorReservedBytes": 5024})

    def test_nothing_without_cuda_in_use(self):
        cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: False)
        with mock.patch.dict(sys.modules, {"torch": types.SimpleNamespace(cuda=cuda)}):
            self.assertEqual(thaw_cuda.memory_payload(), {})

if __name__ == "__main__":
    unittest.main()
