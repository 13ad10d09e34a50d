import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { StackError, StackErrorCode } from './errors.js';

/**
 * Removes gogoproto from the CRI api.proto so that protobufjs can load it without gogo.proto: the
 * `import ".../gogo.proto"` line, file options `option (gogoproto.x) = y;`, and `(gogoproto.x) = y`
 * entries inside field option brackets (an emptied bracket is dropped). Everything else stays byte
 * for byte, so field numbers and names are Debian's. Pure.
 */
export function stripGogoproto(source: string): string {
  const lines = source.split('\n');
  const kept: string[] = [];
  for (const line of lines) {
    if (/^\s*import\s+(public\s+|weak\s+)?"[^"]*gogo\.proto"\s*;/.test(line)) continue;
    if (/^\s*option\s+\(gogoproto\.[A-Za-z0-9_]+\)\s*=\s*[^;]*;\s*(\/\/.*)?$/.test(line)) continue;
    const cleaned = line.replace(/\[([^\]]*)\]/g, (whole, inner: string) => {
      if (!inner.includes('gogoproto')) return whole;
      const parts = inner.split(',').map((p) => p.trim()).filter((p) => p !== '' && !p.startsWith('(gogoproto.'));
      return parts.length === 0 ? '' : `[${parts.join(', ')}]`;
    });
    // `int32 x = 1 [(gogoproto.nullable) = false];` becomes `int32 x = 1;`, not `int32 x = 1 ;`.
    kept.push(cleaned === line ? line : cleaned.replace(/\s+;/, ';'));
  }
  return kept.join('\n');
}

/**
 * Writes the stripped copy of `sourcePath` to `targetPath` (temp file + rename, so a reader never sees
 * half a file) unless an identical copy is there. Called at provisioning and, as a fallback, by the CRI
 * client.
 */
export async function writeStrippedCriProto(sourcePath: string, targetPath: string): Promise<void> {
  let source: string;
  try {
    source = await readFile(sourcePath, 'utf8');
  } catch (cause) {
    throw new StackError(StackErrorCode.NOT_PROVISIONED, `CRI api.proto missing at ${sourcePath}`, {
      step: 'strip CRI proto',
      cause,
      evidence: { sourcePath },
    });
  }
  const stripped = stripGogoproto(source);
  const existing = await readFile(targetPath, 'utf8').catch(() => undefined);
  if (existing === stripped) return;
  await mkdir(path.dirname(targetPath), { recursive: true, mode: 0o755 });
  const tmp = `${targetPath}.tmp-${process.pid}`;
  await writeFile(tmp, stripped, { mode: 0o644 });
  await rename(tmp, targetPath);
}
