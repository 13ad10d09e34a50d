/**
 * The overlay of a container's root from /proc/<pid>/mountinfo (proc(5)).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { RootfsError, RootfsErrorCode } from './errors.js';

export interface OverlayMount {
  mountPoint: string;
  /** Top to bottom, as overlayfs lists them. */
  lowerdirs: string[];
  upperdir: string;
  workdir: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo octal. */
function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Splits overlay's lowerdir list on ':' not escaped with a backslash ("\:" is a colon inside a path). */
function splitLowerdirs(value: string): string[] {
  return value.split(/(?<!\\):/).map((d) => d.replace(/\\:/g, ':'));
}

/**
 * Parses one line of /proc/<pid>/mountinfo (proc(5)). Returns the overlay's directories when the line is an
 * overlay mount with an upperdir, undefined for any other mount. Pure. Throws ROOTFS_MOUNTINFO_INVALID for a
 * line that is not mountinfo.
 *
 *   36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w
 */
export function parseOverlayMount(mountinfoLine: string): OverlayMount | undefined {
  const step = 'parse mountinfo';
  const fields = mountinfoLine.trim().split(' ');
  const dash = fields.indexOf('-', 6);
  if (fields.length < 10 || dash < 0 || fields.length < dash + 4 || !/^\d+:\d+$/.test(fields[2] ?? '')) {
    throw new RootfsError(RootfsErrorCode.MOUNTINFO_INVALID, `not a mountinfo line: ${JSON.stringify(mountinfoLine)}`, {
      step,
      evidence: { line: mountinfoLine },
    });
  }
  if (fields[dash + 1] !== 'overlay') return undefined;
  const mount: Partial<OverlayMount> & { mountPoint: string; lowerdirs: string[] } = {
    mountPoint: unescapeMountinfo(fields[4]!),
    lowerdirs: [],
  };
  // Super options are comma-separated; a comma inside a path is octal-escaped, so splitting first is safe.
  for (const option of fields.slice(dash + 3).join(' ').split(',')) {
    const eq = option.indexOf('=');
    if (eq < 0) continue;
    const key = option.slice(0, eq);
    const value = unescapeMountinfo(option.slice(eq + 1));
    if (key === 'lowerdir') mount.lowerdirs.push(...splitLowerdirs(value));
    else if (key === 'lowerdir+') mount.lowerdirs.push(value); // the new mount API lists layers one by one
    else if (key === 'upperdir') mount.upperdir = value;
    else if (key === 'workdir') mount.workdir = value;
  }
  if (mount.upperdir === undefined) return undefined; // a read-only overlay: nothing to capture
  return { mountPoint: mount.mountPoint, lowerdirs: mount.lowerdirs, upperdir: mount.upperdir, workdir: mount.workdir ?? '' };
}

/**
 * The overlay mounted at `/` of process `pid` (its container's root), from `/proc/<pid>/mountinfo`. The last
 * mount on `/` wins, as in the kernel's view. ROOTFS_NOT_OVERLAY when that is not an overlay with an upperdir.
 */
export async function readContainerOverlay(pid: number, options: { procRoot?: string } = {}): Promise<OverlayMount> {
  const step = 'find the container rootfs overlay';
  const path = join(options.procRoot ?? '/proc', String(pid), 'mountinfo');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new RootfsError(RootfsErrorCode.IO, `cannot read ${path}: ${(err as Error).message}`, { step, cause: err });
  }
  let root: { line: string; overlay: OverlayMount | undefined } | undefined;
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const fields = line.split(' ');
    if (fields[4] === '/') root = { line, overlay: parseOverlayMount(line) };
  }
  if (root?.overlay === undefined) {
    throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `the root mount of pid ${pid} is not an overlay with an upperdir`, {
      step,
      evidence: { pid, line: root?.line },
    });
  }
  return root.overlay;
}
