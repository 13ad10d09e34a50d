import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { collectErrorCodes, renderErrorsDoc } from '../helpers/error-codes.js';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const docPath = join(repoRoot, 'docs/errors.md');

describe('error codes (docs/errors.md)', () => {
  const entries = collectErrorCodes(repoRoot);

  it('finds the code tables of every layer', () => {
    const prefixes = new Set(entries.map((e) => e.code.split('_')[0]));
    for (const p of ['NRI', 'CRIU', 'STORE', 'OCI', 'CUDA', 'RESTORE', 'HOOK']) expect([...prefixes]).toContain(p);
  });

  it('has one style: upper snake case with a layer prefix, each code defined once', () => {
    const bad = entries.filter((e) => !/^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$/.test(e.code)).map((e) => `${e.file}: ${e.code}`);
    expect(bad).toEqual([]);
    const seen = new Map<string, string>();
    const twice: string[] = [];
    for (const e of entries) {
      const where = `${e.file} ${e.group}.${e.key}`;
      const first = seen.get(e.code);
      if (first !== undefined && first !== where) twice.push(`${e.code}: ${first} and ${where}`);
      seen.set(e.code, where);
    }
    expect(twice).toEqual([]);
  });

  it('defines codes in one naming style, in each layer\'s errors module', () => {
    const groups = [...new Set(entries.map((e) => `${e.file} ${e.group}`))];
    expect(groups.filter((g) => !/ [A-Z][A-Za-z]*(ErrorCode|FallbackCause)$/.test(g)), 'a code table not named <Layer>ErrorCode').toEqual([]);
    expect(groups.filter((g) => !/(^|\/|-)errors\.ts /.test(g)), 'a code table outside an errors module').toEqual([]);
  });

  it('every code has a doc comment that says what it means', () => {
    expect(entries.filter((e) => e.meaning === '').map((e) => `${e.file}: ${e.group}.${e.key}`)).toEqual([]);
  });

  it('docs/errors.md is the table rendered from the source', () => {
    const rendered = renderErrorsDoc(entries);
    if (process.env['THAW_WRITE_ERRORS_DOC'] === '1') writeFileSync(docPath, rendered);
    expect(readFileSync(docPath, 'utf8'), 'docs/errors.md is out of date: THAW_WRITE_ERRORS_DOC=1 npx vitest run test/unit/errors-doc.test.ts').toBe(rendered);
  });
});
