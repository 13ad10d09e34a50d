/*
 * A fake NVML (libnvidia-ml.so.1) for machines without a GPU: the calls src/cuda/nvml.ts makes, with the
 * real signatures and nvmlReturn_t numbers, describing the same GPUs as the fake libcuda (fake-common.h).
 */
#include <dirent.h>

#include "fake-common.h"

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;

/* nvmlReturn_t values (nvml.h). */
enum {
  NVML_SUCCESS = 0,
  NVML_ERROR_UNINITIALIZED = 1,
  NVML_ERROR_INVALID_ARGUMENT = 2,
  NVML_ERROR_NOT_SUPPORTED = 3,
  NVML_ERROR_NO_PERMISSION = 4,
  NVML_ERROR_NOT_FOUND = 6,
  NVML_ERROR_INSUFFICIENT_SIZE = 7,
  NVML_ERROR_DRIVER_NOT_LOADED = 9,
  NVML_ERROR_TIMEOUT = 10,
  NVML_ERROR_UNKNOWN = 999,
};

static const struct fake_kind KINDS[] = {
    {"error", NVML_ERROR_UNKNOWN}, {"timeout", NVML_ERROR_TIMEOUT}, {"not-permitted", NVML_ERROR_NO_PERMISSION},
    {"not-supported", NVML_ERROR_NOT_SUPPORTED}, {"invalid", NVML_ERROR_INVALID_ARGUMENT}, {NULL, 0},
};

static int initialized;

/* A device handle is 1 + its index, never NULL. */
static int device_index(nvmlDevice_t d) {
  unsigned char gpus[FAKE_MAX_GPUS][16];
  long i = (long)(size_t)d - 1;
  return i >= 0 && i < fake_gpus(gpus) ? (int)i : -1;
}

FAKE_EXPORT const char *nvmlErrorString(nvmlReturn_t r) {
  switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    default: return "Unknown Error";
  }
}

FAKE_EXPORT nvmlReturn_t nvmlInit_v2(void) {
  int injected = fake_injected("nvml-init", -1, KINDS);
  if (injected) return injected;
  unsigned char gpus[FAKE_MAX_GPUS][16];
  if (fake_gpus(gpus) == 0) return NVML_ERROR_DRIVER_NOT_LOADED;
  initialized = 1;
  return NVML_SUCCESS;
}

FAKE_EXPORT nvmlReturn_t nvmlShutdown(void) {
  initialized = 0;
  return NVML_SUCCESS;
}

FAKE_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned length) {
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  if (!version) return NVML_ERROR_INVALID_ARGUMENT;
  const char *v = fake_get("FAKE_NVML_DRIVER_VERSION");
  if (!v) v = "580.159.04";
  if (strlen(v) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  snprintf(version, length, "%s", v);
  return NVML_SUCCESS;
}

FAKE_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
  unsigned char gpus[FAKE_MAX_GPUS][16];
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  if (!count) return NVML_ERROR_INVALID_ARGUMENT;
  *count = (unsigned)fake_gpus(gpus);
  return NVML_SUCCESS;
}

FAKE_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device) {
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  if (!device) return NVML_ERROR_INVALID_ARGUMENT;
  nvmlDevice_t d = (nvmlDevice_t)(size_t)(index + 1);
  if (device_index(d) < 0) return NVML_ERROR_INVALID_ARGUMENT;
  *device = d;
  return NVML_SUCCESS;
}

FAKE_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned length) {
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  if (device_index(device) < 0 || !name) return NVML_ERROR_INVALID_ARGUMENT;
  const char *model = fake_get("FAKE_CUDA_GPU_NAME");
  if (!model) model = FAKE_DEFAULT_NAME;
  if (strlen(model) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  snprintf(name, length, "%s", model);
  return NVML_SUCCESS;
}

FAKE_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned length) {
  unsigned char gpus[FAKE_MAX_GPUS][16];
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  int i = device_index(device);
  if (i < 0 || !uuid) return NVML_ERROR_INVALID_ARGUMENT;
  if (length < 41) return NVML_ERROR_INSUFFICIENT_SIZE;
  fake_gpus(gpus);
  fake_format_uuid(gpus[i], uuid);
  return NVML_SUCCESS;
}

/* nvmlMemory_t (v1): {unsigned long long total, free, used;}. */
FAKE_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, unsigned long long *memory) {
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  if (device_index(device) < 0 || !memory) return NVML_ERROR_INVALID_ARGUMENT;
  unsigned long long total = fake_get_ull("FAKE_CUDA_TOTAL_MEM", FAKE_DEFAULT_MEM);
  unsigned long long used = fake_get_ull("FAKE_NVML_USED_TOTAL", 0);
  memory[0] = total;
  memory[1] = total - used;
  memory[2] = used;
  return NVML_SUCCESS;
}

/*
 * nvmlProcessInfo_t (v2/v3 layout, nvml.h): {unsigned pid; unsigned long long usedGpuMemory; unsigned
 * gpuInstanceId; unsigned computeInstanceId;} = 24 bytes with natural alignment. The processes are the
 * pids of FAKE_CUDA_PIDS, and in token mode the token processes that are not checkpointed, each on the
 * first GPU. With *count too small: NVML_ERROR_INSUFFICIENT_SIZE and
 * the needed count, as the real call does.
 */
struct proc_info {
  unsigned pid;
  unsigned long long usedGpuMemory;
  unsigned gpuInstanceId, computeInstanceId;
};

FAKE_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned *count,
                                                                  struct proc_info *infos) {
  if (!initialized) return NVML_ERROR_UNINITIALIZED;
  int dev = device_index(device);
  if (dev < 0 || !count) return NVML_ERROR_INVALID_ARGUMENT;
  int injected = fake_injected("nvml-procs", -1, KINDS);
  if (injected) return injected;
  int pids[64];
  unsigned n = 0;
  const char *list = dev == 0 ? fake_get("FAKE_CUDA_PIDS") : NULL;
  for (const char *p = list; p && *p && n < 64;) {
    while (*p && !isdigit((unsigned char)*p)) p++;
    if (!*p) break;
    char *end;
    pids[n++] = (int)strtol(p, &end, 10);
    p = end;
  }
  if (dev == 0 && fake_token_mode()) {
    DIR *proc = opendir("/proc");
    for (struct dirent *e; proc && (e = readdir(proc)) != NULL && n < 64;) {
      if (!isdigit((unsigned char)e->d_name[0])) continue;
      struct fake_token t;
      int pid = atoi(e->d_name);
      if (fake_read_token(pid, &t) && t.state != 2) pids[n++] = pid;
    }
    if (proc) closedir(proc);
  }
  if (*count < n) {
    *count = n;
    return NVML_ERROR_INSUFFICIENT_SIZE;
  }
  unsigned long long used = fake_get_ull("FAKE_NVML_USED_BYTES", 1ULL << 30);
  for (unsigned i = 0; i < n; i++) {
    infos[i].pid = (unsigned)pids[i];
    infos[i].usedGpuMemory = used;
    infos[i].gpuInstanceId = 0xFFFFFFFFu; /* NVML's "not MIG" value */
    infos[i].computeInstanceId = 0xFFFFFFFFu;
  }
  *count = n;
  return NVML_SUCCESS;
}
