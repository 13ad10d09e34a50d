/**
 * A thaw checkpoint moved with oras alone, as a platform team without thaw would: `oras pull` into a directory
 * (chunk pieces joined back into their files, the config written as manifest.json), and `oras push` of such a
 * directory in thaw's layout (one layer per file, thaw's annotations from an annotation file).
 */
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { MANIFEST_FILE_NAME, parseManifest } from '../../src/store/manifest.js';
import {
  ANNOTATION_FILE_SIZE, ANNOTATION_OFFSET, ANNOTATION_PATH, CHECKPOINT_ARTIFACT_TYPE, CHECKPOINT_CONFIG_MEDIA_TYPE, CHECKPOINT_LAYER_MEDIA_TYPE,
} from '../../src/store/oci/artifact.js';
import { peerToolOk } from './peer-tools.js';

const ANNOTATIONS_FILE = '.oras-annotations.json';

/**
 * `oras pull` of `reference` into `out`, then the config into `out/manifest.json` and every
 * `<file>.thaw-chunk-<offset>` set concatenated (name order) into `<file>`. Returns the checkpoint's file paths.
 */
export async function orasPullCheckpoint(reference: string, out: string, o: { home: string; plainHttp?: boolean }): Promise<string[]> {
  const http = o.plainHttp ?? true ? ['--plain-http'] : [];
  await peerToolOk('oras', ['pull', ...http, '-o', out, reference], { home: o.home });
  const config = await peerToolOk('oras', ['manifest', 'fetch-config', ...http, reference], { home: o.home });
  await writeFile(join(out, MANIFEST_FILE_NAME), config.stdout);
  const files = parseManifest(config.stdout).files.map((f) => f.path);
  for (const file of files) {
    const dir = dirname(join(out, file));
    const base = file.split('/').pop()!;
    const pieces = (await readdir(dir)).filter((n) => n.startsWith(`${base}.thaw-chunk-`)).sort();
    if (pieces.length === 0) continue;
    await writeFile(join(out, file), Buffer.concat(await Promise.all(pieces.map((p) => readFile(join(dir, p))))));
    for (const p of pieces) await rm(join(dir, p));
  }
  return files;
}

/** `oras push` of a directory holding manifest.json and its files, in thaw's layout. Returns the manifest digest. */
export async function orasPushThawLayout(dir: string, reference: string, o: { home: string; plainHttp?: boolean }): Promise<string> {
  const manifest = parseManifest(await readFile(join(dir, MANIFEST_FILE_NAME), 'utf8'));
  const annotations = Object.fromEntries(manifest.files.map((f) => [f.path, {
    [ANNOTATION_PATH]: f.path, [ANNOTATION_OFFSET]: '0', [ANNOTATION_FILE_SIZE]: String(f.size),
  }]));
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, ANNOTATIONS_FILE), JSON.stringify(annotations));
  try {
    const r = await peerToolOk('oras', [
      'push', ...(o.plainHttp ?? true ? ['--plain-http'] : []), reference, '--artifact-type', CHECKPOINT_ARTIFACT_TYPE,
      '--config', `${MANIFEST_FILE_NAME}:${CHECKPOINT_CONFIG_MEDIA_TYPE}`, '--annotation-file', ANNOTATIONS_FILE,
      ...manifest.files.map((f) => `${f.path}:${CHECKPOINT_LAYER_MEDIA_TYPE}`),
    ], { home: o.home, cwd: dir });
    const digest = /^Digest:\s*(sha256:[0-9a-f]{64})\s*$/m.exec(r.stdout)?.[1];
    if (!digest) throw new Error(`oras push printed no digest: ${r.stdout}`);
    return digest;
  } finally {
    await rm(join(dir, ANNOTATIONS_FILE), { force: true });
  }
}
