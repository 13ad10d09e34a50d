/*
 * thaw-fill: fills a restored process's memory through userfaultfd while it runs, in parallel from the page
 * cache (docs/performance.md, "Memory fill"; the restore flow, src/restore-engine/memory-fill.ts, runs it).
 *
 * CRIU restores with `lazy_pages`: its restorer leaves the pages of private anonymous mappings out, registers
 * those mappings with a userfaultfd per task and sends each one to a "lazy-pages daemon" over a UNIX socket named
 * lazy-pages.socket in CRIU's work directory. This program is that daemon for a local restore (CRIU's own,
 * `criu lazy-pages`, copies on one thread and only after the restore; this one starts at the first uffd):
 *
 *   thaw-fill --plan FILE [--images-dir DIR] --threads N --timeout-ms T      (cwd: CRIU's work directory)
 *             [--hold-sweep-until PATH]   tests only: the sweep starts once PATH exists (faults are served
 *                                         meanwhile), so a test can act while pages are known to be missing
 *
 * The wire protocol on the socket, as CRIU's criu/uffd.c speaks it (read there, not copied): per task an int pid
 * (the task's pid in the images; negative for a zombie, which sends nothing else), then one byte carrying the
 * uffd as SCM_RIGHTS; after the last task the u32 0x52535446 ("ReSTore Finished"), once the restorer has
 * registered every mapping (pids are below 2^22, so the marker cannot be a pid).
 *
 * The plan (written by the agent from the verified images; one line each):
 *   thaw-fill-plan 1          or 2: a plan that may name compressed pages (the two lines marked v2)
 *   zpages FILE               v2, once, before any task: the checkpoint's compressed pages (thaw-pack's frames)
 *   task PID PAGES_FILE       the task's pages-N.img ("-" when it has no lazy pages); with --images-dir a plain
 *                             name in that directory (the plan stored with a checkpoint), opened through its fd
 *   c ADDR_HEX PAGES OFFSET   PAGES pages at ADDR come from PAGES_FILE at byte OFFSET (each within one VMA)
 *   x ADDR_HEX PAGES ZOFF ZLEN  v2: PAGES pages (at most CHUNK_PAGES) at ADDR are the zstd frame of ZLEN bytes at
 *                             byte ZOFF of FILE (within one VMA); a frame that does not decompress to exactly
 *                             those pages, or fails its checksum, is an error (FRAME), never a partial fill
 *   z ADDR_HEX PAGES          PAGES pages at ADDR are zeros (pages the checkpoint dropped as all-zero)
 *
 * How it stays exact: a page is only ever placed by UFFDIO_COPY / UFFDIO_ZEROPAGE, which never overwrite a page
 * that is there (EEXIST), so a page the process or the other path already has is left alone. munmap, mremap
 * and madvise(DONTNEED) in the process arrive as events, and the kernel refuses every fill into that mm while
 * one is unread (EAGAIN); the event thread reads them under a write lock that every fill holds for reading, and
 * marks removed pages before any fill can run again, so a page the process dropped is never brought back. A
 * fork while the memory is being filled is refused (the child's memory would need a plan of its own).
 *
 * What it writes on stdout, one line each: `ready` once the socket listens, then `done {stats}` (every page is
 * in; the uffds are closed, which unregisters the mappings, and it exits 0) or `error CODE message`. After an
 * error before the first uffd it exits 3; after one it keeps every uffd open and waits to be killed: a closed uffd would let the process read the pages it
 * still lacks as zeros, whereas an open one holds a faulting thread until the agent kills the tree.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "pread-fully.h"
#include <zstd.h>

#define PAGE 4096ULL
/* A sweeper's unit: large enough that an ioctl per chunk costs nothing, small enough to share out evenly. */
#define CHUNK_PAGES 256
/* A fault copies this many pages from the faulting one on (a sequential reader faults once per window). */
#define FAULT_WINDOW_PAGES 32
#define MAX_THREADS 64
#define MAX_TASKS 4096
#define RESTORE_FINISHED 0x52535446u
#define SOCKET_NAME "lazy-pages.socket"
#define NO_OFFSET UINT64_MAX
/*
 * A sweeper refused for an unread event sleeps until the event thread has read it (a futex on the task's
 * `drained`), at most this long; once it has been read it retries with sched_yield up to EVENT_SPINS times, for
 * the kernel lets fills in only once the thread that caused the event runs on. Spinning all along would keep
 * every sweeper in UFFDIO_COPY, each taking the process's mmap lock, while that process waits on its event.
 */
#define EVENT_WAIT_NS 200000L
#define EVENT_SPINS 64

struct chunk {
  uint64_t addr;   /* where the pages are now (mremap moves it) */
  uint64_t off;    /* offset in the pages file (zlen 0) or of its frame in the zpages file; NO_OFFSET: zeros */
  uint32_t pages;
  uint32_t task;
  uint32_t zlen;   /* the frame's compressed length; 0: plain pages or zeros */
  atomic_bool placed; /* a fault placed the whole frame: a sweeper need not decompress it again */
  uint64_t removed[CHUNK_PAGES / 64];
};

struct task {
  int pid;
  int uffd;
  int pages_fd;
  size_t first, count;    /* its chunks, chunks[first .. first+count), kept sorted by addr */
  pthread_rwlock_t lock;
  /* Bumped (and waited on as a futex) each time the event thread has read this uffd's messages. */
  _Atomic uint32_t drained;
  atomic_bool gone;
  bool unsorted;          /* a mremap moved some of its chunks: find_chunk scans (the event thread's own field) */
};

static struct chunk *chunks;
static size_t nchunks, chunks_cap;
static struct task tasks[MAX_TASKS];
static size_t ntasks;
static atomic_size_t next_chunk;
static atomic_bool failed;
static atomic_bool holding_uffds; /* a uffd was received: from then on an error parks instead of exiting */
static atomic_uint_fast64_t copied_bytes, zeroed_bytes, fault_count, eexist_count, eagain_count, wait_count, event_count, frame_count;
static int nthreads = 4;
static long timeout_ms = 120000;
static struct timespec t_start, t_finished;
static const char *hold_sweep_until;
static int images_dir_fd = -1;
static int zpages_fd = -1;
/*
 * A chunk's pages as bytes: the buffers of one thread (each sweeper, and the event thread for faults). `frame`:
 * the chunk whose whole frame buf holds (NULL: none), so that a fault retried, or the next fault in the same
 * frame, does not decompress it again.
 */
struct reader { char *buf; char *zbuf; ZSTD_DCtx *dctx; const struct chunk *frame; };

static double ms_since(const struct timespec *a) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - a->tv_sec) * 1e3 + (double)(now.tv_nsec - a->tv_nsec) / 1e6;
}

static void say(const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n > sizeof line - 2) n = (int)sizeof line - 2;
  line[n++] = '\n';
  for (ssize_t at = 0; at < n;) {
    ssize_t w = write(STDOUT_FILENO, line + at, (size_t)(n - at));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    at += w;
  }
}

/* Reports the first failure and parks the calling thread for good; every uffd stays open (see the top). */
static void fail(const char *code, const char *fmt, ...) {
  bool expected = false;
  if (atomic_compare_exchange_strong(&failed, &expected, true)) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++) if (*p == '\n') *p = ' ';
    say("error %s %s", code, msg);
  }
  /* Before any uffd nothing of a process depends on us: exit. After, park (see the top). */
  if (!atomic_load(&holding_uffds)) _exit(3);
  for (;;) pause();
}

static struct task *task_of_pid(int pid) {
  for (size_t i = 0; i < ntasks; i++) if (tasks[i].pid == pid) return &tasks[i];
  return NULL;
}

static void add_chunk(uint64_t addr, uint64_t off, uint64_t pages, uint32_t zlen) {
  /* A frame is placed as one chunk: it decompresses only whole. */
  if (zlen != 0 && pages > CHUNK_PAGES) fail("PLAN", "a frame of %" PRIu64 " pages (at most %d)", pages, CHUNK_PAGES);
  while (pages > 0) {
    uint32_t n = pages > CHUNK_PAGES ? CHUNK_PAGES : (uint32_t)pages;
    if (nchunks == chunks_cap) {
      chunks_cap = chunks_cap ? chunks_cap * 2 : 1024;
      chunks = realloc(chunks, chunks_cap * sizeof *chunks);
      if (!chunks) fail("NO_MEMORY", "cannot grow the chunk list to %zu", chunks_cap);
    }
    struct chunk *c = &chunks[nchunks++];
    memset(c, 0, sizeof *c);
    c->addr = addr;
    c->off = off;
    c->pages = n;
    c->task = (uint32_t)(ntasks - 1);
    c->zlen = zlen;
    tasks[ntasks - 1].count++;
    addr += n * PAGE;
    if (off != NO_OFFSET) off += n * PAGE;
    pages -= n;
  }
}

static int by_addr(const void *a, const void *b) {
  const struct chunk *x = a, *y = b;
  return x->addr < y->addr ? -1 : x->addr > y->addr;
}

/* A file the plan names: with --images-dir a plain name in that directory (opened through its fd). */
static int open_named(const char *path, int lineno, const char *file) {
  if (images_dir_fd >= 0 && (strchr(file, '/') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0 || file[0] == '\0')) {
    fail("PLAN", "%s:%d: %s is not a name in the images directory", path, lineno + 1, file);
  }
  int fd = images_dir_fd >= 0 ? openat(images_dir_fd, file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW) : open(file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) fail("PLAN", "cannot open %s: %s", file, strerror(errno));
  return fd;
}

static void read_plan(const char *path) {
  FILE *f = fopen(path, "re");
  if (!f) fail("PLAN", "cannot open the plan %s: %s", path, strerror(errno));
  char line[4352];
  int lineno = 0;
  if (!fgets(line, sizeof line, f) || (strcmp(line, "thaw-fill-plan 1\n") != 0 && strcmp(line, "thaw-fill-plan 2\n") != 0)) fail("PLAN", "%s: not a thaw-fill-plan 1 or 2", path);
  const bool v2 = line[15] == '2';
  const uint64_t max_zlen = ZSTD_compressBound(CHUNK_PAGES * PAGE);
  while (fgets(line, sizeof line, f)) {
    lineno++;
    size_t len = strlen(line);
    if (len == 0 || line[len - 1] != '\n') fail("PLAN", "%s:%d: line too long or unterminated", path, lineno + 1);
    line[len - 1] = '\0';
    if (strncmp(line, "task ", 5) == 0) {
      char *end;
      long pid = strtol(line + 5, &end, 10);
      if (end == line + 5 || *end != ' ' || pid <= 0 || pid > INT32_MAX) fail("PLAN", "%s:%d: bad task line", path, lineno + 1);
      if (ntasks == MAX_TASKS) fail("PLAN", "more than %d tasks", MAX_TASKS);
      if (task_of_pid((int)pid)) fail("PLAN", "%s:%d: task %ld twice", path, lineno + 1, pid);
      struct task *t = &tasks[ntasks++];
      t->pid = (int)pid;
      t->uffd = -1;
      t->pages_fd = -1;
      t->first = nchunks;
      const char *file = end + 1;
      if (strcmp(file, "-") != 0) t->pages_fd = open_named(path, lineno, file);
      pthread_rwlockattr_t attr;
      pthread_rwlockattr_init(&attr);
      /* The event thread must not wait behind a stream of fills. */
      pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
      pthread_rwlock_init(&t->lock, &attr);
      pthread_rwlockattr_destroy(&attr);
    } else if (v2 && strncmp(line, "zpages ", 7) == 0) {
      if (ntasks > 0 || zpages_fd >= 0) fail("PLAN", "%s:%d: zpages once, before any task", path, lineno + 1);
      zpages_fd = open_named(path, lineno, line + 7);
    } else if (v2 && line[0] == 'x' && line[1] == ' ') {
      uint64_t addr, pages, zoff, zlen;
      char extra;
      if (ntasks == 0) fail("PLAN", "%s:%d: a range before any task", path, lineno + 1);
      if (zpages_fd < 0) fail("PLAN", "%s:%d: a compressed range without a zpages file", path, lineno + 1);
      if (sscanf(line + 2, "%" SCNx64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %c", &addr, &pages, &zoff, &zlen, &extra) != 4 || addr % PAGE || pages == 0 || pages > CHUNK_PAGES || zlen == 0 || zlen > max_zlen || zoff > UINT64_MAX - zlen) {
        fail("PLAN", "%s:%d: bad compressed range", path, lineno + 1);
      }
      add_chunk(addr, zoff, pages, (uint32_t)zlen);
    } else if ((line[0] == 'c' || line[0] == 'z') && line[1] == ' ') {
      if (ntasks == 0) fail("PLAN", "%s:%d: a range before any task", path, lineno + 1);
      uint64_t addr, pages, off = NO_OFFSET;
      int n = line[0] == 'c' ? sscanf(line + 2, "%" SCNx64 " %" SCNu64 " %" SCNu64, &addr, &pages, &off)
                             : sscanf(line + 2, "%" SCNx64 " %" SCNu64, &addr, &pages);
      if (n != (line[0] == 'c' ? 3 : 2) || addr % PAGE || pages == 0 || (off != NO_OFFSET && off % PAGE)) fail("PLAN", "%s:%d: bad range", path, lineno + 1);
      if (line[0] == 'c' && tasks[ntasks - 1].pages_fd < 0) fail("PLAN", "%s:%d: a copy range of a task without a pages file", path, lineno + 1);
      add_chunk(addr, off, pages, 0);
    } else {
      fail("PLAN", "%s:%d: unknown line", path, lineno + 1);
    }
  }
  fclose(f);
  for (size_t i = 0; i < ntasks; i++) {
    struct task *t = &tasks[i];
    qsort(chunks + t->first, t->count, sizeof *chunks, by_addr);
    for (size_t j = t->first + 1; j < t->first + t->count; j++) {
      if (chunks[j - 1].addr + chunks[j - 1].pages * PAGE > chunks[j].addr) fail("PLAN", "task %d: ranges overlap at %#" PRIx64, t->pid, chunks[j].addr);
    }
  }
}

static bool page_removed(const struct chunk *c, uint32_t i) { return (c->removed[i / 64] >> (i % 64)) & 1; }

/* The chunk of `t` holding `addr`, or NULL (binary search; the event thread's own view). */
static struct chunk *find_chunk(struct task *t, uint64_t addr) {
  if (t->unsorted) {
    for (size_t k = t->first; k < t->first + t->count; k++) {
      if (addr >= chunks[k].addr && addr < chunks[k].addr + chunks[k].pages * PAGE) return &chunks[k];
    }
    return NULL;
  }
  size_t lo = t->first, hi = t->first + t->count;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    struct chunk *c = &chunks[mid];
    if (addr < c->addr) hi = mid;
    else if (addr >= c->addr + c->pages * PAGE) lo = mid + 1;
    else return c;
  }
  return NULL;
}

static void read_fully(int fd, void *buf, size_t len, uint64_t off) {
  uint64_t at;
  int rc = pread_fully(fd, buf, len, off, &at);
  if (rc < 0) fail("READ", "pread of %zu bytes at %" PRIu64 ": %s", (size_t)(off + len - at), at, strerror(errno));
  if (rc > 0) fail("READ", "the pages file ends at %" PRIu64 ", the plan reads to %" PRIu64, at, off + len);
}

static void init_reader(struct reader *r) {
  r->buf = aligned_alloc(PAGE, CHUNK_PAGES * PAGE);
  r->zbuf = malloc(ZSTD_compressBound(CHUNK_PAGES * PAGE)); /* read_plan bounds every frame's length by it */
  r->dctx = ZSTD_createDCtx();
  r->frame = NULL;
  if (!r->buf || !r->zbuf || !r->dctx) fail("NO_MEMORY", "a reader's buffers");
}

/*
 * The bytes of pages [from, to) of `c` (not zeros), valid until the reader's next call: read from the pages file,
 * or the chunk's whole frame read and decompressed (it decompresses only whole) and the range's part of it.
 */
static const char *chunk_bytes(struct reader *r, const struct task *t, const struct chunk *c, uint32_t from, uint32_t to) {
  if (c->zlen == 0) {
    r->frame = NULL;
    read_fully(t->pages_fd, r->buf, (to - from) * PAGE, c->off + from * PAGE);
    return r->buf;
  }
  /* A chunk's frame is fixed for the run (mremap moves only its addr): the bytes decompressed are still its. */
  if (r->frame == c) return r->buf + (size_t)from * PAGE;
  r->frame = NULL;
  read_fully(zpages_fd, r->zbuf, c->zlen, c->off);
  size_t n = ZSTD_decompressDCtx(r->dctx, r->buf, c->pages * PAGE, r->zbuf, c->zlen);
  if (ZSTD_isError(n)) fail("FRAME", "task %d: the frame at %" PRIu64 " (%u bytes) for %#" PRIx64 ": %s", t->pid, c->off, c->zlen, c->addr, ZSTD_getErrorName(n));
  if (n != c->pages * PAGE) fail("FRAME", "task %d: the frame at %" PRIu64 " holds %zu bytes, the plan places %u pages", t->pid, c->off, n, c->pages);
  r->frame = c;
  return r->buf + (size_t)from * PAGE;
}

enum fill_result { FILL_OK, FILL_AGAIN, FILL_GONE };

/* Sleeps until the event thread has read `t`'s events since `seen` (its `drained`), at most EVENT_WAIT_NS. */
static void wait_drained(struct task *t, uint32_t seen) {
  atomic_fetch_add(&wait_count, 1);
  struct timespec ts = {.tv_sec = 0, .tv_nsec = EVENT_WAIT_NS};
  syscall(SYS_futex, &t->drained, FUTEX_WAIT_PRIVATE, seen, &ts, NULL, 0);
}

/*
 * Places pages [from, to) of `c` (src: their bytes, or NULL for zeros), skipping removed pages and pages that
 * are there. Holds the task's lock for reading around each ioctl. `once`: give up with FILL_AGAIN on the first
 * EAGAIN (the event thread must go back to reading events); otherwise retry until the events are read.
 */
static enum fill_result fill_pages(struct task *t, struct chunk *c, uint32_t from, uint32_t to, const char *src, bool once) {
  uint32_t i = from;
  uint32_t slept_on = 0, spins = 0;
  bool slept = false;
  while (i < to) {
    if (atomic_load(&failed)) for (;;) pause();
    pthread_rwlock_rdlock(&t->lock);
    if (atomic_load(&t->gone)) {
      pthread_rwlock_unlock(&t->lock);
      return FILL_GONE;
    }
    while (i < to && page_removed(c, i)) i++;
    uint32_t j = i;
    while (j < to && !page_removed(c, j)) j++;
    if (i == to) {
      pthread_rwlock_unlock(&t->lock);
      break;
    }
    uint64_t dst = c->addr + i * PAGE, len = (uint64_t)(j - i) * PAGE;
    const uint32_t seen = atomic_load(&t->drained);
    int rc, err;
    int64_t done;
    if (src) {
      struct uffdio_copy cp = {.dst = dst, .src = (uint64_t)(uintptr_t)(src + (size_t)(i - from) * PAGE), .len = len, .mode = 0};
      rc = ioctl(t->uffd, UFFDIO_COPY, &cp);
      err = errno;
      done = cp.copy;
    } else {
      struct uffdio_zeropage zp = {.range = {.start = dst, .len = len}, .mode = 0};
      rc = ioctl(t->uffd, UFFDIO_ZEROPAGE, &zp);
      err = errno;
      done = zp.zeropage;
    }
    pthread_rwlock_unlock(&t->lock);
    uint64_t placed = rc == 0 ? len : (done > 0 ? (uint64_t)done : 0);
    atomic_fetch_add(src ? &copied_bytes : &zeroed_bytes, placed);
    i += (uint32_t)(placed / PAGE);
    if (rc == 0) continue;
    switch (err) {
      case EAGAIN:
        /* An event of this mm is unread (or the copy was cut short): fill nothing until it is. */
        atomic_fetch_add(&eagain_count, 1);
        if (once) return FILL_AGAIN;
        if (placed > 0) break; /* the copy was cut short: go on from where it stopped */
        if ((!slept || seen != slept_on) && ++spins <= EVENT_SPINS) {
          sched_yield();
          break;
        }
        spins = 0;
        slept = true;
        slept_on = seen;
        wait_drained(t, seen);
        break;
      case EEXIST:
        /* That page is there already (the other path, or the process): it is never overwritten. */
        atomic_fetch_add(&eexist_count, 1);
        i++;
        break;
      case ENOENT:
        /*
         * The range spans two VMAs (an mprotect split one): page by page. A single page with no registered
         * mapping is one the plan must place and cannot (an unmapped page arrives as an event first and is
         * skipped above): the process would read zeros there, so that is an error, never a skip.
         */
        if (j - i > 1) {
          for (uint32_t k = i; k < j; k++) {
            enum fill_result r = fill_pages(t, c, k, k + 1, src ? src + (size_t)(k - from) * PAGE : NULL, once);
            if (r != FILL_OK) return r;
          }
          i = j;
          break;
        }
        if (!src) { i++; break; } /* a zero range over no registered mapping: nothing of the image is lost */
        fail("UNREGISTERED", "task %d: no registered mapping for a page of its image at %#" PRIx64, t->pid, dst);
        break;
      case ESRCH:
        atomic_store(&t->gone, true);
        return FILL_GONE;
      default:
        fail("UFFD", "task %d: %s of %" PRIu64 " bytes at %#" PRIx64 ": %s", t->pid, src ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", len, dst, strerror(err));
    }
  }
  return FILL_OK;
}

static void *sweeper(void *arg) {
  struct reader *r = arg;
  for (;;) {
    size_t k = atomic_fetch_add(&next_chunk, 1);
    if (k >= nchunks) return NULL;
    /* In plan order: by address within each task (a chunk stays where it is; mremap moves only its addr). */
    struct chunk *c = &chunks[k];
    struct task *t = &tasks[c->task];
    if (t->uffd < 0 || atomic_load(&t->gone) || atomic_load(&c->placed)) continue;
    fill_pages(t, c, 0, c->pages, c->off != NO_OFFSET ? chunk_bytes(r, t, c, 0, c->pages) : NULL, false);
  }
}

/* munmap / madvise(DONTNEED) of [start, end): those pages must stay as the process left them. */
static void mark_removed(struct task *t, uint64_t start, uint64_t end) {
  for (size_t k = t->first; k < t->first + t->count; k++) {
    struct chunk *c = &chunks[k];
    uint64_t cs = c->addr, ce = c->addr + c->pages * PAGE;
    if (ce <= start || cs >= end) continue;
    uint64_t s = start > cs ? start : cs, e = end < ce ? end : ce;
    for (uint64_t a = s & ~(PAGE - 1); a < e; a += PAGE) {
      uint32_t i = (uint32_t)((a - cs) / PAGE);
      c->removed[i / 64] |= 1ULL << (i % 64);
    }
  }
}

static void remap(struct task *t, uint64_t from, uint64_t to, uint64_t len) {
  for (size_t k = t->first; k < t->first + t->count; k++) {
    struct chunk *c = &chunks[k];
    uint64_t cs = c->addr, ce = c->addr + c->pages * PAGE;
    if (ce <= from || cs >= from + len) continue;
    if (cs < from || ce > from + len) fail("REMAP", "task %d moved [%#" PRIx64 ", +%" PRIu64 ") across a range still being filled", t->pid, from, len);
    /* Only the address moves: a sweeper may hold this chunk (its bytes are read by offset), so nothing is re-sorted. */
    c->addr = cs - from + to;
    t->unsorted = true;
  }
}

struct fault { struct task *t; uint64_t addr; };
static struct fault *retry, *pending;
static size_t nretry, npending, fault_cap = 4096;

static void push_fault(struct fault **list, size_t *n, struct task *t, uint64_t addr) {
  if (*n == fault_cap) {
    /* Each faulting thread waits on one fault: more than this many at once is not a process we restore. */
    fail("FAULTS", "more than %zu page faults waiting at once", fault_cap);
  }
  (*list)[(*n)++] = (struct fault){t, addr};
}

/* Reads every message of `t`'s uffd, applying the events before any fill can run again (the write lock). */
static void drain_uffd(struct task *t) {
  struct uffd_msg msgs[64];
  pthread_rwlock_wrlock(&t->lock);
  for (;;) {
    ssize_t n = read(t->uffd, msgs, sizeof msgs);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    if (n < 0) fail("UFFD", "task %d: read of its uffd: %s", t->pid, strerror(errno));
    if (n == 0 || n % (ssize_t)sizeof msgs[0]) fail("UFFD", "task %d: a short uffd message (%zd bytes)", t->pid, n);
    for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
      struct uffd_msg *m = &msgs[i];
      switch (m->event) {
        case UFFD_EVENT_PAGEFAULT:
          atomic_fetch_add(&fault_count, 1);
          push_fault(&pending, &npending, t, m->arg.pagefault.address & ~(PAGE - 1));
          break;
        case UFFD_EVENT_REMOVE:
          atomic_fetch_add(&event_count, 1);
          mark_removed(t, m->arg.remove.start, m->arg.remove.end);
          break;
        case UFFD_EVENT_UNMAP:
          atomic_fetch_add(&event_count, 1);
          mark_removed(t, m->arg.remove.start, m->arg.remove.end);
          break;
        case UFFD_EVENT_REMAP:
          atomic_fetch_add(&event_count, 1);
          remap(t, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
          break;
        case UFFD_EVENT_FORK:
          fail("FORK", "task %d forked while its memory was being filled", t->pid);
          break;
        default:
          fail("UFFD", "task %d: unknown uffd event %u", t->pid, m->event);
      }
    }
    if ((size_t)n < sizeof msgs) break;
  }
  pthread_rwlock_unlock(&t->lock);
  atomic_fetch_add(&t->drained, 1);
  syscall(SYS_futex, &t->drained, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* A faulting page: its window from the image, zeros where the image has none. FILL_AGAIN: retry later. */
static enum fill_result serve_fault(struct task *t, uint64_t addr, struct reader *r) {
  struct chunk *c = find_chunk(t, addr);
  if (!c || page_removed(c, (uint32_t)((addr - c->addr) / PAGE))) {
    /* Not in the image (an untouched page), or dropped by the process since: zeros, as the kernel would give. */
    struct chunk one = {.addr = addr, .off = NO_OFFSET, .pages = 1};
    return fill_pages(t, &one, 0, 1, NULL, true);
  }
  uint32_t i = (uint32_t)((addr - c->addr) / PAGE);
  uint32_t end = i + FAULT_WINDOW_PAGES < c->pages ? i + FAULT_WINDOW_PAGES : c->pages;
  if (c->off == NO_OFFSET) return fill_pages(t, c, i, end, NULL, true);
  enum fill_result res = fill_pages(t, c, i, end, chunk_bytes(r, t, c, i, end), true);
  if (res != FILL_OK || c->zlen == 0 || atomic_load(&c->placed)) return res;
  /*
   * A frame is decompressed whole for any of its pages: its other pages go in too (the faulting window first,
   * so the thread is woken by its own copy), and the sweepers skip it. Best effort: a refusal leaves them to
   * the sweep; the fault itself is served.
   */
  const char *frame = chunk_bytes(r, t, c, 0, c->pages);
  enum fill_result after = fill_pages(t, c, end, c->pages, frame + (size_t)end * PAGE, true);
  if (after == FILL_OK) after = fill_pages(t, c, 0, i, frame, true);
  if (after == FILL_OK) {
    atomic_store(&c->placed, true);
    atomic_fetch_add(&frame_count, 1);
  }
  return after == FILL_GONE ? FILL_GONE : FILL_OK;
}

static void wake_page(struct task *t, uint64_t addr) {
  struct uffdio_range r = {.start = addr, .len = PAGE};
  if (ioctl(t->uffd, UFFDIO_WAKE, &r) < 0 && errno != ESRCH && errno != ENOENT) fail("UFFD", "task %d: UFFDIO_WAKE: %s", t->pid, strerror(errno));
}

static int recv_uffd(int sk) {
  char byte;
  struct iovec iov = {.iov_base = &byte, .iov_len = 1};
  union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
  ssize_t n;
  do n = recvmsg(sk, &mh, MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
  if (n != 1) fail("PROTOCOL", "no uffd after a pid (%zd: %s)", n, n < 0 ? strerror(errno) : "short");
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  if (!cm || cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN(sizeof(int)) || (mh.msg_flags & MSG_CTRUNC)) fail("PROTOCOL", "the message after a pid carries no single fd");
  int fd;
  memcpy(&fd, CMSG_DATA(cm), sizeof fd);
  return fd;
}

static void recv_exact(int sk, void *p, size_t len, bool *eof) {
  size_t at = 0;
  while (at < len) {
    ssize_t n = recv(sk, (char *)p + at, len - at, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 && at == 0 && eof) { *eof = true; return; }
    if (n <= 0) fail("PROTOCOL", "CRIU's socket: %s", n < 0 ? strerror(errno) : "closed mid-message");
    at += (size_t)n;
  }
}

static const char *argval(int argc, char **argv, const char *name) {
  for (int i = 1; i + 1 < argc; i++) if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return NULL;
}

int main(int argc, char **argv) {
  clock_gettime(CLOCK_MONOTONIC, &t_start);
  signal(SIGPIPE, SIG_IGN);
  const char *plan = argval(argc, argv, "--plan");
  const char *threads = argval(argc, argv, "--threads");
  const char *timeout = argval(argc, argv, "--timeout-ms");
  if (!plan) fail("USAGE", "usage: thaw-fill --plan FILE [--threads N] [--timeout-ms T] (cwd: CRIU's work directory)");
  if (threads) nthreads = atoi(threads);
  if (nthreads < 1 || nthreads > MAX_THREADS) fail("USAGE", "--threads must be 1..%d", MAX_THREADS);
  if (timeout) timeout_ms = atol(timeout);
  hold_sweep_until = argval(argc, argv, "--hold-sweep-until");
  const char *images_dir = argval(argc, argv, "--images-dir");
  if (images_dir) {
    images_dir_fd = open(images_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (images_dir_fd < 0) fail("PLAN", "cannot open the images directory %s: %s", images_dir, strerror(errno));
  }
  if (timeout_ms < 1) fail("USAGE", "--timeout-ms must be positive");
  read_plan(plan);
  retry = malloc(fault_cap * sizeof *retry);
  pending = malloc(fault_cap * sizeof *pending);
  struct reader fault_reader;
  init_reader(&fault_reader);
  if (!retry || !pending) fail("NO_MEMORY", "fault lists");

  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, SOCKET_NAME);
  unlink(SOCKET_NAME);
  if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || chmod(SOCKET_NAME, 0600) < 0 || listen(ls, 1) < 0) fail("SOCKET", "cannot listen on %s: %s", SOCKET_NAME, strerror(errno));
  say("ready");

  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) fail("EPOLL", "epoll_create1: %s", strerror(errno));
  struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev) < 0) fail("EPOLL", "epoll_ctl: %s", strerror(errno));

  int sk = -1;
  bool finished = false, sk_open = false, sweeping = false;
  pthread_t tids[MAX_THREADS];
  struct reader readers[MAX_THREADS];
  int started = 0;
  bool joined = false;
  for (;;) {
    if (ms_since(&t_start) > (double)timeout_ms) fail("TIMEOUT", "the fill took longer than %ld ms", timeout_ms);
    struct epoll_event evs[64];
    int n = epoll_wait(ep, evs, 64, nretry > 0 ? 1 : (finished ? 5 : 100));
    if (n < 0 && errno != EINTR) fail("EPOLL", "epoll_wait: %s", strerror(errno));
    for (int e = 0; e < n; e++) {
      uint64_t tag = evs[e].data.u64;
      if (tag == UINT64_MAX) {
        sk = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (sk < 0) fail("SOCKET", "accept: %s", strerror(errno));
        epoll_ctl(ep, EPOLL_CTL_DEL, ls, NULL);
        close(ls);
        unlink(SOCKET_NAME);
        struct epoll_event sev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = UINT64_MAX - 1};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, sk, &sev) < 0) fail("EPOLL", "epoll_ctl: %s", strerror(errno));
        sk_open = true;
      } else if (tag == UINT64_MAX - 1) {
        /* One word per wake-up: a pid (then its uffd), or the end of the restore. */
        bool eof = false;
        int32_t word;
        recv_exact(sk, &word, sizeof word, &eof);
        if (eof) {
          if (!finished) fail("CRIU_GONE", "CRIU closed its socket before the restore finished");
          epoll_ctl(ep, EPOLL_CTL_DEL, sk, NULL);
          close(sk);
          sk_open = false;
          continue;
        }
        if ((uint32_t)word == RESTORE_FINISHED) {
          if (finished) fail("PROTOCOL", "the restore finished twice");
          for (size_t i = 0; i < ntasks; i++) if (tasks[i].uffd < 0 && tasks[i].count > 0) fail("PROTOCOL", "task %d has pages to fill and sent no uffd", tasks[i].pid);
          finished = true;
          clock_gettime(CLOCK_MONOTONIC, &t_finished);
          continue;
        }
        if (word < 0) continue; /* a zombie: no memory, no uffd */
        struct task *t = task_of_pid(word);
        if (!t) fail("PROTOCOL", "CRIU sent a uffd for pid %d, which the plan does not have", word);
        if (t->uffd >= 0) fail("PROTOCOL", "a second uffd for pid %d", word);
        t->uffd = recv_uffd(sk);
        atomic_store(&holding_uffds, true);
        int fl = fcntl(t->uffd, F_GETFL);
        if (fl < 0 || fcntl(t->uffd, F_SETFL, fl | O_NONBLOCK) < 0) fail("UFFD", "fcntl: %s", strerror(errno));
        struct epoll_event uev = {.events = EPOLLIN, .data.u64 = (uint64_t)(t - tasks)};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, t->uffd, &uev) < 0) fail("EPOLL", "epoll_ctl: %s", strerror(errno));
      } else {
        drain_uffd(&tasks[tag]);
      }
    }
    if (finished && !sweeping && (!hold_sweep_until || access(hold_sweep_until, F_OK) == 0)) {
      sweeping = true;
      for (int i = 0; i < nthreads; i++) {
        init_reader(&readers[i]);
        if (pthread_create(&tids[i], NULL, sweeper, &readers[i]) != 0) fail("THREAD", "pthread_create: %s", strerror(errno));
        started++;
      }
    }
    /* Faults after the events they came with; a fill refused for an unread event is retried next round. */
    size_t nr = nretry;
    nretry = 0;
    for (size_t i = 0; i < nr + npending; i++) {
      struct fault f = i < nr ? retry[i] : pending[i - nr];
      enum fill_result r = serve_fault(f.t, f.addr, &fault_reader);
      if (r == FILL_AGAIN) push_fault(&retry, &nretry, f.t, f.addr);
      else if (r == FILL_OK) wake_page(f.t, f.addr);
    }
    npending = 0;
    if (sweeping && !joined && atomic_load(&next_chunk) >= nchunks) {
      /* Every chunk is taken: wait for the sweepers, serving faults meanwhile (they may wait on an event). */
      bool all = true;
      for (int i = 0; i < started; i++) {
        if (pthread_tryjoin_np(tids[i], NULL) == EBUSY) { all = false; break; }
        tids[i] = tids[--started];
        i--;
      }
      if (all && started == 0) joined = true;
    }
    if (joined && nretry == 0) break;
  }
  double fill_ms = ms_since(&t_finished), total_ms = ms_since(&t_start);
  /* Closing a uffd unregisters its mappings: the pages not in the image read as the zeros they are. */
  for (size_t i = 0; i < ntasks; i++) if (tasks[i].uffd >= 0) close(tasks[i].uffd);
  if (sk_open) close(sk);
  say("done {\"copiedBytes\":%" PRIuFAST64 ",\"zeroedBytes\":%" PRIuFAST64 ",\"faults\":%" PRIuFAST64 ",\"existing\":%" PRIuFAST64 ",\"retried\":%" PRIuFAST64
      ",\"waited\":%" PRIuFAST64 ",\"events\":%" PRIuFAST64 ",\"faultFrames\":%" PRIuFAST64 ",\"threads\":%d,\"chunks\":%zu,\"fillMs\":%.1f,\"totalMs\":%.1f}",
      atomic_load(&copied_bytes), atomic_load(&zeroed_bytes), atomic_load(&fault_count), atomic_load(&eexist_count), atomic_load(&eagain_count), atomic_load(&wait_count), atomic_load(&event_count), atomic_load(&frame_count), nthreads, nchunks, fill_ms, total_ms);
  return 0;
}
