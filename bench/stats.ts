/** Small statistics and table helpers shared by the benchmarks. */

/** Nearest-rank percentile (p in 0..100) of a sample, rounded to `decimals` places; NaN when empty. */
export function percentile(values: readonly number[], p: number, decimals = 1): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length)));
  return Number((sorted[rank - 1] as number).toFixed(decimals));
}

export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

/** A plain-text table with right-aligned numbers. */
export function renderTable(header: readonly string[], rows: ReadonlyArray<ReadonlyArray<string | number>>): string {
  const cells = [header, ...rows].map((r) => r.map((c) => (typeof c === 'number' ? String(c) : c)));
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: readonly string[], numeric: boolean[]): string =>
    r.map((c, i) => (numeric[i] ? c.padStart(widths[i] as number) : c.padEnd(widths[i] as number))).join('  ').trimEnd();
  const numeric = header.map((_, i) => rows.some((r) => typeof r[i] === 'number'));
  const sep = widths.map((w) => '-'.repeat(w)).join('  ');
  return [line(cells[0] as string[], numeric.map(() => false)), sep, ...cells.slice(1).map((r) => line(r, numeric))].join('\n') + '\n';
}
