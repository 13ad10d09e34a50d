import { describe, expect, it } from 'vitest';
import { median, percentile } from '../../bench/stats.js';
import { renderTable } from '../../src/table.js';

describe('benchmark statistics', () => {
  it('computes nearest-rank percentiles', () => {
    const v = Array.from({ length: 100 }, (_, i) => i + 1);
    expect(percentile(v, 50)).toBe(50);
    expect(percentile(v, 99)).toBe(99);
    expect(percentile(v, 100)).toBe(100);
    expect(percentile([3, 1, 2], 50)).toBe(2);
    expect(percentile([0.12345, 0.5], 50, 3)).toBe(0.123);
    expect(median([5])).toBe(5);
    expect(percentile([], 50)).toBeNaN();
  });
  it('renders aligned tables', () => {
    expect(renderTable(['a', 'n'], [['x', 1], ['yy', 10]], { rule: true })).toBe('a   n\n--  --\nx    1\nyy  10\n');
  });
});
