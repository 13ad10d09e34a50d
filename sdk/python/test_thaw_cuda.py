"""Unit tests of thaw_cuda without a GPU: the fake CUDA driver (native/fake-libcuda) backs "device memory"
with host pages at the addresses it returns, so the pool's logic is checked through the real ctypes calls.

Run: ``python3 -m unittest test_thaw_cuda`` (builds the fake with make when it is missing).
"""

import ctypes
import hashlib
import json
import struct
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


def write_safetensors(path, tensors):
    """A minimal safetensors writer: tensors = {name: (dtype, shape, bytes)}."""
    header, blobs, at = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# A stand-in for thaw's weights service in another process: reads the files named by the worker's weights
# file into POSIX-fd shareable allocations (through the fake driver, its own process), listens on
# weights.sock and sends the fds with SCM_RIGHTS, as src/restore-engine/weights does.
STANDIN = r"""
import array, ctypes, json, os, socket, sys
sys.path.insert(0, sys.argv[1])
import thaw_cuda as tc
control, mode = sys.argv[2], sys.argv[3]
d = tc.Driver(sys.argv[4])
d.ensure_context(0)
doc = json.load(open(os.path.join(control, tc.WEIGHTS_FILE)))
fds, regions = [], []
for region in doc["regions"]:
    n = 0
    for a in region["allocations"]:
        if a["kind"] != "file":
            continue
        prop = tc._device_prop(0, tc.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        h = tc.CUmemGenericAllocationHandle()
        d.call("create", "cuMemCreate", ctypes.byref(h), a["size"], ctypes.byref(prop), 0)
        va = tc.CUdeviceptr()
        d.call("reserve", "cuMemAddressReserve", ctypes.byref(va), a["size"], 0, 0, 0)
        d.call("map", "cuMemMap", va.value, a["size"], 0, h, 0)
        acc = tc.CUmemAccessDesc()
        acc.location.type, acc.location.id, acc.flags = 1, 0, 3
        d.call("access", "cuMemSetAccess", va.value, a["size"], ctypes.byref(acc), 1)
        src = a["source"]
        with open(src["path"], "rb") as f:
            f.seek(src["fileOffset"])
            data = f.read(src["length"])
        if mode == "corrupt":
            data = b"\xff" * len(data)
        d.call("copy", "cuMemcpyHtoD_v2", va.value, data, len(data))
        fd = ctypes.c_int(-1)
        d.call("export", "cuMemExportToShareableHandle", ctypes.byref(fd), h, 1, 0)
        fds.append(fd.value if mode != "bad-fd" else os.open("/dev/null", os.O_RDONLY))
        n += 1
    regions.append({"name": region["name"], "fds": n})
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(os.path.join(control, tc.WEIGHTS_SOCKET))
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
msg = json.dumps({"schema": tc.WEIGHTS_SCHEMA, "regions": regions}).encode()
conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
conn.shutdown(socket.SHUT_WR)
answer = b""
while True:
    chunk = conn.recv(4096)
    if not chunk:
        break
    answer += chunk
conn.close()
if len(sys.argv) > 5:
    with open(sys.argv[5], "wb") as f:
        f.write(answer)
"""


class WeightsRegionTest(FakeCase):
    def setUp(self):
        super().setUp()
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.a = os.path.join(self.tmp.name, "model-00001.safetensors")
        self.b = os.path.join(self.tmp.name, "model-00002.safetensors")
        self.wq = bytes(range(256)) * 64  # 16 KiB of bf16 bits
        self.norm = b"\x01\x02" * 8
        self.big = os.urandom(3 * MiB)  # spans two granules of the fake
        write_safetensors(self.a, {"layer.0.wq": ("BF16", (64, 128), self.wq), "norm": ("BF16", (8,), self.norm)})
        write_safetensors(self.b, {"embed": ("U8", (3, MiB), self.big)})
        self.control = os.path.join(self.tmp.name, "control")
        os.mkdir(self.control)

    def sha(self, path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def test_load_maps_every_tensor_at_its_offset_and_records_each_files_source(self):
        with thaw_cuda.WeightsRegion.load([self.a, self.b], driver=self.driver) as region:
            self.assertEqual(self.read(region.view("layer.0.wq").__cuda_array_interface__["data"][0], len(self.wq)), self.wq)
            self.assertEqual(self.read(region.view("norm").__cuda_array_interface__["data"][0], len(self.norm)), self.norm)
            self.assertEqual(self.read(region.view("embed").__cuda_array_interface__["data"][0], len(self.big)), self.big)
            cai = region.view("layer.0.wq").__cuda_array_interface__
            self.assertEqual((cai["shape"], cai["typestr"]), ((64, 128), "<u2"))
            d = region.describe()
            self.assertEqual(int(d["va"], 16), region.ptr)
            self.assertEqual([a["offset"] for a in d["allocations"]], [0, 2 * MiB])
            self.assertEqual([a["size"] for a in d["allocations"]], [2 * MiB, 4 * MiB])
            src = d["allocations"][1]["source"]
            self.assertEqual((src["path"], src["length"], src["sha256"], src["fileSize"]),
                             (self.b, len(self.big), self.sha(self.b), os.path.getsize(self.b)))
            with open(self.b, "rb") as f:
                f.seek(src["fileOffset"])
                self.assertEqual(f.read(16), self.big[:16])
            self.assertEqual(self.allocated(), 6 * MiB)
        self.assertEqual(self.allocated(), 0)

    def test_release_frees_the_memory_keeps_the_address_and_reload_restores_the_bytes(self):
        with thaw_cuda.WeightsRegion.load([self.a, self.b], driver=self.driver) as region:
            ptr = region.view("embed").__cuda_array_interface__["data"][0]
            region.release()
            self.assertFalse(region.mapped)
            self.assertEqual(self.allocated(), 0)
            region.release()  # idempotent
            region.reload()
            self.assertEqual(region.view("embed").__cuda_array_interface__["data"][0], ptr)
            self.assertEqual(self.read(ptr, len(self.big)), self.big)

    def test_reload_refuses_a_file_that_changed(self):
        with thaw_cuda.WeightsRegion.load([self.b], driver=self.driver) as region:
            region.release()
            write_safetensors(self.b, {"embed": ("U8", (3, MiB), os.urandom(3 * MiB))})
            with self.assertRaises(thaw_cuda.ThawCudaError):
                region.reload()

    def test_raw_allocations_are_recorded_and_not_released(self):
        with thaw_cuda.WeightsRegion(8 * MiB, driver=self.driver) as region:
            off = region.add_raw(1)
            self.assertEqual(region.describe()["allocations"], [{"offset": off, "size": 2 * MiB, "kind": "raw"}])
            region.release()
            self.assertEqual(self.allocated(), 2 * MiB)

    def test_malformed_headers_are_refused(self):
        bad = os.path.join(self.tmp.name, "bad.safetensors")
        for content in (b"\x01", struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 2) + b"[]",
                        struct.pack("<Q", 60) + b'{"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}'.ljust(60)):
            with open(bad, "wb") as f:
                f.write(content)
            with self.assertRaises(thaw_cuda.ThawCudaError, msg=content):
                thaw_cuda.WeightsRegion.load([bad], driver=self.driver)
        self.assertEqual(self.allocated(), 0)

    def run_standin(self, mode, answer_file=None):
        proc = subprocess.Popen([sys.executable, "-c", STANDIN, HERE, self.control, mode, FAKE_LIBCUDA]
                                + ([answer_file] if answer_file else []), stdout=subprocess.PIPE)
        self.addCleanup(proc.wait)
        self.assertEqual(proc.stdout.readline().strip(), b"listening")
        proc.stdout.close()
        return proc

    def test_handles_from_another_process_map_at_the_recorded_address(self):
        with thaw_cuda.WeightsRegion.load([self.a, self.b], driver=self.driver) as region:
            ptr = region.ptr
            thaw_cuda.write_weights_file([region], self.control)
            region.release()
            self.run_standin("ok")
            handles = thaw_cuda.receive_weight_handles(self.control, timeout_s=10)
            self.assertEqual(list(handles), ["weights"])
            region.map_handles(handles["weights"])
            self.assertEqual(region.ptr, ptr)
            self.assertEqual(self.read(region.view("embed").__cuda_array_interface__["data"][0], len(self.big)), self.big)
            self.assertEqual(self.read(region.view("layer.0.wq").__cuda_array_interface__["data"][0], len(self.wq)), self.wq)
            for fd in handles["weights"]:  # map_handles closed them
                with self.assertRaises(OSError):
                    os.fstat(fd)

    def test_a_handle_that_cannot_be_imported_leaves_nothing_mapped(self):
        with thaw_cuda.WeightsRegion.load([self.a, self.b], driver=self.driver) as region:
            thaw_cuda.write_weights_file([region], self.control)
            region.release()
            self.run_standin("bad-fd")
            handles = thaw_cuda.receive_weight_handles(self.control, timeout_s=10)
            with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
                region.map_handles(handles["weights"])
            self.assertEqual(cm.exception.step, "import a weights handle")
            self.assertFalse(any(a.handle is not None for a in region.allocations))
            self.assertEqual(self.allocated(), 0)
            region.reload()  # the fallback still works at the same address
            self.assertEqual(self.read(region.view("norm").__cuda_array_interface__["data"][0], len(self.norm)), self.norm)

    def test_weights_hooks_map_thaws_handles_during_the_wait_and_reload_otherwise(self):
        cd = thaw_worker.ControlDir(self.control)
        with thaw_cuda.WeightsRegion.load([self.b], driver=self.driver) as region:
            release, resume = region.hooks(cd, timeout_s=10)
            release()
            with open(os.path.join(self.control, thaw_cuda.WEIGHTS_FILE)) as f:
                self.assertEqual(json.load(f)["schema"], thaw_cuda.WEIGHTS_SCHEMA)
            self.assertEqual(self.allocated(), 0)
            resume()  # no hand-over during the wait (checkpoint-complete): reload from the file
            self.assertEqual(self.read(region.ptr, 64), self.big[:64])
            release()
            # The stand-in sends other bytes than the file's: seeing them proves the handles were mapped, by the
            # wait (before restore-complete is looked at), and thaw was told so.
            answer = os.path.join(self.tmp.name, "answer.json")
            proc = self.run_standin("corrupt", answer)
            with open(os.path.join(self.control, thaw_worker.RESTORE_COMPLETE), "w") as f:
                f.write("{}")
            self.assertEqual(cd.wait(timeout_s=10), thaw_worker.Outcome.RESTORE_COMPLETE)
            proc.wait(10)
            with open(answer) as f:
                self.assertEqual(json.load(f), {"ok": True})
            resume()
            self.assertEqual(self.read(region.ptr, 64), b"\xff" * 64)

    def test_a_handle_that_cannot_be_mapped_is_answered_not_ok_and_nothing_stays_mapped(self):
        with thaw_cuda.WeightsRegion.load([self.a, self.b], driver=self.driver) as region:
            thaw_cuda.write_weights_file([region], self.control)
            region.release()
            answer = os.path.join(self.tmp.name, "answer.json")
            proc = self.run_standin("bad-fd", answer)
            self.assertFalse(thaw_cuda.accept_weight_handles([region], self.control, timeout_s=10))
            proc.wait(10)
            with open(answer) as f:
                got = json.load(f)
            self.assertEqual(got["ok"], False)
            self.assertIn("import a weights handle", got["error"])
            self.assertFalse(any(a.handle is not None for a in region.allocations))
            self.assertEqual(self.allocated(), 0)

    def test_export_needs_a_shareable_allocation(self):
        h = thaw_cuda.CUmemGenericAllocationHandle()
        prop = thaw_cuda._device_prop(0)
        self.driver.ensure_context(0)
        self.driver.call("create", "cuMemCreate", ctypes.byref(h), 2 * MiB, ctypes.byref(prop), 0)
        try:
            fd = ctypes.c_int(-1)
            with self.assertRaises(thaw_cuda.ThawCudaError) as cm:
                self.driver.call("export", "cuMemExportToShareableHandle", ctypes.byref(fd), h, 1, 0)
            self.assertEqual(cm.exception.name, "CUDA_ERROR_NOT_PERMITTED")
        finally:
            self.driver.call("release", "cuMemRelease", h)
