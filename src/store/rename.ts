/**
 * renameat2(2) through koffi: the two atomic renames Node's fs.rename cannot do.
 *
 * - RENAME_NOREPLACE: publish a checkpoint directory only if the name is free. Plain rename(2) would
 *   silently replace an *empty* directory of that name.
 * - RENAME_EXCHANGE: replace a published checkpoint by swapping the new directory and the old one in one
 *   step, so that a reader resolving `<root>/<name>` sees the old checkpoint or the new one, never neither.
 *
 * Linux ≥ 3.15 and glibc ≥ 2.28; some filesystems answer EINVAL (the caller then falls back to rename).
 */
import koffi from 'koffi';

const AT_FDCWD = -100;
export const RENAME_NOREPLACE = 1;
export const RENAME_EXCHANGE = 2;

/** Renames `from` to `to` with `flags`; returns 0 or the errno (never throws for a failed rename). */
export type RenameAt2 = (from: string, to: string, flags: number) => number;

/** Binds renameat2 from libc. Called once per store instance (no module-level state). */
export function bindRenameAt2(): RenameAt2 {
  const libc = koffi.load('libc.so.6');
  const renameat2 = libc.func('int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags)');
  return (from, to, flags) => {
    const rc = renameat2(AT_FDCWD, from, AT_FDCWD, to, flags) as number;
    return rc === 0 ? 0 : koffi.errno();
  };
}

/** errno numbers the store reacts to (from koffi's table of this OS). */
export function errnoOf(name: 'EEXIST' | 'ENOTEMPTY' | 'EINVAL' | 'ENOSYS' | 'ENOENT'): number {
  return koffi.os.errno[name] ?? -1;
}
