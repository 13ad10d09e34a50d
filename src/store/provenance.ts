/**
 * The provenance of a pulled checkpoint: the registry's bytes its name is derived from, kept beside its files and
 * checked again on every open, so that `oci-<hex>` is never just a directory name.
 *
 *   <dir>/oci-manifest.json   the image manifest exactly as the registry sent it: sha256 = the name's <hex>
 *   <dir>/oci-config.json     its config blob exactly as sent: sha256 = the manifest's config.digest
 *
 * and the config blob, parsed, is the checkpoint's manifest.json (with the local name): every file's sha256 the
 * restore verifies is thus the one the digest in the name commits to. A pulled checkpoint without them, or whose
 * manifest.json was edited (say, its constraints, to pass a compatibility check), is refused
 * (STORE_MANIFEST_INVALID) before anything reads its files.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { openRegularNoFollow } from './digest.js';
import { StoreError, StoreErrorCode } from './errors.js';
import { parseManifest, type Manifest } from './manifest.js';

export const OCI_MANIFEST_FILE_NAME = 'oci-manifest.json';
export const OCI_CONFIG_FILE_NAME = 'oci-config.json';
/** The files a pulled checkpoint holds beside its manifest's. */
export const PROVENANCE_FILE_NAMES: readonly string[] = [OCI_MANIFEST_FILE_NAME, OCI_CONFIG_FILE_NAME];
/** Far above any checkpoint's (src/store/oci/artifact.ts MANIFEST_MAX_BYTES is 4 MiB). */
const PROVENANCE_MAX_BYTES = 8 * 1024 * 1024;

/** The registry bytes of a pull: what provenance keeps. */
export interface Provenance {
  imageManifest: Uint8Array;
  config: Uint8Array;
}

/** JSON with every object's keys sorted: equal for equal values, whatever order their keys were written in. */
function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v !== null && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o).filter((k) => o[k] !== undefined).sort().map((k) => `${JSON.stringify(k)}:${canonical(o[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

async function readSmall(path: string, step: string): Promise<Buffer> {
  const fh = await openRegularNoFollow(path, step);
  try {
    const st = await fh.stat();
    if (st.size > PROVENANCE_MAX_BYTES) throw new StoreError(StoreErrorCode.MANIFEST_INVALID, `${path} is ${st.size} bytes`, { step });
    return await fh.readFile();
  } finally {
    await fh.close();
  }
}

/**
 * Checks a pulled checkpoint's provenance against its name and its manifest.json (parsed): the manifest bytes'
 * sha256 is the name's, they name the config blob by its sha256, and the config is the manifest (but its name).
 */
export async function checkProvenance(dir: string, name: string, manifest: Manifest, step: string): Promise<void> {
  const bad = (why: string, evidence: Record<string, unknown> = {}): StoreError =>
    new StoreError(StoreErrorCode.MANIFEST_INVALID, `pulled checkpoint ${name}: ${why}`, { step, evidence: { name, ...evidence } });
  let imageManifest: Buffer;
  let config: Buffer;
  try {
    imageManifest = await readSmall(join(dir, OCI_MANIFEST_FILE_NAME), step);
    config = await readSmall(join(dir, OCI_CONFIG_FILE_NAME), step);
  } catch (err) {
    if (err instanceof StoreError && err.code === StoreErrorCode.MANIFEST_INVALID) throw err;
    throw bad(`its registry manifest and config (${OCI_MANIFEST_FILE_NAME}, ${OCI_CONFIG_FILE_NAME}) are not kept; pull it again`, { error: (err as Error).message });
  }
  const hex = name.slice('oci-'.length);
  const actual = sha256(imageManifest);
  if (actual !== hex) throw bad(`its registry manifest's sha256 is ${actual}, not the ${hex} its name says`, { expected: hex, actual });
  let configDigest: unknown;
  try {
    configDigest = (JSON.parse(imageManifest.toString('utf8')) as { config?: { digest?: unknown } }).config?.digest;
  } catch {
    throw bad('its registry manifest is not JSON');
  }
  const configActual = `sha256:${sha256(config)}`;
  if (configDigest !== configActual) throw bad(`its registry manifest names config ${String(configDigest)}, but the config kept is ${configActual}`, { expected: configDigest, actual: configActual });
  let fromConfig: Manifest;
  try {
    fromConfig = parseManifest(config.toString('utf8'));
  } catch (err) {
    throw bad(`its config is not a checkpoint manifest: ${(err as Error).message}`);
  }
  if (canonical({ ...fromConfig, name: manifest.name }) !== canonical(manifest)) {
    throw bad('its manifest.json is not the config its registry manifest names (edited after the pull)', { id: manifest.id, configId: fromConfig.id });
  }
}
