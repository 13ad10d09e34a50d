/**
 * Where a push with weights layers reads each weights source from on this node. The checkpoint manifest names
 * a source by the path the worker saw (inside its container) and its sha256; on the host that file is in the
 * store's weights cache (a checkpoint pulled with its weights), or somewhere below a host model directory the
 * container had bind-mounted (the agent's `weights.modelDirs`, or `thaw push --weights-dir`). The mount that
 * mapped it is not recorded (it is the pod's, not the checkpoint's), so a directory is searched: regular files
 * with the source's name and size (no symlink followed, a bounded walk), hashed until one has the sha256.
 */
import { lstat, readdir } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { hashFile } from '../digest.js';
import type { Manifest } from '../manifest.js';
import { weightsSourcesOf, type WeightsLayer } from './artifact.js';
import { OciError, OciErrorCode } from './errors.js';
import { WeightsCache } from './weights-cache.js';

/** A weights layer to push and the host file its bytes are streamed from. */
export interface WeightsFile extends WeightsLayer {
  file: string;
}

/** Directory levels a search goes down, and entries it looks at, per model directory. */
const MAX_DEPTH = 8;
const MAX_ENTRIES = 200_000;

async function candidates(dir: string, name: string, size: number): Promise<string[]> {
  const out: string[] = [];
  let seen = 0;
  const walk = async (d: string, depth: number): Promise<void> => {
    const entries = await readdir(d, { withFileTypes: true }).catch(() => []);
    for (const e of entries) {
      if (++seen > MAX_ENTRIES) return;
      const p = join(d, e.name);
      if (e.isDirectory() && depth < MAX_DEPTH) await walk(p, depth + 1);
      else if (e.isFile() && e.name === name) {
        const st = await lstat(p).catch(() => undefined);
        if (st?.isFile() && st.size === size) out.push(p);
      }
    }
  };
  const st = await lstat(dir).catch(() => undefined);
  if (st?.isDirectory()) await walk(dir, 0);
  return out;
}

/**
 * The host file of every distinct weights source of `manifest`: the weights cache first, then the model
 * directories. Throws OCI_WEIGHTS_SOURCE_NOT_FOUND for the first source found nowhere.
 */
export async function locateWeightsFiles(manifest: Pick<Manifest, 'weights'>, o: { storeRoot: string; dirs: readonly string[]; signal?: AbortSignal }): Promise<WeightsFile[]> {
  const cache = await WeightsCache.open(o.storeRoot);
  const out: WeightsFile[] = [];
  const step = 'find the weights sources to push';
  for (const source of weightsSourcesOf(manifest)) {
    if (await cache.has(source.sha256, source.size)) {
      out.push({ ...source, file: cache.pathOf(source.sha256) });
      continue;
    }
    let found: string | undefined;
    for (const dir of o.dirs) {
      for (const p of await candidates(dir, basename(source.path), source.size)) {
        const d = await hashFile(p, { step, ...(o.signal ? { signal: o.signal } : {}) }).catch(() => undefined);
        if (d?.sha256 === source.sha256) {
          found = p;
          break;
        }
      }
      if (found !== undefined) break;
    }
    if (found === undefined) {
      throw new OciError(OciErrorCode.WEIGHTS_SOURCE_NOT_FOUND, `weights source ${source.path} (sha256 ${source.sha256}, ${source.size} bytes) is neither in the weights cache nor under ${o.dirs.length === 0 ? 'any model directory (none given)' : o.dirs.join(', ')}`, {
        step,
        evidence: { path: source.path, sha256: source.sha256, size: source.size, dirs: [...o.dirs] },
      });
    }
    out.push({ ...source, file: found });
  }
  return out;
}
