/**
 * The layering rule (design.md, Layout; docs/architecture.md, Layers) as a check over the TypeScript
 * compiler's view of every module reference: import and export declarations (type-only ones too), `import x =
 * require()`, `import('…')` expressions and `typeof import('…')` types, and require() calls. Not a regex: a
 * reference split over lines, in a comment-free template, or behind `export *` is seen the way tsc sees it,
 * and a computed dynamic import, an unresolvable relative path or an unknown folder is itself a violation.
 *
 * The rule: each layer (a folder of src/, the src/*.ts root modules, bench/, demo/, test/) lists the layers it
 * may import from, exactly (an allowed edge nobody uses is reported too, by the test); a reference from one
 * src/ layer into another goes through that layer's index.ts, except the exact file pairs in LIGHT_ENTRIES.
 * test/ may reach inside a layer (unit tests test modules), bench/ and demo/ may not.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import ts from 'typescript';

/** The layers a layer may import from. `root` is src/*.ts; `sys` and `sdk` are the neutral bottom (for all). */
export const ALLOWED: Readonly<Record<string, readonly string[]>> = {
  cli: ['agent', 'nri-plugin', 'store', 'cuda', 'sys', 'root'],
  agent: ['oci-hooks', 'restore-engine', 'nri-plugin', 'store', 'cuda', 'sdk', 'sys', 'root'],
  'oci-hooks': ['restore-engine', 'store', 'sdk', 'root'],
  'restore-engine': ['store', 'cuda', 'sdk', 'sys', 'root'],
  'nri-plugin': ['sdk', 'root'],
  store: ['sys', 'root'],
  cuda: ['root'],
  sdk: ['root'],
  sys: ['root'],
  root: [],
  // The test harness (a private containerd stack and a CRI client): used by tests, the demo and the benchmarks.
  'node-stack': ['root'],
  bench: ['agent', 'demo', 'node-stack', 'nri-plugin', 'restore-engine', 'store', 'cuda', 'sys', 'root'],
  demo: ['node-stack', 'sdk', 'root'],
  test: ['bench', 'demo', 'cli', 'agent', 'oci-hooks', 'restore-engine', 'nri-plugin', 'store', 'cuda', 'node-stack', 'sdk', 'sys', 'root'],
};

/**
 * The design's order of the src/ layers, top first: cli → agent → (oci-hooks → restore-engine, nri-plugin) →
 * store → cuda, then the neutral modules every layer may use. Every allowed edge between src/ layers points
 * down this order (checked by the test), so the table cannot grow an upward edge.
 */
export const DESIGN_RANK: Readonly<Record<string, number>> = {
  cli: 0,
  agent: 1,
  'oci-hooks': 2,
  'restore-engine': 3,
  'nri-plugin': 3,
  store: 4,
  cuda: 5,
  sdk: 6,
  sys: 6,
  root: 7,
  'node-stack': 6,
};

/** Layers whose modules every layer imports directly (they have no index.ts: each module is its own entry). */
const NEUTRAL = new Set(['root', 'sys']);

/**
 * Cross-layer references allowed past an index.ts, as exact `importer -> target` pairs: the OCI hook is a
 * process of its own that runc starts on the restore's critical path, and the restore-engine and store
 * barrels would load the CRIU client, the registry client and their bindings into it for nothing.
 */
export const LIGHT_ENTRIES: readonly string[] = [
  'src/oci-hooks/create-runtime.ts -> src/restore-engine/rootfs-diff/index.ts',
  'src/oci-hooks/create-runtime.ts -> src/store/manifest.ts',
];

export interface ModuleReference {
  /** The specifier, or undefined when it is computed (not a string literal). */
  spec: string | undefined;
  line: number;
  kind: 'import' | 'export' | 'import-equals' | 'dynamic-import' | 'import-type' | 'require';
}

/** Every module reference of one file, as the TypeScript parser reads it. */
export function moduleReferences(file: string, text = readFileSync(file, 'utf8')): ModuleReference[] {
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  const out: ModuleReference[] = [];
  const add = (node: ts.Node, kind: ModuleReference['kind'], expr: ts.Node | undefined): void => {
    const line = sf.getLineAndCharacterOfPosition(node.getStart(sf)).line + 1;
    out.push({ spec: expr !== undefined && ts.isStringLiteralLike(expr) ? expr.text : undefined, line, kind });
  };
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node)) add(node, 'import', node.moduleSpecifier);
    else if (ts.isExportDeclaration(node) && node.moduleSpecifier) add(node, 'export', node.moduleSpecifier);
    else if (ts.isImportEqualsDeclaration(node) && ts.isExternalModuleReference(node.moduleReference)) add(node, 'import-equals', node.moduleReference.expression);
    else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword) add(node, 'dynamic-import', node.arguments[0]);
    else if (ts.isCallExpression(node) && ts.isIdentifier(node.expression) && node.expression.text === 'require' && node.arguments.length === 1) add(node, 'require', node.arguments[0]);
    else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument)) add(node, 'import-type', node.argument.literal);
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return out;
}

/** The layer of a path relative to the repository root, or undefined outside src/, bench/, demo/, test/. */
export function layerOf(rel: string): string | undefined {
  const parts = rel.split('/');
  if (parts[0] === 'bench' || parts[0] === 'demo' || parts[0] === 'test') return parts[0];
  if (parts[0] !== 'src') return undefined;
  return parts.length === 2 ? 'root' : parts[1];
}

function sourceFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return name === 'node_modules' ? [] : sourceFiles(path);
    return path.endsWith('.ts') ? [path] : [];
  });
}

/** Where a relative specifier lands: the .ts source of a `.js` specifier, or the file itself. */
function resolveSpec(from: string, spec: string): string | undefined {
  const base = resolve(dirname(from), spec);
  for (const candidate of [base.replace(/\.js$/, '.ts'), base, `${base}.ts`, join(base, 'index.ts')]) {
    if (existsSync(candidate) && statSync(candidate).isFile()) return candidate;
  }
  return undefined;
}

export interface LayeringReport {
  violations: string[];
  /** Every `from -> to` layer edge the code uses. */
  edges: Set<string>;
  /** The LIGHT_ENTRIES pairs the code uses. */
  lightUsed: Set<string>;
}

/** Checks every module of src/, bench/, demo/ and test/ under `root` against `allowed`. */
export function checkLayering(root: string, allowed: Readonly<Record<string, readonly string[]>> = ALLOWED, light: readonly string[] = LIGHT_ENTRIES): LayeringReport {
  const report: LayeringReport = { violations: [], edges: new Set(), lightUsed: new Set() };
  const lightSet = new Set(light);
  const files = ['src', 'bench', 'demo', 'test'].flatMap((d) => sourceFiles(join(root, d)));
  for (const file of files) {
    const rel = relative(root, file);
    const from = layerOf(rel)!;
    if (allowed[from] === undefined) {
      report.violations.push(`${rel}: layer ${from} has no entry in the allowed table`);
      continue;
    }
    for (const ref of moduleReferences(file)) {
      const where = `${rel}:${ref.line}`;
      if (ref.spec === undefined) {
        report.violations.push(`${where}: ${ref.kind} of a computed specifier (the layering cannot be checked)`);
        continue;
      }
      if (!ref.spec.startsWith('.')) continue; // node: built-ins and packages
      const target = resolveSpec(file, ref.spec);
      if (target === undefined) {
        report.violations.push(`${where}: ${ref.spec} resolves to no file`);
        continue;
      }
      const targetRel = relative(root, target);
      const to = layerOf(targetRel);
      if (to === undefined) {
        report.violations.push(`${where}: ${ref.spec} leaves src/, bench/, demo/ and test/ (${targetRel})`);
        continue;
      }
      if (to === from) continue;
      report.edges.add(`${from} -> ${to}`);
      if (!allowed[from]!.includes(to)) {
        report.violations.push(`${where}: ${from} → ${to} is not allowed (${ref.spec})`);
        continue;
      }
      // Into a src/ layer from another one, bench/ or demo/: through that layer's index.ts.
      if (from !== 'test' && targetRel.startsWith('src/') && !NEUTRAL.has(to) && targetRel !== `src/${to}/index.ts`) {
        const pair = `${rel} -> ${targetRel}`;
        if (lightSet.has(pair)) report.lightUsed.add(pair);
        else report.violations.push(`${where}: ${ref.spec} reaches inside ${to}; import it from src/${to}/index.ts`);
      }
    }
  }
  return report;
}
