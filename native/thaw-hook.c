/*
 * thaw-hook: the createRuntime OCI hook of a restore target (design.md, Restore step 2), as a static binary.
 *
 * runc starts a hook per restore on the pod's critical path; a Node.js process costs its start and module
 * loading there (hundreds of ms on a small machine). This one only carries the hook's moment to the agent,
 * which is running anyway and does the work in-process (src/agent/hook-server.ts runs the same
 * runCreateRuntime as the Node hook, src/oci-hooks/create-runtime.ts):
 *
 *   thaw-hook --socket PATH --control-dir DIR --budget-ms N --wait-ms M
 *
 *   1. read the OCI state from stdin (at most MAX_STATE_BYTES, within the wait) and parse it: a complete,
 *      strict JSON check of the whole document (depth-bounded), the same field rules as parseOciState
 *      (src/oci-hooks/state.ts) plus a pid, and the fields forwarded plain ASCII (no escape sequence);
 *   2. connect to the agent's hook socket (root-only) and send one line:
 *        {"v":1,"id":ID,"pid":PID,"bundle":BUNDLE,"hookPid":OUR_PID,"elapsedMs":MS_SINCE_OUR_START}
 *      The agent reaches the bundle through /proc/<hookPid>/root (this process is in the runtime's mount
 *      namespace; the agent may be in a DaemonSet's own), and the budget N counts from our start;
 *   3. wait for the answer line until M ms after our start (M > N: the agent ends its work by N):
 *        done          the work is done, hook-done is recorded               -> exit 0
 *        cold          the work failed, the agent recorded hook-failed       -> exit 0 (the pod starts cold)
 *        nostart CODE  the rootfs is half changed (the undo failed)          -> exit 1 (runc fails the create)
 *        record CODE   the agent could not record (unknown container)        -> we record hook-failed, exit 0
 *
 * It never fails the container otherwise (a failed hook fails the pod): any problem of its own (bad usage,
 * a bad state, no agent, no answer in time, a bad answer) is recorded as `hook-failed` {code, reason} in the
 * control directory (the same file, written the same way as src/sdk/marker-files.ts writeEntryAtomic: a
 * directory fd, an O_EXCL|O_NOFOLLOW temporary name, fsync, rename), one line goes to stderr, and it exits 0;
 * the agent reads the record and the container runs its original command on the image's own rootfs.
 *
 * It opens nothing of the container's filesystem: only stdin, the agent's socket and the control directory
 * (a host directory the agent made; nothing of the pod runs yet).
 *
 * The same binary is the poststart hook of every container thaw manages (src/agent/nri-handler-scope.ts):
 *
 *   thaw-hook --started --socket PATH --wait-ms M
 *
 * reads and checks the state as above, sends {"v":1,"stage":"poststart",...the same fields} and waits up to M ms
 * for `ok`: the agent learns that the container runs, and its host pid, without an NRI PostStartContainer event
 * (a synchronous round trip in every pod's StartContainer on the node). It always exits 0 (runc kills a container
 * whose poststart hook fails) and records nothing: a start the agent did not take is left to the flows' own
 * deadlines (thaw-pause falls back by itself; a checkpoint source runs on without a checkpoint).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* runc writes a few hundred bytes; annotations can add some (Kubernetes caps them at 256 KiB). */
#define MAX_STATE_BYTES (1024 * 1024)
/* Nesting of the state document (runc's is 2 deep). */
#define MAX_DEPTH 32
/* A stdin that is never closed must not hold us past this (src/oci-hooks/main.ts STDIN_TIMEOUT_MS). */
#define STDIN_TIMEOUT_MS 5000
#define MAX_FIELD 4096
#define MAX_ANSWER 256

static const char *control_dir;
static const char *state_id = "?";
/* --started: the poststart hook (the header's second form). */
static int started_mode;

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t started_ms;

/* ---- the hook-failed record ------------------------------------------------------------------------ */

static void json_escape(char *out, size_t cap, const char *in) {
  size_t o = 0;
  for (; *in && o + 7 < cap; in++) {
    unsigned char c = (unsigned char)*in;
    if (c == '"' || c == '\\') {
      out[o++] = '\\';
      out[o++] = (char)c;
    } else if (c < 0x20 || c >= 0x7f) {
      o += (size_t)snprintf(out + o, cap - o, "\\u%04x", c);
    } else {
      out[o++] = (char)c;
    }
  }
  out[o] = '\0';
}

static int write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    buf += n;
    len -= (size_t)n;
  }
  return 0;
}

/* Records hook-failed {code, reason} in the control directory; returns 0, or -1 with errno. */
static int write_hook_failed(const char *code, const char *reason) {
  if (control_dir == NULL || control_dir[0] != '/') {
    errno = EINVAL;
    return -1;
  }
  int dfd = open(control_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0) return -1;
  char tmp[64];
  unsigned r = 0;
  int fd = -1;
  for (int attempt = 0; attempt < 8 && fd < 0; attempt++) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    r = (unsigned)ts.tv_nsec ^ ((unsigned)getpid() << 16) ^ (unsigned)attempt * 2654435761u;
    snprintf(tmp, sizeof tmp, ".tmp-hook-failed-%08x%04x", r, (unsigned)attempt);
    fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    int e = errno;
    close(dfd);
    errno = e;
    return -1;
  }
  char ecode[128], ereason[1024], body[1300];
  json_escape(ecode, sizeof ecode, code);
  json_escape(ereason, sizeof ereason, reason);
  int len = snprintf(body, sizeof body, "{\"code\":\"%s\",\"reason\":\"%s\"}\n", ecode, ereason);
  int rc = (len > 0 && (size_t)len < sizeof body && write_all(fd, body, (size_t)len) == 0 && fchmod(fd, 0644) == 0 && fsync(fd) == 0) ? 0 : -1;
  int e = errno;
  close(fd);
  if (rc == 0 && renameat(dfd, tmp, dfd, "hook-failed") != 0) {
    rc = -1;
    e = errno;
  }
  if (rc != 0) unlinkat(dfd, tmp, 0);
  else fsync(dfd);
  close(dfd);
  errno = e;
  return rc;
}

/* Records the failure, says so on stderr, and exits 0: the container starts cold on its own rootfs. */
__attribute__((noreturn, format(printf, 2, 3))) static void cold(const char *code, const char *fmt, ...) {
  char reason[900];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reason, sizeof reason, fmt, ap);
  va_end(ap);
  if (started_mode) {
    fprintf(stderr, "thaw poststart hook (%s): %s: %s; the agent was not told that the container started\n", state_id, code, reason);
    exit(0);
  }
  if (write_hook_failed(code, reason) != 0) {
    fprintf(stderr, "thaw create-runtime hook (%s): %s: %s; writing hook-failed failed: %s; the container starts cold\n", state_id, code, reason, strerror(errno));
  } else {
    fprintf(stderr, "thaw create-runtime hook (%s): %s: %s; the container starts cold\n", state_id, code, reason);
  }
  exit(0);
}

/* ---- the OCI state: a strict JSON check, keeping the top-level fields the hook forwards ------------- */

struct parser {
  const char *p, *end;
  int depth;
  const char *err;
};

struct state {
  char oci_version[MAX_FIELD], id[MAX_FIELD], status[64], bundle[MAX_FIELD];
  int have_oci_version, have_id, have_status, have_bundle, have_pid;
  long long pid;
  int annotations_bad;
};

static void ws(struct parser *ps) {
  while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

static int fail(struct parser *ps, const char *err) {
  if (ps->err == NULL) ps->err = err;
  return -1;
}

/*
 * A JSON string at ps->p. With out != NULL its raw content is copied there: an escape sequence, a byte outside
 * ASCII, or content longer than cap - 1, sets *plain = 0 (the caller refuses such a field rather than decode it).
 */
static int parse_string(struct parser *ps, char *out, size_t cap, int *plain) {
  if (ps->p >= ps->end || *ps->p != '"') return fail(ps, "a string was expected");
  ps->p++;
  size_t n = 0;
  if (plain) *plain = 1;
  while (ps->p < ps->end) {
    unsigned char c = (unsigned char)*ps->p;
    if (c == '"') {
      ps->p++;
      if (out) out[n < cap ? n : cap - 1] = '\0';
      return 0;
    }
    if (c < 0x20) return fail(ps, "a control character in a string");
    if (c == '\\') {
      if (plain) *plain = 0;
      ps->p++;
      if (ps->p >= ps->end) break;
      char e = *ps->p;
      if (e == 'u') {
        if (ps->end - ps->p < 5) break;
        for (int i = 1; i <= 4; i++) {
          char h = ps->p[i];
          if (!((h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F'))) return fail(ps, "a bad \\u escape");
        }
        ps->p += 5;
      } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
        ps->p++;
      } else {
        return fail(ps, "a bad escape");
      }
      continue;
    }
    if (out) {
      if (n + 1 < cap) out[n] = (char)c;
      else if (plain) *plain = 0;
      /* Runtimes name containers and bundles in ASCII; anything else is not forwarded (and not decoded). */
      if (c >= 0x80 && plain) *plain = 0;
    }
    n++;
    ps->p++;
  }
  return fail(ps, "an unterminated string");
}

/* A JSON number; *integer says whether it was a plain integer (no fraction, no exponent), its value in *v. */
static int parse_number(struct parser *ps, int *integer, long long *v) {
  const char *s = ps->p;
  int neg = 0;
  long long acc = 0;
  int overflow = 0;
  *integer = 1;
  if (ps->p < ps->end && *ps->p == '-') {
    neg = 1;
    ps->p++;
  }
  if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') return fail(ps, "a bad number");
  if (*ps->p == '0') {
    ps->p++;
  } else {
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
      if (acc > (LLONG_MAX - 9) / 10) overflow = 1;
      else acc = acc * 10 + (*ps->p - '0');
      ps->p++;
    }
  }
  if (ps->p < ps->end && *ps->p == '.') {
    *integer = 0;
    ps->p++;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') return fail(ps, "a bad number");
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  }
  if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
    *integer = 0;
    ps->p++;
    if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') return fail(ps, "a bad number");
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  }
  if (overflow) *integer = 0;
  *v = neg ? -acc : acc;
  (void)s;
  return 0;
}

static int parse_value(struct parser *ps, int *kind);

/* kind: 's' string, 'n' number, 'o' object, 'a' array, 'b' bool, 'z' null. */
static int parse_literal(struct parser *ps, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) return fail(ps, "an unknown literal");
  ps->p += n;
  return 0;
}

/* An object whose members must all be strings when strings_only (annotations). */
static int parse_object(struct parser *ps, int strings_only, int *not_strings) {
  if (++ps->depth > MAX_DEPTH) return fail(ps, "nested too deep");
  ps->p++; /* '{' */
  ws(ps);
  if (ps->p < ps->end && *ps->p == '}') {
    ps->p++;
    ps->depth--;
    return 0;
  }
  for (;;) {
    ws(ps);
    if (parse_string(ps, NULL, 0, NULL) != 0) return -1;
    ws(ps);
    if (ps->p >= ps->end || *ps->p != ':') return fail(ps, "':' was expected");
    ps->p++;
    ws(ps);
    int kind;
    if (parse_value(ps, &kind) != 0) return -1;
    if (strings_only && kind != 's') *not_strings = 1;
    ws(ps);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      continue;
    }
    if (ps->p < ps->end && *ps->p == '}') {
      ps->p++;
      ps->depth--;
      return 0;
    }
    return fail(ps, "',' or '}' was expected");
  }
}

static int parse_array(struct parser *ps) {
  if (++ps->depth > MAX_DEPTH) return fail(ps, "nested too deep");
  ps->p++; /* '[' */
  ws(ps);
  if (ps->p < ps->end && *ps->p == ']') {
    ps->p++;
    ps->depth--;
    return 0;
  }
  for (;;) {
    ws(ps);
    int kind;
    if (parse_value(ps, &kind) != 0) return -1;
    ws(ps);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      continue;
    }
    if (ps->p < ps->end && *ps->p == ']') {
      ps->p++;
      ps->depth--;
      return 0;
    }
    return fail(ps, "',' or ']' was expected");
  }
}

static int parse_value(struct parser *ps, int *kind) {
  if (ps->p >= ps->end) return fail(ps, "a value was expected");
  int integer, dummy = 0;
  long long v;
  switch (*ps->p) {
  case '"': *kind = 's'; return parse_string(ps, NULL, 0, NULL);
  case '{': *kind = 'o'; return parse_object(ps, 0, &dummy);
  case '[': *kind = 'a'; return parse_array(ps);
  case 't': *kind = 'b'; return parse_literal(ps, "true");
  case 'f': *kind = 'b'; return parse_literal(ps, "false");
  case 'n': *kind = 'z'; return parse_literal(ps, "null");
  default: *kind = 'n'; return parse_number(ps, &integer, &v);
  }
}

/*
 * Parses the state document. Returns NULL, or what is wrong with it (a short phrase). Field rules as in
 * parseOciState; a field given twice is refused (JSON.parse would take the last: we do not guess).
 */
static const char *parse_state(const char *buf, size_t len, struct state *st) {
  struct parser ps = {buf, buf + len, 0, NULL};
  memset(st, 0, sizeof *st);
  ws(&ps);
  if (ps.p >= ps.end || *ps.p != '{') return "the state must be a JSON object";
  ps.depth = 1;
  ps.p++;
  ws(&ps);
  int empty = ps.p < ps.end && *ps.p == '}';
  if (empty) ps.p++;
  while (!empty) {
    ws(&ps);
    char key[32];
    int plain;
    if (parse_string(&ps, key, sizeof key, &plain) != 0) return ps.err;
    ws(&ps);
    if (ps.p >= ps.end || *ps.p != ':') return "':' was expected";
    ps.p++;
    ws(&ps);
    char *target = NULL;
    size_t cap = 0;
    int *have = NULL;
    if (plain && strcmp(key, "ociVersion") == 0) target = st->oci_version, cap = sizeof st->oci_version, have = &st->have_oci_version;
    else if (plain && strcmp(key, "id") == 0) target = st->id, cap = sizeof st->id, have = &st->have_id;
    else if (plain && strcmp(key, "status") == 0) target = st->status, cap = sizeof st->status, have = &st->have_status;
    else if (plain && strcmp(key, "bundle") == 0) target = st->bundle, cap = sizeof st->bundle, have = &st->have_bundle;
    if (target != NULL) {
      if (*have) return "a field is given twice";
      if (ps.p >= ps.end || *ps.p != '"') return "ociVersion, id, status and bundle must be strings";
      int field_plain;
      if (parse_string(&ps, target, cap, &field_plain) != 0) return ps.err;
      if (!field_plain) return "ociVersion, id, status and bundle must be plain ASCII strings (no escapes, under 4 KiB)";
      *have = 1;
    } else if (plain && strcmp(key, "pid") == 0) {
      if (st->have_pid) return "a field is given twice";
      int integer;
      if (ps.p >= ps.end || !(*ps.p == '-' || (*ps.p >= '0' && *ps.p <= '9'))) return "pid must be a number";
      if (parse_number(&ps, &integer, &st->pid) != 0) return ps.err;
      if (!integer || st->pid < 0 || st->pid > INT_MAX) return "pid must be a positive integer";
      st->have_pid = 1;
    } else if (plain && strcmp(key, "annotations") == 0) {
      int kind;
      if (ps.p < ps.end && *ps.p == '{') {
        int not_strings = 0;
        if (parse_object(&ps, 1, &not_strings) != 0) return ps.err;
        if (not_strings) return "annotations must be an object of strings";
      } else {
        if (parse_value(&ps, &kind) != 0) return ps.err;
        if (kind != 'z') return "annotations must be an object of strings";
      }
    } else {
      int kind;
      if (parse_value(&ps, &kind) != 0) return ps.err;
    }
    ws(&ps);
    if (ps.p < ps.end && *ps.p == ',') {
      ps.p++;
      continue;
    }
    if (ps.p < ps.end && *ps.p == '}') {
      ps.p++;
      break;
    }
    return ps.err ? ps.err : "',' or '}' was expected";
  }
  ws(&ps);
  if (ps.p != ps.end) return "text after the state object";
  if (!st->have_oci_version || st->oci_version[0] == '\0') return "ociVersion must be a non-empty string";
  if (!st->have_id || st->id[0] == '\0') return "id must be a non-empty string";
  if (!st->have_bundle || st->bundle[0] == '\0') return "bundle must be a non-empty string";
  if (!st->have_status || (strcmp(st->status, "creating") != 0 && strcmp(st->status, "created") != 0 && strcmp(st->status, "running") != 0 && strcmp(st->status, "stopped") != 0)) {
    return "status must be one of creating, created, running, stopped";
  }
  if (st->bundle[0] != '/') return "bundle must be an absolute path";
  if (!st->have_pid || st->pid == 0) return "the state has no pid (createRuntime runs after the init exists)";
  return NULL;
}

/* ---- I/O within the deadline ------------------------------------------------------------------------ */

/* Waits for fd to be ready for `events` until `deadline` (now_ms clock). 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - now_ms();
    if (left <= 0) return 0;
    struct pollfd pfd = {fd, events, 0};
    int n = poll(&pfd, 1, left > INT_MAX ? INT_MAX : (int)left);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) return 0;
    return 1;
  }
}

static int parse_ms(const char *s, long long *out) {
  if (s == NULL || *s == '\0') return -1;
  long long v = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9' || v > (LLONG_MAX - 9) / 10) return -1;
    v = v * 10 + (*p - '0');
  }
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  started_ms = now_ms();
  signal(SIGPIPE, SIG_IGN);
  const char *socket_path = NULL, *budget_s = NULL, *wait_s = NULL;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--started") == 0) {
      started_mode = 1;
      continue;
    }
  }
  for (int i = 1; i < argc; i++) {
    const char **slot = NULL;
    if (strcmp(argv[i], "--started") == 0) continue;
    if (strcmp(argv[i], "--socket") == 0) slot = &socket_path;
    else if (strcmp(argv[i], "--control-dir") == 0) slot = &control_dir;
    else if (strcmp(argv[i], "--budget-ms") == 0) slot = &budget_s;
    else if (strcmp(argv[i], "--wait-ms") == 0) slot = &wait_s;
    if (slot == NULL || i + 1 >= argc) cold("HOOK_USAGE", "usage: thaw-hook --socket PATH --control-dir DIR --budget-ms N --wait-ms M (at %s)", argv[i]);
    *slot = argv[++i];
  }
  long long budget_ms = 0, wait_ms;
  if (started_mode) {
    if (socket_path == NULL || parse_ms(wait_s, &wait_ms) != 0) cold("HOOK_USAGE", "usage: thaw-hook --started --socket PATH --wait-ms M");
  } else if (socket_path == NULL || control_dir == NULL || parse_ms(budget_s, &budget_ms) != 0 || parse_ms(wait_s, &wait_ms) != 0 || wait_ms < budget_ms) {
    cold("HOOK_USAGE", "usage: thaw-hook --socket PATH --control-dir DIR --budget-ms N --wait-ms M (M >= N)");
  }
  int64_t deadline = started_ms + wait_ms;

  /* 1. The state, bounded in size and time. */
  static char buf[MAX_STATE_BYTES + 1];
  size_t len = 0;
  int64_t stdin_deadline = started_ms + (wait_ms < STDIN_TIMEOUT_MS ? wait_ms : STDIN_TIMEOUT_MS);
  int flags = fcntl(0, F_GETFL);
  if (flags >= 0) fcntl(0, F_SETFL, flags | O_NONBLOCK);
  for (;;) {
    ssize_t n = read(0, buf + len, sizeof buf - len);
    if (n > 0) {
      len += (size_t)n;
      if (len > MAX_STATE_BYTES) cold("HOOK_STATE_INVALID", "the state on stdin is over %d bytes", MAX_STATE_BYTES);
      continue;
    }
    if (n == 0) break;
    if (errno == EINTR) continue;
    if (errno != EAGAIN) cold("HOOK_STATE_INVALID", "cannot read stdin: %s", strerror(errno));
    int w = wait_fd(0, POLLIN, stdin_deadline);
    if (w == 0) cold("HOOK_STATE_INVALID", "no end of stdin after %lld ms", (long long)(now_ms() - started_ms));
    if (w < 0) cold("HOOK_STATE_INVALID", "cannot wait on stdin: %s", strerror(errno));
  }
  struct state st;
  const char *bad = parse_state(buf, len, &st);
  if (bad != NULL) cold("HOOK_STATE_INVALID", "the OCI state on stdin: %s", bad);
  state_id = st.id;

  /* 2. The request to the agent. */
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(socket_path) >= sizeof addr.sun_path) cold("HOOK_USAGE", "the socket path is too long");
  memcpy(addr.sun_path, socket_path, strlen(socket_path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) cold("HOOK_AGENT_UNREACHABLE", "socket: %s", strerror(errno));
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
    if (errno != EINPROGRESS && errno != EAGAIN) cold("HOOK_AGENT_UNREACHABLE", "connect %s: %s", socket_path, strerror(errno));
    if (wait_fd(fd, POLLOUT, deadline) != 1) cold("HOOK_AGENT_UNREACHABLE", "connect %s: no answer", socket_path);
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) cold("HOOK_AGENT_UNREACHABLE", "connect %s: %s", socket_path, strerror(soerr ? soerr : errno));
  }
  char req[3 * MAX_FIELD];
  int rl = snprintf(req, sizeof req, "{\"v\":1,%s\"id\":\"%s\",\"pid\":%lld,\"bundle\":\"%s\",\"hookPid\":%d,\"elapsedMs\":%lld}\n", started_mode ? "\"stage\":\"poststart\"," : "", st.id, st.pid, st.bundle, (int)getpid(), (long long)(now_ms() - started_ms));
  if (rl <= 0 || (size_t)rl >= sizeof req) cold("HOOK_STATE_INVALID", "the request does not fit");
  for (size_t off = 0; off < (size_t)rl;) {
    ssize_t n = send(fd, req + off, (size_t)rl - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN && wait_fd(fd, POLLOUT, deadline) == 1) continue;
    cold("HOOK_AGENT_UNREACHABLE", "send to %s: %s", socket_path, n < 0 ? strerror(errno) : "closed");
  }

  /* 3. The answer. */
  char ans[MAX_ANSWER + 1];
  size_t al = 0;
  char *nl = NULL;
  while (nl == NULL) {
    if (al >= MAX_ANSWER) cold("HOOK_AGENT_ANSWER_INVALID", "the agent's answer is over %d bytes", MAX_ANSWER);
    ssize_t n = recv(fd, ans + al, MAX_ANSWER - al, 0);
    if (n > 0) {
      al += (size_t)n;
      ans[al] = '\0';
      nl = memchr(ans, '\n', al);
      continue;
    }
    if (n == 0) cold("HOOK_AGENT_UNREACHABLE", "the agent closed the connection without an answer");
    if (errno == EINTR) continue;
    if (errno != EAGAIN) cold("HOOK_AGENT_UNREACHABLE", "recv: %s", strerror(errno));
    int w = wait_fd(fd, POLLIN, deadline);
    if (w == 0) cold("HOOK_AGENT_TIMEOUT", "no answer from the agent within %lld ms", wait_ms);
    if (w < 0) cold("HOOK_AGENT_UNREACHABLE", "poll: %s", strerror(errno));
  }
  close(fd);
  *nl = '\0';
  for (char *c = ans; *c; c++) {
    if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f) cold("HOOK_AGENT_ANSWER_INVALID", "the agent's answer is not plain text");
  }
  if (started_mode) {
    if (strcmp(ans, "ok") == 0) return 0;
    cold("HOOK_AGENT_ANSWER_INVALID", "the agent's answer to a start is not ok: %.64s", ans);
  }
  if (strcmp(ans, "done") == 0 || strcmp(ans, "cold") == 0) return 0;
  if (strncmp(ans, "nostart ", 8) == 0) {
    fprintf(stderr, "thaw create-runtime hook (%s): %s: the rootfs diff could not be undone; the container must not start\n", state_id, ans + 8);
    return 1;
  }
  if (strncmp(ans, "record ", 7) == 0) cold(ans + 7, "the agent has no restore for this container");
  cold("HOOK_AGENT_ANSWER_INVALID", "the agent's answer is not one of done, cold, nostart, record: %.64s", ans);
}
