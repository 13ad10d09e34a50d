/*
 * thaw-pack: compresses the lazy pages of a checkpoint into zstd frames, one frame per thaw-fill chunk, on several
 * threads (the checkpoint flow, src/restore-engine/compressed-pages.ts, runs it; docs/performance.md, "Compressed
 * pages"). thaw-fill decompresses a frame where it would otherwise read the chunk from the pages file.
 *
 *   thaw-pack --out FILE [--threads N] [--level L]      the job on stdin, one line each:
 *     file PATH          the pages file the frames after it are read from
 *     r OFFSET PAGES     one frame: PAGES pages (1..256) from byte OFFSET (a page multiple) of that file
 *
 * FILE is created (never overwritten) and holds the frames in job order, nothing between them: a multi-frame zstd
 * stream that `zstd -d` reads as the concatenation of the ranges. Every frame carries its content size and an XXH64
 * checksum of its content, which the decompressor checks. On stdout: one line per frame in job order, its
 * compressed length in bytes, then `done {stats}`; or `error CODE message`, exit 1, and FILE removed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "pread-fully.h"
#include <zstd.h>

#define PAGE 4096ULL
/* thaw-fill's chunk (native/thaw-fill.c CHUNK_PAGES): a frame is at most one chunk, so a chunk is one frame. */
#define MAX_FRAME_PAGES 256
#define MAX_THREADS 64
#define MAX_FILES 4096
/* Frames compressed per round and thread before the round's output is written (bounds the memory held). */
#define FRAMES_PER_THREAD 16

struct job { int fd; uint64_t off; uint32_t pages; };

static struct job *jobs;
static size_t njobs, jobs_cap;
static int fds[MAX_FILES];
static size_t nfds;
static int level = 1, nthreads = 4;
static const char *out_path;
static int out_fd = -1;
static atomic_size_t next_job;
static size_t round_end, round_start;
static char *round_out;
static size_t *lens;
static size_t bound;

static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
}

static void fail(const char *code, const char *fmt, ...) {
  char msg[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  for (char *p = msg; *p; p++) if (*p == '\n') *p = ' ';
  if (out_fd >= 0) unlink(out_path);
  say("error %s %s", code, msg);
  fflush(stdout);
  _exit(1);
}

static void read_fully(int fd, void *buf, size_t len, uint64_t off) {
  uint64_t at;
  int rc = pread_fully(fd, buf, len, off, &at);
  if (rc < 0) fail("READ", "pread of %zu bytes at %" PRIu64 ": %s", (size_t)(off + len - at), at, strerror(errno));
  if (rc > 0) fail("READ", "the pages file ends at %" PRIu64 ", the job reads to %" PRIu64, at, off + len);
}

static void write_fully(const char *buf, size_t len) {
  size_t at = 0;
  while (at < len) {
    ssize_t n = write(out_fd, buf + at, len - at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("WRITE", "write to %s: %s", out_path, strerror(errno));
    at += (size_t)n;
  }
}

static void *compressor(void *arg) {
  (void)arg;
  ZSTD_CCtx *cctx = ZSTD_createCCtx();
  char *in = malloc(MAX_FRAME_PAGES * PAGE);
  if (!cctx || !in) fail("NO_MEMORY", "a compressor's context");
  size_t rc = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level);
  if (!ZSTD_isError(rc)) rc = ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
  if (!ZSTD_isError(rc)) rc = ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
  if (ZSTD_isError(rc)) fail("ZSTD", "setting the compression parameters: %s", ZSTD_getErrorName(rc));
  for (;;) {
    size_t k = atomic_fetch_add(&next_job, 1);
    if (k >= round_end) break;
    struct job *j = &jobs[k];
    size_t len = j->pages * PAGE;
    read_fully(j->fd, in, len, j->off);
    size_t n = ZSTD_compress2(cctx, round_out + (k - round_start) * bound, bound, in, len);
    if (ZSTD_isError(n)) fail("ZSTD", "compressing %zu bytes at %" PRIu64 ": %s", len, j->off, ZSTD_getErrorName(n));
    lens[k] = n;
  }
  ZSTD_freeCCtx(cctx);
  free(in);
  return NULL;
}

static const char *argval(int argc, char **argv, const char *name) {
  for (int i = 1; i + 1 < argc; i++) if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return NULL;
}

static void read_job(void) {
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  int lineno = 0;
  while ((len = getline(&line, &cap, stdin)) >= 0) {
    lineno++;
    if (len == 0 || line[len - 1] != '\n') fail("JOB", "line %d is not terminated", lineno);
    line[len - 1] = '\0';
    if (strncmp(line, "file ", 5) == 0) {
      if (nfds == MAX_FILES) fail("JOB", "more than %d files", MAX_FILES);
      int fd = open(line + 5, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
      if (fd < 0) fail("JOB", "cannot open %s: %s", line + 5, strerror(errno));
      fds[nfds++] = fd;
    } else if (line[0] == 'r' && line[1] == ' ') {
      uint64_t off, pages;
      char extra;
      if (nfds == 0) fail("JOB", "line %d: a frame before any file", lineno);
      if (sscanf(line + 2, "%" SCNu64 " %" SCNu64 " %c", &off, &pages, &extra) != 2 || off % PAGE || pages == 0 || pages > MAX_FRAME_PAGES) fail("JOB", "line %d: bad frame", lineno);
      if (njobs == jobs_cap) {
        jobs_cap = jobs_cap ? jobs_cap * 2 : 1024;
        jobs = realloc(jobs, jobs_cap * sizeof *jobs);
        if (!jobs) fail("NO_MEMORY", "the job list");
      }
      jobs[njobs++] = (struct job){.fd = fds[nfds - 1], .off = off, .pages = (uint32_t)pages};
    } else {
      fail("JOB", "line %d: unknown line", lineno);
    }
  }
  free(line);
}

int main(int argc, char **argv) {
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  out_path = argval(argc, argv, "--out");
  const char *threads = argval(argc, argv, "--threads"), *lv = argval(argc, argv, "--level");
  if (!out_path) fail("USAGE", "usage: thaw-pack --out FILE [--threads N] [--level L] < job");
  if (threads) nthreads = atoi(threads);
  if (lv) level = atoi(lv);
  if (nthreads < 1 || nthreads > MAX_THREADS) fail("USAGE", "--threads must be 1..%d", MAX_THREADS);
  if (level < 1 || level > ZSTD_maxCLevel()) fail("USAGE", "--level must be 1..%d", ZSTD_maxCLevel());
  read_job();
  out_fd = open(out_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (out_fd < 0) fail("WRITE", "cannot create %s: %s", out_path, strerror(errno));
  bound = ZSTD_compressBound(MAX_FRAME_PAGES * PAGE);
  size_t per_round = (size_t)nthreads * FRAMES_PER_THREAD;
  round_out = malloc(per_round * bound);
  lens = calloc(njobs ? njobs : 1, sizeof *lens);
  if (!round_out || !lens) fail("NO_MEMORY", "the output buffers");
  uint64_t in_bytes = 0, out_bytes = 0;
  for (round_start = 0; round_start < njobs; round_start = round_end) {
    round_end = round_start + per_round < njobs ? round_start + per_round : njobs;
    atomic_store(&next_job, round_start);
    pthread_t tids[MAX_THREADS];
    int n = nthreads < (int)(round_end - round_start) ? nthreads : (int)(round_end - round_start);
    for (int i = 0; i < n; i++) if (pthread_create(&tids[i], NULL, compressor, NULL) != 0) fail("THREAD", "pthread_create: %s", strerror(errno));
    for (int i = 0; i < n; i++) pthread_join(tids[i], NULL);
    for (size_t k = round_start; k < round_end; k++) {
      write_fully(round_out + (k - round_start) * bound, lens[k]);
      in_bytes += jobs[k].pages * PAGE;
      out_bytes += lens[k];
    }
  }
  if (fsync(out_fd) < 0 || close(out_fd) < 0) fail("WRITE", "%s: %s", out_path, strerror(errno));
  for (size_t k = 0; k < njobs; k++) printf("%zu\n", lens[k]);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
  say("done {\"frames\":%zu,\"inBytes\":%" PRIu64 ",\"outBytes\":%" PRIu64 ",\"threads\":%d,\"level\":%d,\"ms\":%.1f}", njobs, in_bytes, out_bytes, nthreads, level, ms);
  return fflush(stdout) == 0 ? 0 : 1;
}
