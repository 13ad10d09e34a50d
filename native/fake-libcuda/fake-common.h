/*
 * What the fake CUDA driver and the fake NVML share: the configuration a test sets, read at every call so
 * that a test can change behaviour between two calls from the same process.
 *
 * Every setting is looked up first in the control file named by FAKE_CUDA_CONTROL_FILE (lines KEY=VALUE;
 * lets another process, e.g. a test's Python child, be steered), then in the environment (Node's
 * process.env assignments call setenv, so a test's `process.env.X = ...` is seen by the next call).
 *
 *   FAKE_CUDA_GPUS       comma list of GPUs as "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"; empty = no GPU;
 *                        unset = one GPU, FAKE_DEFAULT_UUID
 *   FAKE_CUDA_GPU_NAME   the model name of every fake GPU (default "NVIDIA H100 80GB HBM3")
 *   FAKE_CUDA_TOTAL_MEM  bytes per GPU (default 80 GiB)
 *   FAKE_CUDA_DRIVER_VERSION  cuDriverGetVersion's answer (default 13000, CUDA 13.0: the H100 machine's)
 *   FAKE_CUDA_PIDS       comma list of the pids that are "CUDA processes"
 *   FAKE_CUDA_PIDS_FILE  a file listing more such pids (commas, spaces or newlines)
 *   FAKE_CUDA_FAIL       comma list of injected failures "op:kind" or "op:kind@pid"; op is one of
 *                        init, lock, checkpoint, restore, unlock, state, restore-tid, mem-create, mem-map,
 *                        mem-export, mem-import, memcpy,
 *                        nvml-init, nvml-procs; kind is timeout, error, missing-gpu, not-permitted,
 *                        not-supported, invalid, or a CUresult/nvmlReturn_t number
 *   FAKE_CUDA_DELAY_MS   sleep this long inside lock/checkpoint/restore/unlock (to show they run off the
 *                        event loop)
 *   FAKE_NVML_USED_BYTES GPU memory NVML reports for each CUDA process (default 1 GiB)
 *   FAKE_CUDA_STATE_DIR  turns on token mode (below) and is where its call log goes
 *
 * Token mode, for tests that take a process through CRIU. The real driver keeps a process's checkpoint
 * state inside that process, so a CRIU-restored process (a new host pid) is CHECKPOINTED in the driver's
 * eyes. The fake does the same: a CUDA process is one whose environment holds FAKE_CUDA_TOKEN=<id> (read
 * from /proc/<pid>/environ), and its state is the one digit of its FAKE_CUDA_STATE=<0|1|2> variable
 * (running, locked, checkpointed), which the fake rewrites in the process's own memory through
 * /proc/<pid>/mem. CRIU saves and restores that memory with the rest: the restored process carries the
 * state it had at dump time, and a cold-started one (fresh environment) is running. The caller needs
 * ptrace access to the process (root, as the agent is). Every lock, checkpoint, restore and unlock on a
 * token process is appended to <FAKE_CUDA_STATE_DIR>/calls.log as "<op> <token> <pid> <CUresult name>"
 * (restore adds " pairs=<n>"). FAKE_CUDA_PIDS still works beside it; the calling process still counts.
 * NVML lists the token processes that are not checkpointed (a checkpointed process holds no GPU memory).
 */
#ifndef THAW_FAKE_COMMON_H
#define THAW_FAKE_COMMON_H

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FAKE_EXPORT __attribute__((visibility("default")))
#define FAKE_DEFAULT_UUID "GPU-6a2f0c1e-0b4d-4c55-9e1a-7f00d1ce0001"
#define FAKE_DEFAULT_NAME "NVIDIA H100 80GB HBM3"
#define FAKE_DEFAULT_MEM (80ULL << 30)
#define FAKE_MAX_GPUS 16
#define FAKE_VALUE_MAX 4096

/* One lookup result per thread: koffi's async calls run the fake on worker threads. */
static __thread char fake_value_buf[FAKE_VALUE_MAX];

/* The value of `key` (control file first, then the environment), or NULL when unset. */
static __attribute__((unused)) const char *fake_get(const char *key) {
  const char *control = getenv("FAKE_CUDA_CONTROL_FILE");
  if (control && *control) {
    FILE *f = fopen(control, "r");
    if (f) {
      size_t keylen = strlen(key);
      char line[FAKE_VALUE_MAX];
      const char *found = NULL;
      while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, keylen) == 0 && line[keylen] == '=') {
          char *v = line + keylen + 1;
          v[strcspn(v, "\r\n")] = '\0';
          snprintf(fake_value_buf, sizeof fake_value_buf, "%s", v);
          found = fake_value_buf;
        }
      }
      fclose(f);
      if (found) return found;
    }
  }
  return getenv(key);
}

static __attribute__((unused)) unsigned long long fake_get_ull(const char *key, unsigned long long fallback) {
  const char *v = fake_get(key);
  return v && *v ? strtoull(v, NULL, 0) : fallback;
}

/* True when `pid` is in the comma/space/newline-separated list `list`. */
static __attribute__((unused)) int fake_list_has_pid(const char *list, int pid) {
  if (!list) return 0;
  const char *p = list;
  while (*p) {
    while (*p && !isdigit((unsigned char)*p)) p++;
    if (!*p) break;
    char *end;
    long v = strtol(p, &end, 10);
    if (v == pid) return 1;
    p = end;
  }
  return 0;
}

static __attribute__((unused)) int fake_is_cuda_pid(int pid) {
  if (fake_list_has_pid(fake_get("FAKE_CUDA_PIDS"), pid)) return 1;
  const char *file = fake_get("FAKE_CUDA_PIDS_FILE");
  if (!file || !*file) return 0;
  FILE *f = fopen(file, "r");
  if (!f) return 0;
  char buf[FAKE_VALUE_MAX];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  return fake_list_has_pid(buf, pid);
}

/* Parses "GPU-6a2f0c1e-0b4d-..." (or bare hex) into 16 bytes; 0 on success. */
static __attribute__((unused)) int fake_parse_uuid(const char *s, size_t len, unsigned char out[16]) {
  if (len >= 4 && strncmp(s, "GPU-", 4) == 0) s += 4, len -= 4;
  int nibbles = 0;
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (c == '-') continue;
    int v = isdigit((unsigned char)c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
    if (v < 0 || nibbles >= 32) return -1;
    if (nibbles % 2 == 0) out[nibbles / 2] = (unsigned char)(v << 4);
    else out[nibbles / 2] |= (unsigned char)v;
    nibbles++;
  }
  return nibbles == 32 ? 0 : -1;
}

/* The NVML form of a UUID: "GPU-" then 8-4-4-4-12 lowercase hex. */
static __attribute__((unused)) void fake_format_uuid(const unsigned char b[16], char out[41]) {
  snprintf(out, 41, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
           b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* The fake GPUs now (FAKE_CUDA_GPUS); returns their count, fills `uuids`. */
static __attribute__((unused)) int fake_gpus(unsigned char uuids[FAKE_MAX_GPUS][16]) {
  const char *list = fake_get("FAKE_CUDA_GPUS");
  if (!list) list = FAKE_DEFAULT_UUID;
  int n = 0;
  const char *p = list;
  while (*p && n < FAKE_MAX_GPUS) {
    while (*p == ',' || *p == ' ') p++;
    if (!*p) break;
    size_t len = strcspn(p, ", ");
    if (fake_parse_uuid(p, len, uuids[n]) == 0) n++;
    p += len;
  }
  return n;
}

/*
 * The injected result for `op` on `pid` (pid < 0: any), or 0 when none. `names` maps the symbolic kinds
 * to the library's own numbers (CUresult for libcuda, nvmlReturn_t for NVML).
 */
struct fake_kind {
  const char *name;
  int code;
};

static __attribute__((unused)) int fake_injected(const char *op, int pid, const struct fake_kind *kinds) {
  const char *spec = fake_get("FAKE_CUDA_FAIL");
  if (!spec) return 0;
  size_t oplen = strlen(op);
  const char *p = spec;
  while (*p) {
    while (*p == ',' || *p == ' ') p++;
    size_t len = strcspn(p, ", ");
    if (len > oplen && strncmp(p, op, oplen) == 0 && p[oplen] == ':') {
      char item[128];
      snprintf(item, sizeof item, "%.*s", (int)(len - oplen - 1), p + oplen + 1);
      char *at = strchr(item, '@');
      int matches = 1;
      if (at) {
        *at = '\0';
        matches = pid >= 0 && atoi(at + 1) == pid;
      }
      if (matches) {
        if (isdigit((unsigned char)item[0])) return atoi(item);
        for (const struct fake_kind *k = kinds; k->name; k++)
          if (strcmp(k->name, item) == 0) return k->code;
        return kinds[0].code; /* unknown kind: the library's generic error */
      }
    }
    p += len;
  }
  return 0;
}

/* ---- token mode (see the file comment) ---- */

#define FAKE_TOKEN_ENV "FAKE_CUDA_TOKEN="
#define FAKE_STATE_ENV "FAKE_CUDA_STATE="
#define FAKE_ENVIRON_MAX (256 * 1024)

struct fake_token {
  char id[128];
  /* Address of the state digit in the process, and its value (0 running, 1 locked, 2 checkpointed). */
  unsigned long long state_addr;
  int state;
};

static __attribute__((unused)) int fake_token_mode(void) {
  const char *dir = fake_get("FAKE_CUDA_STATE_DIR");
  return dir && *dir;
}

/*
 * A restored process's pages may still be missing while thaw-fill places them (userfaultfd). The real driver
 * touches the process's memory from inside it, where a fault waits for the page; the fake reaches it from outside
 * (/proc/<pid>/environ and /mem), where the kernel fails such a fault at once (EFAULT, EIO or a short read). So the
 * fake retries for up to FAKE_REMOTE_WAIT_MS while the process lives, as the driver's access would have waited.
 */
#define FAKE_REMOTE_WAIT_MS 10000

/* 1 while another try is worth it: the process exists and the wait has not run out (sleeps 2 ms). */
static __attribute__((unused)) int fake_remote_retry(int pid, const struct timespec *since) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d", pid);
  if (access(path, F_OK) != 0) return 0;
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  long long ms = (long long)(now.tv_sec - since->tv_sec) * 1000 + (now.tv_nsec - since->tv_nsec) / 1000000;
  if (ms >= FAKE_REMOTE_WAIT_MS) return 0;
  struct timespec pause = {0, 2 * 1000 * 1000};
  nanosleep(&pause, NULL);
  return 1;
}

/* env_start and env_end (fields 50, 51 of /proc/<pid>/stat, Linux 3.5+): where /proc/<pid>/environ lies in its memory. */
static __attribute__((unused)) int fake_env_range(int pid, unsigned long long out[2]) {
  char path[64], buf[2048];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
  if (!p) return -1;
  p++;
  /* Fields from 3 on follow the ')': field 50 is the 48th of them, env_end (51) the next. */
  for (int field = 3; field < 50; field++) {
    while (*p == ' ') p++;
    while (*p && *p != ' ') p++;
    if (!*p) return -1;
  }
  char *end;
  out[0] = strtoull(p, &end, 10);
  out[1] = strtoull(end, NULL, 10);
  return out[0] && out[1] > out[0] ? 0 : -1;
}

/*
 * Fills `t` for `pid`: 1 when the process carries a token and a well-formed state variable, 0 when it is
 * not a token process (or cannot be read: gone, not ours).
 */
static __attribute__((unused)) int fake_read_token(int pid, struct fake_token *t) {
  static __thread char env[FAKE_ENVIRON_MAX];
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/environ", pid);
  unsigned long long range[2];
  struct timespec since;
  clock_gettime(CLOCK_MONOTONIC, &since);
  size_t n;
  for (;;) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    n = fread(env, 1, sizeof env - 1, f);
    int failed = ferror(f);
    fclose(f);
    if (fake_env_range(pid, range) != 0) return 0;
    /* Whole (or as much as the buffer holds): read. Short or failed: a page not placed yet (see above). */
    size_t want = range[1] - range[0] < sizeof env - 1 ? (size_t)(range[1] - range[0]) : sizeof env - 1;
    if (!failed && n >= want) break;
    if (!fake_remote_retry(pid, &since)) return 0;
  }
  env[n] = '\0';
  int have_token = 0;
  long state_off = -1;
  for (size_t i = 0; i < n; i += strlen(env + i) + 1) {
    const char *kv = env + i;
    if (strncmp(kv, FAKE_TOKEN_ENV, strlen(FAKE_TOKEN_ENV)) == 0) {
      snprintf(t->id, sizeof t->id, "%s", kv + strlen(FAKE_TOKEN_ENV));
      have_token = t->id[0] != '\0';
    } else if (strncmp(kv, FAKE_STATE_ENV, strlen(FAKE_STATE_ENV)) == 0) {
      state_off = (long)(i + strlen(FAKE_STATE_ENV));
    }
  }
  if (!have_token || state_off < 0 || (size_t)state_off >= n) return 0;
  char digit = env[state_off];
  if (digit < '0' || digit > '2') return 0;
  t->state_addr = range[0] + (unsigned long long)state_off;
  t->state = digit - '0';
  return 1;
}

/* Writes the state digit into the process's memory; 0 on success. */
static __attribute__((unused)) int fake_write_token_state(int pid, struct fake_token *t, int state) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  char digit = (char)('0' + state);
  struct timespec since;
  clock_gettime(CLOCK_MONOTONIC, &since);
  for (;;) {
    FILE *f = fopen(path, "r+");
    if (!f) return -1;
    int ok = fseeko(f, (off_t)t->state_addr, SEEK_SET) == 0 && fwrite(&digit, 1, 1, f) == 1;
    ok = (fclose(f) == 0) && ok;
    if (ok) break;
    if (!fake_remote_retry(pid, &since)) return -1;
  }
  t->state = state;
  return 0;
}

/* Appends one line to <FAKE_CUDA_STATE_DIR>/calls.log (O_APPEND: lines of concurrent calls stay whole). */
static __attribute__((unused)) void fake_log_call(const char *line) {
  const char *dir = fake_get("FAKE_CUDA_STATE_DIR");
  if (!dir || !*dir) return;
  char path[FAKE_VALUE_MAX];
  snprintf(path, sizeof path, "%s/calls.log", dir);
  FILE *f = fopen(path, "a");
  if (!f) return;
  fputs(line, f);
  fputc('\n', f);
  fclose(f);
}

#endif
