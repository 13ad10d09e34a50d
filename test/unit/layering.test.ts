import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

// design.md: "A dependency points down this list of layers: cli → agent → (nri-plugin, restore-engine, store)
// → cuda. Nothing below imports the agent." This test is that rule, made checkable: each folder of src/ lists
// the folders it may import from. `root` is src/*.ts (errors, log), which every layer may use; so is `sys`, the
// neutral system facilities (directory-fd calls, ...) that know nothing of thaw's domain.
const ALLOWED: Record<string, readonly string[]> = {
  cli: ['agent', 'nri-plugin', 'restore-engine', 'store', 'oci-hooks', 'cuda', 'sdk', 'node-stack', 'sys', 'root'],
  agent: ['nri-plugin', 'restore-engine', 'store', 'oci-hooks', 'cuda', 'sdk', 'sys', 'root'],
  'oci-hooks': ['restore-engine', 'store', 'sdk', 'sys', 'root'],
  'restore-engine': ['store', 'cuda', 'sdk', 'sys', 'root'],
  'nri-plugin': ['sdk', 'sys', 'root'],
  store: ['sys', 'root'],
  cuda: ['sys', 'root'],
  sdk: ['sys', 'root'],
  'node-stack': ['sys', 'root'],
  sys: ['root'],
  root: [],
};

const srcDir = resolve(dirname(fileURLToPath(import.meta.url)), '../../src');

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return sourceFiles(path);
    return path.endsWith('.ts') ? [path] : [];
  });
}

function layerOf(file: string): string {
  const rel = relative(srcDir, file);
  return rel.includes('/') ? rel.split('/')[0]! : 'root';
}

const IMPORT_PATTERN = /(?:^|\n)\s*(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g;

describe('dependency direction (design.md, Layout)', () => {
  const files = sourceFiles(srcDir);

  it('knows every folder of src/', () => {
    const layers = new Set(files.map(layerOf));
    for (const layer of layers) expect(Object.keys(ALLOWED), `src/${layer} has no entry in ALLOWED`).toContain(layer);
  });

  it('has no import that points up or sideways', () => {
    const violations: string[] = [];
    for (const file of files) {
      const from = layerOf(file);
      const text = readFileSync(file, 'utf8');
      for (const match of text.matchAll(IMPORT_PATTERN)) {
        const spec = match[1] ?? match[2];
        if (!spec || !spec.startsWith('.')) continue;
        const target = resolve(dirname(file), spec);
        if (!target.startsWith(srcDir)) continue;
        const to = layerOf(target.replace(/\.js$/, '.ts'));
        if (to !== from && !ALLOWED[from]!.includes(to)) {
          violations.push(`${relative(srcDir, file)} imports ${spec} (${from} → ${to})`);
        }
      }
    }
    expect(violations).toEqual([]);
  });

  it('keeps the pure framing decoders free of sockets and timers', () => {
    for (const name of ['mux-framing.ts', 'ttrpc-framing.ts']) {
      const path = join(srcDir, 'nri-plugin', name);
      const text = readFileSync(path, 'utf8');
      expect(text, `${name} must stay a pure decoder`).not.toMatch(/from ['"]node:(net|timers|child_process)['"]/);
      expect(text).not.toMatch(/setTimeout|setInterval/);
    }
  });
});
