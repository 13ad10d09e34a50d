/**
 * The one plain-text table renderer (the CLI's listings, the benchmarks' and the demo's reports): columns
 * separated by two spaces, each as wide as its widest cell, numbers right-aligned, no trailing spaces.
 */

export interface TableOptions {
  /**
   * The report form of the benchmarks and the demo: a rule of dashes under the header and a newline after
   * the last row. Without it (the CLI), the lines only.
   */
  rule?: boolean;
}

export function renderTable(header: readonly string[], rows: ReadonlyArray<ReadonlyArray<string | number>>, options: TableOptions = {}): string {
  const cells = [header, ...rows].map((r) => r.map((c) => (typeof c === 'number' ? String(c) : c)));
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const numeric = header.map((_, i) => rows.some((r) => typeof r[i] === 'number'));
  const line = (r: readonly string[], alignNumbers: boolean): string =>
    r.map((c, i) => (alignNumbers && numeric[i] ? c.padStart(widths[i] as number) : c.padEnd(widths[i] as number))).join('  ').trimEnd();
  const body = cells.slice(1).map((r) => line(r, true));
  if (!options.rule) return [line(cells[0] as string[], false), ...body].join('\n');
  const rule = widths.map((w) => '-'.repeat(w)).join('  ');
  return [line(cells[0] as string[], false), rule, ...body].join('\n') + '\n';
}
