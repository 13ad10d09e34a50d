/** Small statistics shared by the benchmarks (their tables: src/table.ts). */

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
