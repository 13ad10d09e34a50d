/*
 * thaw-pause: the placeholder process of a thaw restore target (design.md, "Processes on a node").
 *
 * It runs as PID 1 of the container's PID namespace, sleeps, reaps every child, and waits for the
 * agent to say, with a signal sent from the host, how the pod goes on:
 *
 *   SIGUSR2  fall back (cold start): execvp() the original argv with the original environment, the
 *            original signal mask and default handlers. Leftover processes of a failed restore are
 *            SIGKILLed first (only when we are PID 1: kill(-1) then reaches exactly our namespace).
 *            If the exec fails, one stderr line says why and we exit 127, so the pod fails visibly
 *            instead of hanging. After an adoption, SIGUSR2 is forwarded to the worker instead.
 *   SIGUSR1  "a restored worker has been placed under me": adopt it. From then on SIGTERM, SIGINT,
 *            SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the worker, and when the worker
 *            exits we exit with its status (its exit code, or 128+signal), so a pod stop reaches
 *            the worker and the container ends with the worker's status.
 *   SIGTERM, SIGINT before an adoption: exit 0 at once (like the Kubernetes pause container).
 *   SIGHUP, SIGQUIT before an adoption: ignored (a PID 1 has no default action to fall back on).
 *
 * Which process is the worker: the children we have at SIGUSR1 time, read from /proc. A child we
 * have not reaped cannot have its pid reused, so this needs no pid translation between the host's
 * and the pod's PID namespaces and has no pid-reuse race (a pid written to a file by the agent has
 * both). With a nested PID namespace (CRIU restores the tree into one) the worker's root is our only
 * child. When several children exist, env THAW_PAUSE_WORKER_PID_FILE may name a file holding the pid
 * (in our namespace) to prefer; it is used only if that pid is one of our live children; otherwise
 * the child that started first is taken. No live child: one stderr line, and we keep waiting (the
 * agent sees the adoption did not happen and falls back with SIGUSR2).
 *
 * Two ways to get the original command:
 *   args mode     (NRI args, containerd >= 2.2): argv = [".../thaw-pause", "--", original argv...].
 *   overlay mode  (containerd 1.7-2.1): a createRuntime hook bind-mounts this binary over the
 *                 resolved entrypoint, so argv is the original argv (argv[0] = e.g. /bin/sleep).
 * Detection: the basename of argv[0] is "thaw-pause" -> args mode (and --version/--help are
 * understood); any other basename -> overlay mode. In overlay mode the fallback works only after the
 * agent has unmounted the overlay; if the exec target is still this very file (same st_dev/st_ino as
 * /proc/self/exe), the original entrypoint is taken from THAW_PAUSE_ORIGINAL: a second bind mount of it
 * that the createRuntime hook made (in the control directory) before it covered the entrypoint, so that a
 * fallback needs no agent. Without it (or if it is this very file too) we refuse with exit 127 instead of
 * re-executing ourselves and hanging.
 *
 * Deadline (the agent may be gone for good): env THAW_PAUSE_DEADLINE_MS, set by the agent, is how long
 * we wait for a word from it before falling back by ourselves. A word is SIGUSR1, SIGUSR2, or
 *   SIGWINCH "a restore is under way": the deadline starts again (the agent repeats it while it restores,
 *            so an agent killed mid-restore still leaves us a deadline).
 * At the deadline we fall back exactly as on SIGUSR2 (in overlay mode through THAW_PAUSE_ORIGINAL while
 * thaw-pause is still mounted over the entrypoint) — unless THAW_PAUSE_DIFF_MARKER names a file that exists:
 * the createRuntime hook applied the checkpoint's rootfs diff, which only the agent can undo, so we exit
 * EXIT_DIFF_NOT_UNDONE instead of running the original command on files the checkpoint changed (the runtime's
 * restart makes a fresh container). The variables are removed from our environment before any exec. Absent,
 * 0 or not a number: no deadline.
 *
 * Signal handlers only set flags (async-signal-safe); all work happens in the main loop, which
 * blocks the signals it handles and waits in sigsuspend(). stderr is the container log: one short
 * line at start and on each transition.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define THAW_PAUSE_VERSION "0.1.0"
#define OWN_NAME "thaw-pause"
#define EXIT_EXEC_FAILED 127
#define EXIT_USAGE 2
/* How long the fallback waits for SIGKILLed leftovers to be reaped before exec'ing anyway (a process
 * stuck in the GPU driver may not die promptly; the cold start must not wait on it forever). */
#define FALLBACK_REAP_TIMEOUT_MS 2000

static volatile sig_atomic_t pending[NSIG];

static void on_signal(int sig) { pending[sig] = 1; }

/* The signals we catch. Before adoption: TERM/INT exit, USR1 adopts, USR2 falls back, HUP/QUIT are
 * ignored. After adoption all but CHLD are forwarded to the worker. */
static const int HANDLED[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGALRM};
static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

struct state {
  char **orig_argv; /* NULL-terminated; NULL when no command was given */
  const char *mode;
  sigset_t orig_mask;
  pid_t worker; /* 0 until adopted */
  long deadline_ms; /* 0: none */
  char original[4096]; /* overlay mode: the original entrypoint's second mount (THAW_PAUSE_ORIGINAL); "" none */
  char diff_marker[4096]; /* THAW_PAUSE_DIFF_MARKER: present once the hook applied a rootfs diff; "" none */
};

#define DEADLINE_ENV "THAW_PAUSE_DEADLINE_MS"
#define ORIGINAL_ENV "THAW_PAUSE_ORIGINAL"
#define DIFF_MARKER_ENV "THAW_PAUSE_DIFF_MARKER"
/* The deadline passed and the rootfs carries the checkpoint's diff, which only the agent can undo: we exit with
 * this rather than run the original command on files the checkpoint changed; the runtime's restart makes a
 * fresh container on the image's own rootfs (sysexits' EX_TEMPFAIL). */
#define EXIT_DIFF_NOT_UNDONE 75

/* An absolute path from the environment variable `name` (that fits) into buf, else ""; removed from the environment. */
static void take_path_env(const char *name, char *buf, size_t size) {
  const char *v = getenv(name);
  buf[0] = '\0';
  if (v && v[0] == '/' && strlen(v) < size) strcpy(buf, v);
  unsetenv(name);
}

/* True when the hook's diff marker is there: a regular file, not followed if it is a link. */
static int diff_applied(const struct state *s) {
  struct stat st;
  return s->diff_marker[0] != '\0' && lstat(s->diff_marker, &st) == 0 && S_ISREG(st.st_mode);
}

/* (Re)arms the one-shot SIGALRM of the deadline; 0 disarms it. */
static void arm_deadline(long ms) {
  struct itimerval it;
  memset(&it, 0, sizeof it);
  it.it_value.tv_sec = ms / 1000;
  it.it_value.tv_usec = (ms % 1000) * 1000;
  setitimer(ITIMER_REAL, &it, NULL);
}

/* THAW_PAUSE_DEADLINE_MS as a positive number of ms (at most a day), else 0; the variable is removed so
 * that the original command never sees it. */
static long take_deadline_env(void) {
  const char *v = getenv(DEADLINE_ENV);
  long ms = 0;
  if (v && *v) {
    char *end = NULL;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno == 0 && end && *end == '\0' && n > 0 && n <= 86400000L) ms = n;
  }
  unsetenv(DEADLINE_ENV);
  return ms;
}

static const char *signame(int sig) {
  switch (sig) {
  case SIGTERM: return "SIGTERM";
  case SIGINT: return "SIGINT";
  case SIGHUP: return "SIGHUP";
  case SIGQUIT: return "SIGQUIT";
  case SIGUSR1: return "SIGUSR1";
  case SIGUSR2: return "SIGUSR2";
  case SIGWINCH: return "SIGWINCH";
  case SIGKILL: return "SIGKILL";
  default: return "signal";
  }
}

static int take(int sig) {
  if (!pending[sig]) return 0;
  pending[sig] = 0;
  return 1;
}

/* The exit status a shell would report for a wait() status. */
static int shell_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

/* Reads "pid (comm) S ppid ... starttime" from /proc/<pid>/stat. comm may hold spaces and ')', so
 * parse from the last ')'. Returns 0 on success. */
static int read_stat(pid_t pid, char *state, pid_t *ppid, unsigned long long *start) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "re");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')');
  if (!p) return -1;
  int pp = 0;
  unsigned long long st = 0;
  /* fields after comm: state(3) ppid(4) ... starttime(22) */
  if (sscanf(p + 1, " %c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
             state, &pp, &st) != 3)
    return -1;
  *ppid = pp;
  *start = st;
  return 0;
}

static pid_t pid_from_file(void) {
  const char *path = getenv("THAW_PAUSE_WORKER_PID_FILE");
  if (!path || !*path) return 0;
  FILE *f = fopen(path, "re");
  if (!f) return 0;
  long v = 0;
  int ok = fscanf(f, "%ld", &v) == 1;
  fclose(f);
  return ok && v > 0 ? (pid_t)v : 0;
}

/* Chooses the worker among our live (non-zombie) children; 0 when there is none. */
static pid_t find_worker(void) {
  pid_t self = getpid(), preferred = pid_from_file(), best = 0;
  unsigned long long best_start = 0;
  DIR *d = opendir("/proc");
  if (!d) return 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    char *end;
    long v = strtol(e->d_name, &end, 10);
    if (*end != '\0' || v <= 0) continue;
    char st;
    pid_t ppid;
    unsigned long long start;
    if (read_stat((pid_t)v, &st, &ppid, &start) != 0 || ppid != self || st == 'Z' || st == 'X') continue;
    if ((pid_t)v == preferred) {
      best = preferred;
      break;
    }
    if (best == 0 || start < best_start) {
      best = (pid_t)v;
      best_start = start;
    }
  }
  closedir(d);
  return best;
}

static int same_file_as_self(const char *path) {
  struct stat a, b;
  return stat(path, &a) == 0 && stat("/proc/self/exe", &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Resolves `name` the way execvp does (PATH search when it has no '/'), into buf; 0 when found. */
static int resolve(const char *name, char *buf, size_t len) {
  if (strchr(name, '/')) {
    snprintf(buf, len, "%s", name);
    return access(buf, X_OK);
  }
  const char *path = getenv("PATH");
  if (!path) path = "/usr/local/bin:/bin:/usr/bin";
  while (*path) {
    const char *colon = strchrnul(path, ':');
    int dirlen = (int)(colon - path);
    if (dirlen == 0) /* an empty PATH element means the current directory */
      snprintf(buf, len, "./%s", name);
    else
      snprintf(buf, len, "%.*s/%s", dirlen, path, name);
    if (access(buf, X_OK) == 0) return 0;
    path = *colon ? colon + 1 : colon;
  }
  return -1;
}

/* SIGKILLs what a failed restore left in our namespace and reaps it, within a bound. */
static void kill_leftovers(void) {
  if (getpid() != 1) return; /* kill(-1) outside our own namespace would hit unrelated processes */
  if (kill(-1, SIGKILL) != 0) return; /* ESRCH: nothing but us */
  struct timespec step = {0, 10 * 1000 * 1000};
  for (int waited_ms = 0; waited_ms < FALLBACK_REAP_TIMEOUT_MS; waited_ms += 10) {
    pid_t r;
    while ((r = waitpid(-1, NULL, WNOHANG)) > 0) {
    }
    if (r < 0 && errno == ECHILD) return;
    nanosleep(&step, NULL);
  }
  fprintf(stderr, "thaw-pause: leftover processes did not die within %d ms; exec anyway\n", FALLBACK_REAP_TIMEOUT_MS);
}

static void fall_back(struct state *s) {
  if (!s->orig_argv || !s->orig_argv[0]) {
    fprintf(stderr, "thaw-pause: fallback requested but no original command was given\n");
    exit(EXIT_EXEC_FAILED);
  }
  const char *target = s->orig_argv[0];
  fprintf(stderr, "thaw-pause: fallback: exec %s\n", target);
  const char *path = NULL; /* exec this file instead of searching target (overlay mode, still covered) */
  if (strcmp(s->mode, "overlay") == 0) {
    char resolved[4096];
    if (resolve(target, resolved, sizeof resolved) == 0 && same_file_as_self(resolved)) {
      if (s->original[0] == '\0' || same_file_as_self(s->original)) {
        fprintf(stderr, "thaw-pause: exec %s refused: thaw-pause is still mounted over it\n", resolved);
        exit(EXIT_EXEC_FAILED);
      }
      fprintf(stderr, "thaw-pause: %s is still covered; exec the original entrypoint from %s\n", resolved, s->original);
      path = s->original;
    }
  }
  kill_leftovers();
  arm_deadline(0); /* an interval timer survives exec: a SIGALRM would kill the original command */
  /* Leave the process as the original command would have found it: no subreaper bit, default
   * dispositions (caught ones reset by exec; we ignore none), the mask we were started with. */
  prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
  sigprocmask(SIG_SETMASK, &s->orig_mask, NULL);
  if (path) execv(path, s->orig_argv);
  else execvp(target, s->orig_argv);
  int err = errno;
  fprintf(stderr, "thaw-pause: exec %s failed: %s\n", path ? path : target, strerror(err));
  exit(EXIT_EXEC_FAILED);
}

static void adopt(struct state *s) {
  pid_t w = find_worker();
  if (w == 0) {
    fprintf(stderr, "thaw-pause: adopt requested but there is no child to adopt; still waiting\n");
    return;
  }
  s->worker = w;
  fprintf(stderr, "thaw-pause: adopted worker pid %d\n", (int)w);
}

/* Reaps every exited child; exits with the worker's status when the worker is among them. */
static void reap_all(struct state *s) {
  int status;
  pid_t r;
  while ((r = waitpid(-1, &status, WNOHANG)) > 0) {
    if (s->worker != 0 && r == s->worker) {
      int code = shell_status(status);
      if (WIFSIGNALED(status))
        fprintf(stderr, "thaw-pause: worker %d killed by signal %d; exiting %d\n", (int)r, WTERMSIG(status), code);
      else
        fprintf(stderr, "thaw-pause: worker %d exited %d\n", (int)r, code);
      exit(code);
    }
  }
}

static void usage(FILE *out) {
  fprintf(out,
          "usage: thaw-pause [-- COMMAND [ARG...]]\n"
          "The placeholder process of a thaw restore target. Sleeps and reaps children.\n"
          "  SIGUSR2  exec COMMAND (cold-start fallback; exit 127 if the exec fails)\n"
          "  SIGUSR1  adopt the restored worker (our child); forward TERM/INT/HUP/QUIT/USR1/USR2 to it\n"
          "           and exit with its status\n"
          "  SIGTERM  before adoption: exit 0\n"
          "When started under another name (bind-mounted over an entrypoint), argv is COMMAND.\n"
          "  SIGWINCH before adoption: a restore is under way; the deadline starts again\n"
          "env THAW_PAUSE_WORKER_PID_FILE: optional file naming which child to adopt.\n"
          "env THAW_PAUSE_DEADLINE_MS: fall back by ourselves when no word came within it.\n");
}

int main(int argc, char **argv) {
  struct state s = {0};
  const char *argv0 = argc > 0 && argv[0] ? argv[0] : "";
  const char *base = strrchr(argv0, '/');
  base = base ? base + 1 : argv0;

  if (strcmp(base, OWN_NAME) == 0) {
    s.mode = "args";
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
      printf("thaw-pause %s\n", THAW_PAUSE_VERSION);
      return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--help") == 0) {
      usage(stdout);
      return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--") != 0) {
      usage(stderr);
      return EXIT_USAGE;
    }
    s.orig_argv = argc >= 3 ? argv + 2 : NULL;
  } else {
    s.mode = "overlay";
    s.orig_argv = argv;
  }

  /* Block what we handle, then wait with the original mask minus those: no flag is set between the
   * check and the sleep without waking the sleep. */
  sigset_t handled, wait_mask;
  sigemptyset(&handled);
  for (size_t i = 0; i < COUNT(HANDLED); i++) sigaddset(&handled, HANDLED[i]);
  sigprocmask(SIG_BLOCK, &handled, &s.orig_mask);
  wait_mask = s.orig_mask;
  for (size_t i = 0; i < COUNT(HANDLED); i++) sigdelset(&wait_mask, HANDLED[i]);

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigfillset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
  for (size_t i = 0; i < COUNT(HANDLED); i++) sigaction(HANDLED[i], &sa, NULL);

  /* Outside a PID namespace of our own (tests, debugging) orphans still come to us. */
  prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

  s.deadline_ms = take_deadline_env();
  take_path_env(ORIGINAL_ENV, s.original, sizeof s.original);
  take_path_env(DIFF_MARKER_ENV, s.diff_marker, sizeof s.diff_marker);
  if (s.deadline_ms > 0) arm_deadline(s.deadline_ms);

  fprintf(stderr, "thaw-pause: waiting (mode=%s, argv0=%s)\n", s.mode,
          s.orig_argv && s.orig_argv[0] ? s.orig_argv[0] : "(none)");

  for (;;) {
    if (take(SIGCHLD)) reap_all(&s);
    if (s.worker == 0) {
      if (take(SIGTERM) || take(SIGINT)) {
        fprintf(stderr, "thaw-pause: stop before any restore; exiting 0\n");
        return 0;
      }
      if (take(SIGUSR2)) fall_back(&s);
      if (take(SIGUSR1)) {
        adopt(&s);
        if (s.worker != 0) arm_deadline(0);
        else if (s.deadline_ms > 0) arm_deadline(s.deadline_ms); /* a word all the same */
      }
      if (take(SIGWINCH) && s.deadline_ms > 0) arm_deadline(s.deadline_ms);
      if (take(SIGALRM) && s.deadline_ms > 0) {
        if (diff_applied(&s)) {
          fprintf(stderr, "thaw-pause: no word from the agent within %ld ms, and the rootfs carries the checkpoint's diff that only the agent can undo; exiting %d so that a fresh container starts on the image's own rootfs\n", s.deadline_ms, EXIT_DIFF_NOT_UNDONE);
          return EXIT_DIFF_NOT_UNDONE;
        }
        fprintf(stderr, "thaw-pause: no word from the agent within %ld ms; falling back by ourselves\n", s.deadline_ms);
        fall_back(&s);
      }
      pending[SIGHUP] = 0;
      pending[SIGQUIT] = 0;
    } else {
      for (size_t i = 0; i < COUNT(FORWARDED); i++) {
        int sig = FORWARDED[i];
        if (!take(sig)) continue;
        fprintf(stderr, "thaw-pause: forwarding %s to worker %d\n", signame(sig), (int)s.worker);
        kill(s.worker, sig);
      }
      pending[SIGWINCH] = 0; /* the worker's terminal is none of ours; the deadline is over */
      pending[SIGALRM] = 0;
      /* The worker may have exited before the adoption was processed (its SIGCHLD was taken then). */
      reap_all(&s);
    }
    int any = 0;
    for (size_t i = 0; i < COUNT(HANDLED); i++) any |= pending[HANDLED[i]];
    if (!any) sigsuspend(&wait_mask);
  }
}
