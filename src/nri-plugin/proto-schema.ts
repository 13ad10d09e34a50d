/**
 * Loads thaw's own .proto files (proto/ttrpc/request.proto, proto/nri/api.proto) with protobufjs at
 * runtime. The proto directory is found by walking up from this module to the package root that holds
 * `proto/nri/api.proto`, so this works both from src/ (vitest) and from dist/src/ (after tsc).
 *
 * Loaded once per process on first use and never mutated afterwards.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

export const TTRPC_PACKAGE = 'ttrpc';
export const NRI_PACKAGE = 'nri.pkg.api.v1alpha1';

/** Walks up from `startDir` to the first directory containing proto/nri/api.proto. */
export function findProtoDir(startDir: string = dirname(fileURLToPath(import.meta.url))): string {
  let dir = startDir;
  for (;;) {
    const candidate = join(dir, 'proto');
    if (existsSync(join(candidate, 'nri', 'api.proto')) && existsSync(join(candidate, 'ttrpc', 'request.proto'))) {
      return candidate;
    }
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error(`proto/nri/api.proto not found in ${startDir} or any parent directory`);
    }
    dir = parent;
  }
}

export interface ProtoSchemas {
  readonly protoDir: string;
  readonly ttrpc: protobuf.Root;
  readonly nri: protobuf.Root;
}

let loaded: ProtoSchemas | undefined;

/** The parsed schemas (loaded synchronously on first call; a missing proto dir throws). */
export function protoSchemas(): ProtoSchemas {
  if (loaded) return loaded;
  const protoDir = findProtoDir();
  // Separate roots: both files define a KeyValue, in different packages.
  const ttrpc = protobuf.loadSync(join(protoDir, 'ttrpc', 'request.proto'));
  ttrpc.resolveAll();
  const nri = protobuf.loadSync(join(protoDir, 'nri', 'api.proto'));
  nri.resolveAll();
  loaded = { protoDir, ttrpc, nri };
  return loaded;
}
