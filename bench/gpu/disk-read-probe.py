#!/usr/bin/env python3
"""How fast this host's disk fills the page cache the way thaw's prefetch reads, and how fast a sequential
reader (standing in for CRIU reading pages-<id>.img) gets through a file while the prefetch runs beside it.

A probe for the GPU machine (the dropped-cache restore is bound by this), not part of the product:
    python3 bench/gpu/disk-read-probe.py [GiB] [dir]          (root: it drops the page cache)

For each layout — readers (1, 2, 4, 8) x read size (1, 8 MiB), 64 MiB segments handed out in file order,
as LocalStore.prefetch does — it prints the time to read the whole file with the cache dropped; then, for
no prefetch and for the prefetch at 1, 4 and 8 readers, the time a sequential 1 MiB reader needs to reach the
end of the file when it starts together with the prefetch. One JSON object per line.
"""
import json
import os
import sys
import threading
import time

MIB = 1 << 20
SEGMENT = 64 * MIB


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def prefetch(path, size, readers, chunk, stop):
    """Segments in file order, each read front to back by the next free reader (LocalStore.prefetch)."""
    segments = list(range(0, size, SEGMENT))
    lock = threading.Lock()

    def reader():
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                with lock:
                    if not segments:
                        return
                    start = segments.pop(0)
                end = min(size, start + SEGMENT)
                pos = start
                while pos < end and not stop.is_set():
                    n = len(os.pread(fd, min(chunk, end - pos), pos))
                    if n == 0:
                        break
                    pos += n
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for t in threads:
        t.start()
    return threads


def sequential(path, size, chunk=MIB):
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            n = len(os.pread(fd, chunk, pos))
            if n == 0:
                break
            pos += n
    finally:
        os.close(fd)


def main():
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 2
    directory = sys.argv[2] if len(sys.argv) > 2 else "/var/tmp"
    size = int(gib * (1 << 30))
    path = os.path.join(directory, "thaw-disk-read-probe.bin")
    block = os.urandom(8 * MIB)
    with open(path, "wb") as f:
        for _ in range(0, size, len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    size = os.path.getsize(path)
    try:
        for readers in (1, 2, 4, 8):
            for chunk in (MIB, 8 * MIB):
                drop_caches()
                t0 = time.monotonic()
                for t in prefetch(path, size, readers, chunk, threading.Event()):
                    t.join()
                s = time.monotonic() - t0
                print(json.dumps({"probe": "prefetch", "readers": readers, "chunkMiB": chunk // MIB, "s": round(s, 3), "GBps": round(size / 1e9 / s, 2)}), flush=True)
        for readers in (0, 1, 4, 8):
            drop_caches()
            stop = threading.Event()
            t0 = time.monotonic()
            threads = prefetch(path, size, readers, 8 * MIB, stop) if readers else []
            sequential(path, size)
            s = time.monotonic() - t0
            stop.set()
            for t in threads:
                t.join()
            print(json.dumps({"probe": "sequential-reader-beside-prefetch", "prefetchReaders": readers, "s": round(s, 3), "GBps": round(size / 1e9 / s, 2)}), flush=True)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
