/**
 * Every error code thaw defines, read from the source with the TypeScript compiler (not a regex): each
 * `export const X = { KEY: 'CODE', ... } as const` in a module under src/ whose name says it holds codes
 * (`...ErrorCode`, `..._ERROR_CODES`, `...FallbackCause`), with the doc comment of each entry. docs/errors.md is
 * rendered from this table, and test/unit/errors-doc.test.ts holds the two equal.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import ts from 'typescript';

export interface ErrorCodeEntry {
  /** The stable string callers, metrics and the API match on. */
  code: string;
  /** The constant object that defines it, and its key there. */
  group: string;
  key: string;
  /** Path of the defining module, relative to the repository root. */
  file: string;
  /** The entry's doc comment, one line. */
  meaning: string;
}

const GROUP_NAME = /(ErrorCode|ERROR_CODES|FallbackCause|FALLBACK_CAUSES)$/;

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return sourceFiles(path);
    return path.endsWith('.ts') ? [path] : [];
  });
}

function docOf(node: ts.Node, text: string): string {
  const ranges = ts.getLeadingCommentRanges(text, node.getFullStart()) ?? [];
  return ranges
    .map((r) => text.slice(r.pos, r.end))
    .filter((c) => c.startsWith('/**'))
    .map((c) => c.replace(/^\/\*\*|\*\/$/g, '').split('\n').map((l) => l.replace(/^\s*\*\s?/, '').trim()).join(' ').trim())
    .join(' ')
    .replace(/\s+/g, ' ')
    .replace(/\|/g, '\\|');
}

/** The code tables of every module under `srcDir`, sorted by code. */
export function collectErrorCodes(repoRoot: string, srcDir = join(repoRoot, 'src')): ErrorCodeEntry[] {
  const out: ErrorCodeEntry[] = [];
  for (const file of sourceFiles(srcDir)) {
    const text = readFileSync(file, 'utf8');
    if (!/ErrorCode|ERROR_CODES|FallbackCause|FALLBACK_CAUSES/.test(text)) continue;
    const sf = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, true);
    for (const stmt of sf.statements) {
      if (!ts.isVariableStatement(stmt)) continue;
      if (!stmt.modifiers?.some((m) => m.kind === ts.SyntaxKind.ExportKeyword)) continue;
      for (const decl of stmt.declarationList.declarations) {
        if (!ts.isIdentifier(decl.name) || !GROUP_NAME.test(decl.name.text) || decl.initializer === undefined) continue;
        let init: ts.Expression = decl.initializer;
        while (ts.isAsExpression(init) || ts.isSatisfiesExpression(init) || ts.isParenthesizedExpression(init)) init = init.expression;
        if (!ts.isObjectLiteralExpression(init)) continue;
        for (const prop of init.properties) {
          if (!ts.isPropertyAssignment(prop) || !ts.isStringLiteral(prop.initializer)) continue;
          const key = prop.name.getText(sf);
          out.push({ code: prop.initializer.text, group: decl.name.text, key, file: relative(repoRoot, file), meaning: docOf(prop, text) });
        }
      }
    }
  }
  return out.sort((a, b) => (a.code < b.code ? -1 : a.code > b.code ? 1 : a.file < b.file ? -1 : 1));
}

/** docs/errors.md, rendered from the table. */
export function renderErrorsDoc(entries: readonly ErrorCodeEntry[]): string {
  const lines = [
    '# Error codes',
    '',
    'Every error thaw raises on purpose is a `ThawError` (`src/errors.ts`) with a stable `code`: callers, tests,',
    'metrics and the control API match on it, never on the message. A code is upper snake case with a prefix naming',
    'its layer; it is defined next to its layer\'s code (the module in the table). Causes of a fallback to a cold',
    'start are codes too, and label `thaw_fallbacks_total{cause}`.',
    '',
    'This file is generated from the source (`test/helpers/error-codes.ts`); `test/unit/errors-doc.test.ts` fails',
    'when it is out of date. To regenerate: `THAW_WRITE_ERRORS_DOC=1 npx vitest run test/unit/errors-doc.test.ts`.',
    '',
    '| code | defined in | meaning |',
    '|---|---|---|',
    ...entries.map((e) => `| \`${e.code}\` | \`${e.file}\` (\`${e.group}.${e.key}\`) | ${e.meaning} |`),
    '',
  ];
  return lines.join('\n');
}
