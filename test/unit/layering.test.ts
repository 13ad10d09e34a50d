import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { ALLOWED, checkLayering, DESIGN_RANK, LIGHT_ENTRIES } from '../helpers/layering.js';

// design.md: "A dependency points down this list of layers: cli → agent → (nri-plugin, restore-engine, store)
// → cuda. Nothing below imports the agent." test/helpers/layering.ts is that rule over the compiler's view of
// every import in src/, bench/, demo/ and test/, with cross-layer imports through each layer's index.ts.
const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const srcDir = join(repoRoot, 'src');

describe('dependency direction (design.md, Layout)', () => {
  const report = checkLayering(repoRoot);

  it('has no import that points up or sideways, or past a layer\'s index.ts', () => {
    expect(report.violations).toEqual([]);
  });

  it('allows exactly the edges the code uses, each pointing down the design\'s order', () => {
    const allowed = Object.entries(ALLOWED).flatMap(([from, tos]) => tos.map((to) => `${from} -> ${to}`));
    expect(allowed.filter((e) => !report.edges.has(e)), 'allowed edges nobody uses').toEqual([]);
    const upward = allowed.filter((e) => {
      const [from, to] = e.split(' -> ') as [string, string];
      return DESIGN_RANK[from] !== undefined && DESIGN_RANK[to] !== undefined && DESIGN_RANK[from]! >= DESIGN_RANK[to]!;
    });
    expect(upward, 'allowed src/ edges that do not point down').toEqual([]);
    expect(LIGHT_ENTRIES.filter((p) => !report.lightUsed.has(p)), 'light entries nobody uses').toEqual([]);
  });

  it('catches a planted violation of each kind (a fixture tree, not the repository)', () => {
    const root = mkdtempSync(join(tmpdir(), 'thaw-layering-'));
    afterAll(() => rmSync(root, { recursive: true, force: true }));
    const files: Record<string, string> = {
      'src/agent/index.ts': "export { run } from './run.js';\n",
      'src/agent/run.ts': 'export const run = 1;\n',
      'src/store/index.ts': "export { open } from './open.js';\n",
      'src/store/open.ts': 'export const open = 1;\n',
      // upward, split over lines and type-only
      'src/store/up.ts': "import type {\n  run,\n} from\n  '../agent/index.js';\nexport type R = typeof run;\n",
      // re-exported upward
      'src/store/reexport.ts': "export * from '../agent/run.js';\n",
      // sideways into a module, past the index
      'src/cli/inside.ts': "import { open } from '../store/open.js';\nexport const x = open;\n",
      // a computed dynamic import
      'src/cli/computed.ts': "const m = '../store/index.js';\nexport const p = import(m);\n",
      // a dynamic import upward, in a type position
      'src/store/typeof.ts': "export type T = typeof import('../agent/index.js');\n",
      // a folder the table does not know
      'src/extra/x.ts': 'export const y = 1;\n',
      // demo may not import bench (the bench <-> demo cycle)
      'demo/d.ts': "import { b } from '../bench/b.js';\nexport const d = b;\n",
      'bench/b.ts': 'export const b = 1;\n',
      // allowed: cli -> store through its index, test -> inside a module
      'src/cli/ok.ts': "import { open } from '../store/index.js';\nexport const ok = open;\n",
      'test/t.ts': "import { open } from '../src/store/open.js';\nexport const t = open;\n",
    };
    for (const [rel, text] of Object.entries(files)) {
      mkdirSync(dirname(join(root, rel)), { recursive: true });
      writeFileSync(join(root, rel), text);
    }
    const planted = checkLayering(root, { ...ALLOWED }, []);
    const found = (file: string): string[] => planted.violations.filter((v) => v.startsWith(file));
    expect(found('src/store/up.ts:1'), 'a type-only import split over lines').toHaveLength(1);
    expect(found('src/store/reexport.ts:1'), 'export * from a layer above').toHaveLength(1);
    expect(found('src/cli/inside.ts:1')[0]).toContain('import it from src/store/index.ts');
    expect(found('src/cli/computed.ts:2')[0]).toContain('computed specifier');
    expect(found('src/store/typeof.ts:1'), 'typeof import()').toHaveLength(1);
    expect(found('src/extra/x.ts')[0]).toContain('no entry in the allowed table');
    expect(found('demo/d.ts:1')[0]).toContain('demo → bench is not allowed');
    expect(found('src/cli/ok.ts'), 'through the index is fine').toEqual([]);
    expect(found('test/t.ts'), 'tests may reach inside a layer').toEqual([]);
    expect(planted.violations).toHaveLength(7);
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
