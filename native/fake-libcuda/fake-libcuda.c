/*
 * A fake CUDA driver (libcuda.so.1) for machines without a GPU: the entry points thaw's bindings
 * (src/cuda/libcuda.ts) and the Python helper (sdk/python/thaw_cuda.py) call, with the real signatures,
 * struct layouts and CUresult numbers, so they are loaded through exactly the same code paths as the real
 * library. Configuration and failure injection: fake-common.h.
 *
 * The checkpoint API is a per-pid state machine, as the driver documents it (CUDA driver API, group
 * CUDA_CHECKPOINT): running -lock-> locked -checkpoint-> checkpointed -restore-> locked -unlock-> running;
 * a call in the wrong state returns CUDA_ERROR_ILLEGAL_STATE; a lock that times out leaves the process
 * running. Reserved fields of the argument structs must be zero (the driver says "must be zeroed"); the
 * fake enforces it, which is how the tests check that the bindings lay the structs out right.
 *
 * Seen on the H100 (driver 580.159.04, bench/gpu/check-real-driver.sh) and done the same here: a call in
 * the wrong state returns CUDA_ERROR_ILLEGAL_STATE and changes nothing; a GPU map naming an absent GPU
 * returns CUDA_ERROR_INVALID_VALUE and leaves the process checkpointed; a pid that is not a CUDA process
 * gets CUDA_ERROR_NOT_INITIALIZED (from getState and getRestoreThreadId alike); the calling process counts
 * as a CUDA process once it has called cuInit.
 *
 * Choices the documentation does not settle (the real driver may differ): restoring without a GPU
 * map when the checkpoint's GPU is gone gets CUDA_ERROR_INVALID_DEVICE; a GPU map that leaves out the
 * checkpointed GPU gets CUDA_ERROR_INVALID_VALUE; the restore thread id is pid + 1.
 *
 * The VMM calls back "device memory" with host memory at the returned addresses: a reserved range is
 * PROT_NONE, a mapping gets fresh pages filled with 0xA5 (real cuMemCreate memory is not zeroed), readable
 * and writable after cuMemSetAccess, and gone after cuMemUnmap. So a test can see that a remap gives new
 * memory at the same address and that zero-fill works.
 *
 * Shareable memory: an allocation created with requestedHandleTypes = POSIX_FILE_DESCRIPTOR (1) is a memfd
 * (named FAKE_MEMFD_NAME, filled with 0xA5 once at creation); its mappings are MAP_SHARED, so its bytes
 * outlive an unmap while the allocation lives, as real physical memory does. cuMemExportToShareableHandle
 * gives a new fd (dup) that the caller owns; cuMemImportFromShareableHandle accepts only such a memfd (any
 * other fd: CUDA_ERROR_INVALID_VALUE, the fake's choice), keeps its own dup, and the caller still owns and
 * closes the fd it passed - what the driver documents. Exporting an allocation created without the POSIX
 * handle type returns CUDA_ERROR_NOT_PERMITTED (fake's choice). cuMemHostAlloc is page-aligned host memory;
 * cuMemcpyHtoD/DtoH(_Async) copy to/from a read-write mapping wholly inside mapped memory, else
 * CUDA_ERROR_INVALID_VALUE; the async ones complete before returning (streams are not modelled).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fake-common.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef void *CUcontext;

/* CUresult values, from cuda.h's enum cudaError_enum (CUDA 13.0 driver API reference). */
enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_ILLEGAL_STATE = 401,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_PERMITTED = 800,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_TIMEOUT = 909,
  CUDA_ERROR_UNKNOWN = 999,
};

/* CUprocessState (cuda.h, CUDA 12.8+). */
enum { STATE_RUNNING = 0, STATE_LOCKED = 1, STATE_CHECKPOINTED = 2, STATE_FAILED = 3 };

static const struct { int code; const char *name; const char *text; } ERRORS[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT", "the wait operation has timed out"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static const struct fake_kind KINDS[] = {
    {"error", CUDA_ERROR_UNKNOWN},          {"timeout", CUDA_ERROR_TIMEOUT},
    {"missing-gpu", CUDA_ERROR_INVALID_DEVICE}, {"not-permitted", CUDA_ERROR_NOT_PERMITTED},
    {"not-supported", CUDA_ERROR_NOT_SUPPORTED}, {"invalid", CUDA_ERROR_INVALID_VALUE},
    {NULL, 0},
};

#define MAX_PIDS 256
#define MAX_ALLOCS 1024
#define MAX_RANGES 256
#define MAX_PAIRS 16
#define GRANULARITY (2ULL << 20) /* what cuMemGetAllocationGranularity reports on an H100 */
#define MAX_HOST 256
#define HANDLE_TYPE_POSIX_FD 1 /* CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR */
#define FAKE_MEMFD_NAME "fake-cuda-alloc"
static CUresult new_alloc(CUmemGenericAllocationHandle *handle, size_t size, int fd);
static int device_span_rw(CUdeviceptr ptr, size_t n);

static pthread_mutex_t lock_ = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static struct { int pid, state, has_gpu; unsigned char gpu[16]; } procs[MAX_PIDS];
static int nprocs;
static unsigned last_lock_timeout_ms;
static int last_pair_count = -1;
static unsigned char last_pairs[MAX_PAIRS][32];
/* VMM bookkeeping: physical allocations, reserved ranges, mappings. */
/* fd >= 0: created with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (or imported): the memory is a memfd that
 * export hands out (dup) and import maps, so two processes share it as they share real GPU memory. */
static struct { int live, released; size_t size; int mapped; int fd; } allocs[MAX_ALLOCS];
static struct { CUdeviceptr base; size_t size; int live; } ranges[MAX_RANGES];
static struct { CUdeviceptr ptr; size_t size; CUmemGenericAllocationHandle handle; int live, access; } maps[MAX_ALLOCS];
static struct { void *ptr; size_t size; } hosts[MAX_HOST];
static __thread CUcontext current_ctx;

static void delay(void) {
  unsigned long long ms = fake_get_ull("FAKE_CUDA_DELAY_MS", 0);
  if (!ms) return;
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static int all_zero(const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++)
    if (b[i]) return 0;
  return 1;
}

static int find_proc(int pid, int create) {
  for (int i = 0; i < nprocs; i++)
    if (procs[i].pid == pid) return i;
  if (!create || nprocs == MAX_PIDS) return -1;
  procs[nprocs].pid = pid;
  procs[nprocs].state = STATE_RUNNING;
  procs[nprocs].has_gpu = 0;
  return nprocs++;
}

static int gpu_present(const unsigned char uuid[16]) {
  unsigned char gpus[FAKE_MAX_GPUS][16];
  int n = fake_gpus(gpus);
  for (int i = 0; i < n; i++)
    if (memcmp(gpus[i], uuid, 16) == 0) return 1;
  return 0;
}

/* ---- errors, init, version, devices ---- */

FAKE_EXPORT CUresult cuGetErrorName(CUresult error, const char **pStr) {
  if (!pStr) return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
    if (ERRORS[i].code == error) return *pStr = ERRORS[i].name, CUDA_SUCCESS;
  *pStr = NULL; /* as the real one does for a value it does not know */
  return CUDA_ERROR_INVALID_VALUE;
}

FAKE_EXPORT CUresult cuGetErrorString(CUresult error, const char **pStr) {
  if (!pStr) return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
    if (ERRORS[i].code == error) return *pStr = ERRORS[i].text, CUDA_SUCCESS;
  *pStr = NULL;
  return CUDA_ERROR_INVALID_VALUE;
}

FAKE_EXPORT CUresult cuInit(unsigned int flags) {
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  int injected = fake_injected("init", -1, KINDS);
  if (injected) return injected;
  unsigned char gpus[FAKE_MAX_GPUS][16];
  if (fake_gpus(gpus) == 0) return CUDA_ERROR_NO_DEVICE;
  pthread_mutex_lock(&lock_);
  initialized = 1;
  pthread_mutex_unlock(&lock_);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDriverGetVersion(int *version) {
  if (!version) return CUDA_ERROR_INVALID_VALUE;
  *version = (int)fake_get_ull("FAKE_CUDA_DRIVER_VERSION", 13000);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDeviceGetCount(int *count) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!count) return CUDA_ERROR_INVALID_VALUE;
  unsigned char gpus[FAKE_MAX_GPUS][16];
  *count = fake_gpus(gpus);
  return CUDA_SUCCESS;
}

static CUresult device_uuid(CUdevice dev, unsigned char out[16]) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  unsigned char gpus[FAKE_MAX_GPUS][16];
  int n = fake_gpus(gpus);
  if (dev < 0 || dev >= n) return CUDA_ERROR_INVALID_DEVICE;
  memcpy(out, gpus[dev], 16);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  unsigned char uuid[16];
  if (!device) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = device_uuid(ordinal, uuid);
  if (r == CUDA_SUCCESS) *device = ordinal;
  return r;
}

FAKE_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
  unsigned char uuid[16];
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = device_uuid(dev, uuid);
  if (r != CUDA_SUCCESS) return r;
  const char *model = fake_get("FAKE_CUDA_GPU_NAME");
  snprintf(name, (size_t)len, "%s", model ? model : FAKE_DEFAULT_NAME);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDeviceGetUuid_v2(unsigned char *uuid, CUdevice dev) {
  if (!uuid) return CUDA_ERROR_INVALID_VALUE;
  return device_uuid(dev, uuid);
}

FAKE_EXPORT CUresult cuDeviceGetUuid(unsigned char *uuid, CUdevice dev) { return cuDeviceGetUuid_v2(uuid, dev); }

FAKE_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
  unsigned char uuid[16];
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = device_uuid(dev, uuid);
  if (r == CUDA_SUCCESS) *bytes = (size_t)fake_get_ull("FAKE_CUDA_TOTAL_MEM", FAKE_DEFAULT_MEM);
  return r;
}

/* ---- tensor-parallel workers: a process per GPU, ranks in a collective (fake-only settings) ----
 *
 *   FAKE_CUDA_PID_GPU     "pid:ordinal,..." the GPU a pid-mode process is checkpointed on (default ordinal 0),
 *                         so a restore's GPU map must cover that rank's own GPU
 *   FAKE_CUDA_COLLECTIVE  comma list of pids running collectives with one another (ranks not quiesced): a
 *                         member's in-flight all-reduce waits for its peers, so locking it while a peer is
 *                         already locked never completes, as with the real driver, whose lock waits for the
 *                         process's outstanding work. The fake waits the lock's timeout (at most 5 s) and
 *                         returns CUDA_ERROR_TIMEOUT with the process left running.
 */
static int tp_pid_gpu_ordinal(int pid) {
  const char *p = fake_get("FAKE_CUDA_PID_GPU");
  while (p && *p) {
    while (*p == ',' || *p == ' ') p++;
    char *end;
    long who = strtol(p, &end, 10);
    if (end == p) break;
    if (*end == ':') {
      long ordinal = strtol(end + 1, &end, 10);
      if (who == pid) return (int)ordinal;
    }
    p = end;
  }
  return 0;
}

/* True when `pid` is in a collective (FAKE_CUDA_COLLECTIVE) with a peer that is locked or checkpointed. Under lock_. */
static int tp_collective_blocks(int pid) {
  const char *list = fake_get("FAKE_CUDA_COLLECTIVE");
  if (!fake_list_has_pid(list, pid)) return 0;
  for (int i = 0; i < nprocs; i++)
    if (procs[i].pid != pid && procs[i].state != STATE_RUNNING && fake_list_has_pid(list, procs[i].pid)) return 1;
  return 0;
}

static void tp_wait_ms(unsigned ms) {
  if (ms > 5000) ms = 5000;
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ---- the checkpoint API (cuda.h, group CUDA_CHECKPOINT) ---- */

/*
 * The process a checkpoint call is about: a pid-mode slot in procs[] (FAKE_CUDA_PIDS, the caller), or a
 * token process whose state lives in its own memory (fake-common.h, token mode).
 */
struct target {
  int pid, slot, is_token;
  struct fake_token token;
};

static int target_state(const struct target *t) { return t->is_token ? t->token.state : procs[t->slot].state; }

static CUresult target_set_state(struct target *t, int state) {
  if (!t->is_token) {
    procs[t->slot].state = state;
    return CUDA_SUCCESS;
  }
  /* The process's memory could not be written (it exited, or no ptrace access): as if the driver failed. */
  return fake_write_token_state(t->pid, &t->token, state) == 0 ? CUDA_SUCCESS : CUDA_ERROR_UNKNOWN;
}

/* Validates what every checkpoint call shares and finds the process the call is about. */
static CUresult checkpoint_entry(const char *op, int pid, struct target *t) {
  t->pid = pid;
  t->slot = -1;
  t->is_token = fake_token_mode() && pid > 0 && fake_read_token(pid, &t->token);
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  int injected = fake_injected(op, pid, KINDS);
  if (injected) return injected;
  if (t->is_token) return CUDA_SUCCESS;
  /* The real driver counts a process that called cuInit as a CUDA process (seen on r580): so does the fake. */
  if (!fake_is_cuda_pid(pid) && !(pid == getpid() && initialized)) return CUDA_ERROR_NOT_INITIALIZED;
  t->slot = find_proc(pid, 1);
  return t->slot < 0 ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
}

/* Token mode: one line of the call log per state-changing call on a token process, failures included. */
static void log_call(const char *op, const struct target *t, CUresult r, int pairs) {
  if (!t->is_token) return;
  const char *name = NULL;
  char line[512];
  cuGetErrorName(r, &name);
  int n = snprintf(line, sizeof line, "%s %s %d %s", op, t->token.id, t->pid, name ? name : "CUresult(?)");
  if (pairs >= 0 && n > 0 && (size_t)n < sizeof line) snprintf(line + n, sizeof line - (size_t)n, " pairs=%d", pairs);
  fake_log_call(line);
}

FAKE_EXPORT CUresult cuCheckpointProcessGetState(int pid, int *state) {
  struct target t;
  if (!state) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock_);
  CUresult r = checkpoint_entry("state", pid, &t);
  if (r == CUDA_SUCCESS) *state = target_state(&t);
  pthread_mutex_unlock(&lock_);
  return r;
}

FAKE_EXPORT CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
  struct target t;
  if (!tid) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock_);
  CUresult r = checkpoint_entry("restore-tid", pid, &t);
  if (r == CUDA_SUCCESS) *tid = pid + 1;
  pthread_mutex_unlock(&lock_);
  return r;
}

/* CUcheckpointLockArgs: {unsigned timeoutMs; unsigned reserved0; cuuint64_t reserved1[7];} = 64 bytes. */
FAKE_EXPORT CUresult cuCheckpointProcessLock(int pid, const unsigned char *args) {
  struct target t = {0};
  delay();
  pthread_mutex_lock(&lock_);
  CUresult r = CUDA_SUCCESS;
  unsigned timeout_ms = 0;
  if (args) {
    memcpy(&timeout_ms, args, 4);
    if (!all_zero(args + 4, 60)) r = CUDA_ERROR_INVALID_VALUE;
  }
  last_lock_timeout_ms = timeout_ms;
  if (r == CUDA_SUCCESS) r = checkpoint_entry("lock", pid, &t);
  if (r == CUDA_SUCCESS && !t.is_token && target_state(&t) == STATE_RUNNING && tp_collective_blocks(pid)) {
    /* A rank stuck in a collective with a locked peer: the lock waits out its timeout (outside the mutex). */
    log_call("lock", &t, CUDA_ERROR_TIMEOUT, -1);
    pthread_mutex_unlock(&lock_);
    tp_wait_ms(timeout_ms);
    return CUDA_ERROR_TIMEOUT;
  }
  if (r == CUDA_SUCCESS) r = target_state(&t) != STATE_RUNNING ? CUDA_ERROR_ILLEGAL_STATE : target_set_state(&t, STATE_LOCKED);
  log_call("lock", &t, r, -1);
  pthread_mutex_unlock(&lock_);
  return r;
}

/* CUcheckpointCheckpointArgs: {cuuint64_t reserved[8];} = 64 bytes (13.4 puts a NULL-able pointer first). */
FAKE_EXPORT CUresult cuCheckpointProcessCheckpoint(int pid, const unsigned char *args) {
  struct target t = {0};
  delay();
  pthread_mutex_lock(&lock_);
  CUresult r = args && !all_zero(args, 64) ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
  if (r == CUDA_SUCCESS) r = checkpoint_entry("checkpoint", pid, &t);
  if (r == CUDA_SUCCESS) {
    if (target_state(&t) != STATE_LOCKED) {
      r = CUDA_ERROR_ILLEGAL_STATE;
    } else {
      r = target_set_state(&t, STATE_CHECKPOINTED);
      if (r == CUDA_SUCCESS && !t.is_token) {
        /* The GPU a pid-mode process was checkpointed on (FAKE_CUDA_PID_GPU; token mode does not track it). */
        unsigned char gpus[FAKE_MAX_GPUS][16];
        int ngpus = fake_gpus(gpus);
        int ordinal = tp_pid_gpu_ordinal(pid);
        procs[t.slot].has_gpu = ngpus > 0 && ordinal >= 0 && ordinal < ngpus;
        if (procs[t.slot].has_gpu) memcpy(procs[t.slot].gpu, gpus[ordinal], 16);
      }
    }
  }
  log_call("checkpoint", &t, r, -1);
  pthread_mutex_unlock(&lock_);
  return r;
}

/*
 * CUcheckpointRestoreArgs, 64 bytes: CUcheckpointGpuPair *gpuPairs @0; unsigned gpuPairsCount @8; the
 * rest reserved and zero (13.0: char reserved[52-8] + cuuint64_t reserved1; 13.4: padding0 @12 and
 * customStorageInfo_out @16, which must be NULL for a host-memory restore). CUcheckpointGpuPair is
 * {CUuuid oldUuid; CUuuid newUuid;} = 32 bytes.
 */
FAKE_EXPORT CUresult cuCheckpointProcessRestore(int pid, const unsigned char *args) {
  struct target t = {0};
  delay();
  pthread_mutex_lock(&lock_);
  const unsigned char *pairs = NULL;
  unsigned count = 0;
  CUresult r = CUDA_SUCCESS;
  if (args) {
    memcpy(&pairs, args, sizeof pairs);
    memcpy(&count, args + 8, 4);
    if (!all_zero(args + 12, 52) || (count > 0 && !pairs) || count > MAX_PAIRS) r = CUDA_ERROR_INVALID_VALUE;
  }
  if (r == CUDA_SUCCESS) r = checkpoint_entry("restore", pid, &t);
  if (r == CUDA_SUCCESS && target_state(&t) != STATE_CHECKPOINTED) r = CUDA_ERROR_ILLEGAL_STATE;
  int has_gpu = r == CUDA_SUCCESS && !t.is_token && procs[t.slot].has_gpu;
  if (r == CUDA_SUCCESS && count > 0) {
    int covers_checkpointed = !has_gpu;
    for (unsigned i = 0; i < count && r == CUDA_SUCCESS; i++) {
      if (has_gpu && memcmp(pairs + 32 * i, procs[t.slot].gpu, 16) == 0) covers_checkpointed = 1;
      if (!gpu_present(pairs + 32 * i + 16)) r = CUDA_ERROR_INVALID_VALUE;
    }
    if (!covers_checkpointed) r = CUDA_ERROR_INVALID_VALUE; /* "must contain every checkpointed GPU" */
  } else if (r == CUDA_SUCCESS && has_gpu && !gpu_present(procs[t.slot].gpu)) {
    r = CUDA_ERROR_INVALID_DEVICE;
  }
  if (r == CUDA_SUCCESS) r = target_set_state(&t, STATE_LOCKED);
  if (r == CUDA_SUCCESS) {
    last_pair_count = (int)count;
    if (count) memcpy(last_pairs, pairs, 32 * count);
  }
  log_call("restore", &t, r, (int)count);
  pthread_mutex_unlock(&lock_);
  return r;
}

/* CUcheckpointUnlockArgs: {cuuint64_t reserved[8];} = 64 bytes. */
FAKE_EXPORT CUresult cuCheckpointProcessUnlock(int pid, const unsigned char *args) {
  struct target t = {0};
  delay();
  pthread_mutex_lock(&lock_);
  CUresult r = args && !all_zero(args, 64) ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
  if (r == CUDA_SUCCESS) r = checkpoint_entry("unlock", pid, &t);
  if (r == CUDA_SUCCESS) r = target_state(&t) != STATE_LOCKED ? CUDA_ERROR_ILLEGAL_STATE : target_set_state(&t, STATE_RUNNING);
  log_call("unlock", &t, r, -1);
  pthread_mutex_unlock(&lock_);
  return r;
}

/* ---- contexts and the virtual memory management (VMM) API, for sdk/python/thaw_cuda.py ---- */

FAKE_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
  unsigned char uuid[16];
  if (!ctx) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = device_uuid(dev, uuid);
  if (r == CUDA_SUCCESS) *ctx = (CUcontext)(uintptr_t)(0x1000 + dev);
  return r;
}

FAKE_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
  unsigned char uuid[16];
  return device_uuid(dev, uuid);
}

FAKE_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  current_ctx = ctx;
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!ctx) return CUDA_ERROR_INVALID_VALUE;
  *ctx = current_ctx;
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuCtxSynchronize(void) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  return current_ctx ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

static size_t allocated_bytes(void) {
  size_t total = 0;
  for (int i = 0; i < MAX_ALLOCS; i++)
    if (allocs[i].live) total += allocs[i].size;
  return total;
}

FAKE_EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!current_ctx) return CUDA_ERROR_INVALID_CONTEXT;
  if (!free_bytes || !total_bytes) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock_);
  *total_bytes = (size_t)fake_get_ull("FAKE_CUDA_TOTAL_MEM", FAKE_DEFAULT_MEM);
  size_t used = allocated_bytes();
  *free_bytes = used > *total_bytes ? 0 : *total_bytes - used;
  pthread_mutex_unlock(&lock_);
  return CUDA_SUCCESS;
}

/*
 * CUmemAllocationProp (cuda.h): {int type; int requestedHandleTypes; CUmemLocation{int type; int id} location;
 * void *win32HandleMetaData; {u8 compressionType; u8 gpuDirectRDMACapable; u16 usage; u8 reserved[4]}
 * allocFlags;} = 32 bytes. The fake accepts type PINNED (1) on location DEVICE (1) of a present GPU.
 */
static CUresult check_prop(const int *prop) {
  if (!prop) return CUDA_ERROR_INVALID_VALUE;
  if (prop[0] != 1 || prop[2] != 1) return CUDA_ERROR_INVALID_VALUE;
  unsigned char gpus[FAKE_MAX_GPUS][16];
  if (prop[3] < 0 || prop[3] >= fake_gpus(gpus)) return CUDA_ERROR_INVALID_DEVICE;
  if (!all_zero((const unsigned char *)prop + 28, 4)) return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuMemGetAllocationGranularity(size_t *granularity, const int *prop, int option) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!granularity || (option != 0 && option != 1)) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = check_prop(prop);
  if (r == CUDA_SUCCESS) *granularity = GRANULARITY;
  return r;
}

FAKE_EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                         unsigned long long flags) {
  (void)alignment;
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!ptr || size == 0 || size % GRANULARITY || addr || flags) return CUDA_ERROR_INVALID_VALUE;
  void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  pthread_mutex_lock(&lock_);
  int i = 0;
  while (i < MAX_RANGES && ranges[i].live) i++;
  if (i == MAX_RANGES) {
    pthread_mutex_unlock(&lock_);
    munmap(p, size);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  ranges[i].base = (CUdeviceptr)(uintptr_t)p;
  ranges[i].size = size;
  ranges[i].live = 1;
  pthread_mutex_unlock(&lock_);
  *ptr = ranges[i].base;
  return CUDA_SUCCESS;
}

static int mapping_in(CUdeviceptr base, size_t size) {
  for (int i = 0; i < MAX_ALLOCS; i++)
    if (maps[i].live && maps[i].ptr < base + size && base < maps[i].ptr + maps[i].size) return 1;
  return 0;
}

FAKE_EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  pthread_mutex_lock(&lock_);
  CUresult r = CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; i < MAX_RANGES; i++) {
    if (ranges[i].live && ranges[i].base == ptr && ranges[i].size == size && !mapping_in(ptr, size)) {
      munmap((void *)(uintptr_t)ptr, size);
      ranges[i].live = 0;
      r = CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&lock_);
  return r;
}

FAKE_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const int *prop,
                                 unsigned long long flags) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!handle || size == 0 || size % GRANULARITY || flags) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = check_prop(prop);
  if (r != CUDA_SUCCESS) return r;
  if (prop[1] != 0 && prop[1] != HANDLE_TYPE_POSIX_FD) return CUDA_ERROR_NOT_SUPPORTED;
  int injected = fake_injected("mem-create", -1, KINDS);
  if (injected) return injected;
  int fd = -1;
  if (prop[1] == HANDLE_TYPE_POSIX_FD) {
    fd = memfd_create(FAKE_MEMFD_NAME, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
      if (fd >= 0) close(fd);
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    /* Sealed against resizing: an importer can trust the size it sees. */
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      close(fd);
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memset(p, 0xA5, size);
    munmap(p, size);
  }
  r = new_alloc(handle, size, fd);
  if (r != CUDA_SUCCESS && fd >= 0) close(fd);
  return r;
}

/* Records an allocation (taking ownership of fd when it succeeds). */
static CUresult new_alloc(CUmemGenericAllocationHandle *handle, size_t size, int fd) {
  CUresult r = CUDA_SUCCESS;
  pthread_mutex_lock(&lock_);
  size_t total = (size_t)fake_get_ull("FAKE_CUDA_TOTAL_MEM", FAKE_DEFAULT_MEM);
  int i = 0;
  while (i < MAX_ALLOCS && allocs[i].live) i++;
  if (i == MAX_ALLOCS || allocated_bytes() + size > total) {
    r = CUDA_ERROR_OUT_OF_MEMORY;
  } else {
    allocs[i].live = 1;
    allocs[i].released = 0;
    allocs[i].mapped = 0;
    allocs[i].size = size;
    allocs[i].fd = fd;
    *handle = (CUmemGenericAllocationHandle)(i + 1);
  }
  pthread_mutex_unlock(&lock_);
  return r;
}

static int alloc_index(CUmemGenericAllocationHandle h) {
  if (h < 1 || h > MAX_ALLOCS) return -1;
  int i = (int)h - 1;
  return allocs[i].live && !allocs[i].released ? i : -1;
}

/* The driver frees a released allocation once its last mapping is gone. */
static void maybe_free(int i) {
  if (allocs[i].released && allocs[i].mapped == 0) {
    allocs[i].live = 0;
    if (allocs[i].fd >= 0) close(allocs[i].fd);
    allocs[i].fd = -1;
  }
}

FAKE_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  pthread_mutex_lock(&lock_);
  int i = alloc_index(handle);
  if (i >= 0) {
    allocs[i].released = 1;
    maybe_free(i);
  }
  pthread_mutex_unlock(&lock_);
  return i >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

FAKE_EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                              unsigned long long flags) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (offset || flags || size == 0 || size % GRANULARITY) return CUDA_ERROR_INVALID_VALUE;
  int injected = fake_injected("mem-map", -1, KINDS);
  if (injected) return injected;
  pthread_mutex_lock(&lock_);
  CUresult r = CUDA_SUCCESS;
  int a = alloc_index(handle);
  int inside = 0;
  for (int i = 0; i < MAX_RANGES; i++)
    if (ranges[i].live && ptr >= ranges[i].base && ptr + size <= ranges[i].base + ranges[i].size) inside = 1;
  int slot = 0;
  while (slot < MAX_ALLOCS && maps[slot].live) slot++;
  if (a < 0) r = CUDA_ERROR_INVALID_HANDLE;
  else if (!inside || size > allocs[a].size || mapping_in(ptr, size) || slot == MAX_ALLOCS) r = CUDA_ERROR_INVALID_VALUE;
  if (r == CUDA_SUCCESS) {
    /* Fresh pages with garbage in them (new physical memory is not zeroed), no access until SetAccess. */
    int fd = allocs[a].fd;
    void *p = fd >= 0 ? mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, fd, 0)
                      : mmap((void *)(uintptr_t)ptr, size, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) {
      r = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
      if (fd < 0) memset(p, 0xA5, size);
      mprotect(p, size, PROT_NONE);
      maps[slot].ptr = ptr;
      maps[slot].size = size;
      maps[slot].handle = handle;
      maps[slot].live = 1;
      maps[slot].access = 0;
      allocs[a].mapped++;
    }
  }
  pthread_mutex_unlock(&lock_);
  return r;
}

FAKE_EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  pthread_mutex_lock(&lock_);
  CUresult r = CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; i < MAX_ALLOCS; i++) {
    if (maps[i].live && maps[i].ptr == ptr && maps[i].size == size) {
      /* Back to a reserved, inaccessible range: the pages (the "GPU memory") are gone. */
      mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
      maps[i].live = 0;
      int a = (int)maps[i].handle - 1;
      allocs[a].mapped--;
      maybe_free(a);
      r = CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&lock_);
  return r;
}

/* CUmemAccessDesc: {CUmemLocation{int type; int id} location; int flags;} = 12 bytes; flags 3 = read/write. */
FAKE_EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const int *desc, size_t count) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!desc || count != 1 || desc[0] != 1 || desc[2] < 0 || desc[2] > 3) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock_);
  size_t covered = 0;
  for (int i = 0; i < MAX_ALLOCS; i++)
    if (maps[i].live && maps[i].ptr >= ptr && maps[i].ptr + maps[i].size <= ptr + size) covered += maps[i].size;
  CUresult r = covered == size ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
  if (r == CUDA_SUCCESS) {
    int prot = desc[2] == 3 ? PROT_READ | PROT_WRITE : desc[2] == 1 ? PROT_READ : PROT_NONE;
    mprotect((void *)(uintptr_t)ptr, size, prot);
    for (int i = 0; i < MAX_ALLOCS; i++)
      if (maps[i].live && maps[i].ptr >= ptr && maps[i].ptr + maps[i].size <= ptr + size) maps[i].access = desc[2];
  }
  pthread_mutex_unlock(&lock_);
  return r;
}

FAKE_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr ptr, unsigned char value, size_t n) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  pthread_mutex_lock(&lock_);
  int ok = device_span_rw(ptr, n);
  pthread_mutex_unlock(&lock_);
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  memset((void *)(uintptr_t)ptr, value, n);
  return CUDA_SUCCESS;
}

/* A memfd this fake created: its name (in /proc/self/fd) and its seals. */
static int is_fake_memfd(int fd, size_t *size) {
  char link[64], target[128];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n <= 0) return 0;
  target[n] = 0;
  if (strncmp(target, "/memfd:" FAKE_MEMFD_NAME " ", strlen("/memfd:" FAKE_MEMFD_NAME " ")) != 0) return 0;
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0 || !(seals & F_SEAL_SHRINK) || !(seals & F_SEAL_GROW)) return 0;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size <= 0 || (unsigned long long)st.st_size % GRANULARITY) return 0;
  *size = (size_t)st.st_size;
  return 1;
}

FAKE_EXPORT CUresult cuMemExportToShareableHandle(void *shareable, CUmemGenericAllocationHandle handle, int type,
                                                  unsigned long long flags) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!shareable || flags || type != HANDLE_TYPE_POSIX_FD) return CUDA_ERROR_INVALID_VALUE;
  int injected = fake_injected("mem-export", -1, KINDS);
  if (injected) return injected;
  pthread_mutex_lock(&lock_);
  int a = alloc_index(handle);
  CUresult r = a < 0 ? CUDA_ERROR_INVALID_VALUE : allocs[a].fd < 0 ? CUDA_ERROR_NOT_PERMITTED : CUDA_SUCCESS;
  int fd = -1;
  if (r == CUDA_SUCCESS && (fd = fcntl(allocs[a].fd, F_DUPFD_CLOEXEC, 0)) < 0) r = CUDA_ERROR_OUT_OF_MEMORY;
  pthread_mutex_unlock(&lock_);
  if (r == CUDA_SUCCESS) *(int *)shareable = fd;
  return r;
}

/* For POSIX fds the handle argument is the fd itself, cast to a pointer (cuda.h: (void *)(uintptr_t)fd). */
FAKE_EXPORT CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *os_handle, int type) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!handle || type != HANDLE_TYPE_POSIX_FD) return CUDA_ERROR_INVALID_VALUE;
  int injected = fake_injected("mem-import", -1, KINDS);
  if (injected) return injected;
  int fd = (int)(intptr_t)os_handle;
  size_t size = 0;
  if (fd < 0 || !is_fake_memfd(fd, &size)) return CUDA_ERROR_INVALID_VALUE;
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  CUresult r = new_alloc(handle, size, own);
  if (r != CUDA_SUCCESS) close(own);
  return r;
}

FAKE_EXPORT CUresult cuMemHostAlloc(void **pp, size_t size, unsigned int flags) {
  (void)flags;
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!pp || size == 0) return CUDA_ERROR_INVALID_VALUE;
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  pthread_mutex_lock(&lock_);
  int i = 0;
  while (i < MAX_HOST && hosts[i].ptr) i++;
  if (i < MAX_HOST) {
    hosts[i].ptr = p;
    hosts[i].size = size;
  }
  pthread_mutex_unlock(&lock_);
  if (i == MAX_HOST) {
    munmap(p, size);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  *pp = p;
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuMemFreeHost(void *p) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  pthread_mutex_lock(&lock_);
  CUresult r = CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; p && i < MAX_HOST; i++) {
    if (hosts[i].ptr == p) {
      munmap(p, hosts[i].size);
      hosts[i].ptr = NULL;
      r = CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&lock_);
  return r;
}

/* [ptr, ptr + n) lies in read-write mappings, piece by piece (a copy may span adjacent mappings). */
static int device_span_rw(CUdeviceptr ptr, size_t n) {
  size_t covered = 0;
  for (int i = 0; i < MAX_ALLOCS; i++) {
    if (!maps[i].live || maps[i].access != 3) continue;
    CUdeviceptr lo = maps[i].ptr > ptr ? maps[i].ptr : ptr;
    CUdeviceptr hi = maps[i].ptr + maps[i].size < ptr + n ? maps[i].ptr + maps[i].size : ptr + n;
    if (lo < hi) covered += hi - lo;
  }
  return n > 0 && covered == n;
}

FAKE_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!current_ctx) return CUDA_ERROR_INVALID_CONTEXT;
  if (!src) return CUDA_ERROR_INVALID_VALUE;
  int injected = fake_injected("memcpy", -1, KINDS);
  if (injected) return injected;
  pthread_mutex_lock(&lock_);
  int ok = device_span_rw(dst, n);
  pthread_mutex_unlock(&lock_);
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  memcpy((void *)(uintptr_t)dst, src, n);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *stream) {
  (void)stream;
  return cuMemcpyHtoD_v2(dst, src, n);
}

FAKE_EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (!current_ctx) return CUDA_ERROR_INVALID_CONTEXT;
  if (!dst) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock_);
  int ok = device_span_rw(src, n);
  pthread_mutex_unlock(&lock_);
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  memcpy(dst, (const void *)(uintptr_t)src, n);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuStreamSynchronize(void *stream) {
  (void)stream;
  if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
  return CUDA_SUCCESS;
}

/* ---- test introspection (only in the fake) ---- */

FAKE_EXPORT void fakeCudaReset(void) {
  pthread_mutex_lock(&lock_);
  nprocs = 0;
  last_lock_timeout_ms = 0;
  last_pair_count = -1;
  pthread_mutex_unlock(&lock_);
}

FAKE_EXPORT unsigned fakeCudaLastLockTimeoutMs(void) { return last_lock_timeout_ms; }

/* The GPU pairs of the last successful restore: their count (-1: none yet), each copied to out[32*i]. */
FAKE_EXPORT int fakeCudaLastRestorePairs(unsigned char *out, int max) {
  pthread_mutex_lock(&lock_);
  int n = last_pair_count;
  if (out && n > 0) memcpy(out, last_pairs, 32 * (size_t)(n < max ? n : max));
  pthread_mutex_unlock(&lock_);
  return n;
}

/* Bytes of live physical allocations (created and not yet freed). */
FAKE_EXPORT unsigned long long fakeCudaAllocatedBytes(void) {
  pthread_mutex_lock(&lock_);
  size_t n = allocated_bytes();
  pthread_mutex_unlock(&lock_);
  return n;
}
