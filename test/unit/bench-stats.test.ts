import { describe, expect, it } from 'vitest';
import { binSamples, parseDiskstats, sampleDisks } from '../../bench/disk-activity.js';
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
  it('reads whole disks from /proc/diskstats and bins their reads and busy time', () => {
    const line = (name: string, sectors: number, ticks: number): string => `259       0 ${name} 10 0 ${sectors} 5 0 0 0 0 0 ${ticks} 7 0 0 0 0 0 0`;
    const at = (sectors: number, ticks: number, part = 0) =>
      parseDiskstats([line('nvme0n1', sectors, ticks), line('nvme0n1p1', part, ticks), '   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0', '253 0 dm-0 1 0 99999 0 0 0 0 0 0 0 0'].join('\n'));
    const c = at(2048, 3, 4096);
    expect([...c.disks.keys()]).toEqual(['nvme0n1']); // not the partition, the loop or the device-mapper volume
    expect(c.disks.get('nvme0n1')).toEqual({ sectorsRead: 2048, ioTicksMs: 3 });
    // 100 ms in 50 ms bins: 1 MB (1953.125 sectors ≈ 1e6 bytes) then 2 MB; busy 25 ms then 50 ms.
    const t = binSamples([{ at: 1000, counters: at(0, 0) }, { at: 1050, counters: at(1953, 25) }, { at: 1100, counters: at(1953 + 3906, 75) }], 50);
    expect(t).toMatchObject({ disks: ['nvme0n1'], binMs: 50, startAt: 1000, readMB: [1, 2], busyPct: [50, 100], totalMB: 3 });
    expect(binSamples([], 50)).toMatchObject({ disks: [], readMB: [], totalMB: 0 });
    // This machine's own file parses (its disks may be idle: only the shape is checked).
    const live = sampleDisks({ intervalMs: 5 }).stop();
    expect(live.readMB.length).toBe(live.busyPct.length);
  });
});
