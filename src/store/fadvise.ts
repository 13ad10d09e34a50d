/**
 * posix_fadvise(2) through koffi, for the page-cache prefetch of a checkpoint about to be restored.
 *
 * POSIX_FADV_WILLNEED starts the kernel's readahead of a range and returns: no bytes are copied into this
 * process, and pages already cached cost nothing. Reading the files instead (what prefetch did first) copied
 * every byte through the agent and, on a 2-core node, took CPU from the CRIU restore running beside it
 * (bench:restore, 4 GB: CRIU restore 6.5 s with the read-prefetch against a warm cache).
 */
import koffi from 'koffi';

export const POSIX_FADV_WILLNEED = 3;

/** Advises the whole file behind `fd`; resolves to 0 or the error number (posix_fadvise returns it). */
export type Fadvise = (fd: number, advice: number) => Promise<number>;

/** Binds posix_fadvise from libc. Called once per store instance (no module-level state). */
export function bindFadvise(): Fadvise {
  const libc = koffi.load('libc.so.6');
  const fadvise = libc.func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)');
  // On a cold cache the kernel allocates and submits the readahead inside the call: keep it off the event loop.
  return (fd, advice) =>
    new Promise((resolve, reject) => {
      fadvise.async(fd, 0, 0, advice, (err: unknown, rc: number) => (err ? reject(err) : resolve(rc)));
    });
}
