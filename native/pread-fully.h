/*
 * The one read both thaw-fill and thaw-pack make of a checkpoint's files: exactly `len` bytes at `off`, retried on
 * EINTR and short reads. Returns 0, or -1 with errno set (a read error), or 1 with *at the offset where the file ended
 * first. Each program reports the failure in its own words (its `error CODE message` line).
 */
#ifndef THAW_PREAD_FULLY_H
#define THAW_PREAD_FULLY_H
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

static inline int pread_fully(int fd, void *buf, size_t len, uint64_t off, uint64_t *at) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
    if (n < 0 && errno == EINTR) continue;
    *at = off + done;
    if (n < 0) return -1;
    if (n == 0) return 1;
    done += (size_t)n;
  }
  return 0;
}
#endif
