import { readFile } from 'node:fs/promises';
import { arch, machine, release } from 'node:os';

/**
 * The facts of this host that a manifest records and a restore compares: `process.arch`, `uname -m` and the
 * kernel release. CRIU and containerd versions, the image and the GPU come from their own layers.
 */
export function readHostFacts(): { arch: { node: string; machine: string }; kernelRelease: string } {
  return { arch: { node: arch(), machine: machine() }, kernelRelease: release() };
}

export const THP_ENABLED_PATH = '/sys/kernel/mm/transparent_hugepage/enabled';

export type ThpMode = 'always' | 'madvise' | 'never';

/** The selected mode of a transparent_hugepage `enabled` file ("always [madvise] never" → madvise). */
export function parseThpMode(text: string): ThpMode | undefined {
  const m = /\[(always|madvise|never)\]/.exec(text);
  return m ? (m[1] as ThpMode) : undefined;
}

/**
 * The host's transparent-huge-page mode, or undefined where the kernel has none. It decides how fast CRIU puts
 * a process's anonymous memory back: CRIU's restorer reads the pages image into fresh anonymous mappings and
 * applies their madvise flags only afterwards, so only `always` lets those reads fault in 2 MiB pages.
 */
export async function readThpMode(path = THP_ENABLED_PATH): Promise<ThpMode | undefined> {
  return readFile(path, 'utf8').then(parseThpMode, () => undefined);
}
