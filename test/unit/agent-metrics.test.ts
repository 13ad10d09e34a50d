import { describe, expect, it } from 'vitest';
import { createAgentMetrics } from '../../src/agent/agent-metrics.js';
import { escapeLabelValue, MetricsRegistry, parseExposition } from '../../src/agent/metrics.js';
import { ThawNriStats } from '../../src/agent/nri-stats.js';

describe('Prometheus text exposition', () => {
  it('renders HELP, TYPE and series, with label values escaped', async () => {
    const r = new MetricsRegistry();
    const c = r.counter('x_total', 'Things.\nSecond line \\ here.', ['cause']);
    c.inc({ cause: 'a"b\\c\nd' }, 2);
    c.inc({ cause: 'plain' });
    const g = r.gauge('y', 'A gauge.');
    g.set(1.5);
    expect(await r.render()).toBe(
      [
        '# HELP x_total Things.\\nSecond line \\\\ here.',
        '# TYPE x_total counter',
        'x_total{cause="a\\"b\\\\c\\nd"} 2',
        'x_total{cause="plain"} 1',
        '# HELP y A gauge.',
        '# TYPE y gauge',
        'y 1.5',
        '',
      ].join('\n'),
    );
    expect(escapeLabelValue('\\"\n')).toBe('\\\\\\"\\n');
  });

  it('renders cumulative histogram buckets ending with +Inf, then _sum and _count', () => {
    const r = new MetricsRegistry();
    const h = r.histogram('d_seconds', 'Durations.', [1, 0.1, 10], ['phase']);
    for (const v of [0.05, 0.5, 0.5, 20]) h.observe(v, { phase: 'total' });
    expect(r.renderNow().split('\n')).toEqual([
      '# HELP d_seconds Durations.',
      '# TYPE d_seconds histogram',
      'd_seconds_bucket{phase="total",le="0.1"} 1',
      'd_seconds_bucket{phase="total",le="1"} 3',
      'd_seconds_bucket{phase="total",le="10"} 3',
      'd_seconds_bucket{phase="total",le="+Inf"} 4',
      'd_seconds_sum{phase="total"} 21.05',
      'd_seconds_count{phase="total"} 4',
      '',
    ]);
  });

  it('refuses bad names, unknown labels, counters that go down and duplicates', () => {
    const r = new MetricsRegistry();
    expect(() => r.counter('bad-name', 'x')).toThrow(/not a valid Prometheus name/);
    const c = r.counter('ok_total', 'x', ['a']);
    expect(() => c.inc({ b: '1' })).toThrow(/unknown label b/);
    expect(() => c.inc({}, -1)).toThrow(/only go up/);
    c.setTotal(5, { a: '1' });
    expect(() => c.setTotal(4, { a: '1' })).toThrow(/cannot go down/);
    expect(() => r.counter('ok_total', 'x')).toThrow(/registered twice/);
    expect(() => r.histogram('h', 'x', [1], ['le'])).toThrow(/bad label name le/);
  });

  it('parses its own output back', () => {
    const r = new MetricsRegistry();
    r.counter('a_total', 'x', ['k']).inc({ k: 'v' }, 3);
    r.histogram('h', 'x', [1]).observe(2);
    const m = parseExposition(r.renderNow());
    expect(m.get('a_total{k="v"}')).toBe(3);
    expect(m.get('h_bucket{le="+Inf"}')).toBe(1);
    expect(m.get('h_bucket{le="1"}')).toBe(0);
  });
});

describe("the agent's series", () => {
  it('count restore and checkpoint events, fallbacks at CreateContainer and the store', async () => {
    const stats = new ThawNriStats();
    let byNamespace = new Map([['team-a', { count: 1, bytes: 100 }], ['.oci', { count: 1, bytes: 200 }]]);
    const gc = { runs: 1, checkpoints: new Map([['team-a', 2]]), bytes: new Map([['team-a', 4096]]), cacheFiles: 3, cacheBytes: 300 };
    const m = createAgentMetrics({ stats, version: '9.9.9', stored: async () => ({ count: 2, bytes: 300, byNamespace }), restoresInFlight: () => 1, checkpointsInFlight: () => 0, gc: () => gc });
    const before = parseExposition(await m.registry.render());
    expect(before.get('thaw_restores_total{outcome="restored"}')).toBe(0);
    expect(before.get('thaw_checkpoints_total{outcome="failed"}')).toBe(0);
    m.onRestoreEvent({ event: 'restore', outcome: 'restored', checkpoint: 'c', containerId: 'x', container: 'w', pod: 'ns/p', bytes: 1000, phases: { verifyMs: 20, criuRestoreMs: 300, totalMs: 400 } });
    m.onRestoreEvent({
      event: 'restore', outcome: 'restored', checkpoint: 'c', containerId: 'x2', container: 'w', pod: 'ns/p', bytes: 0, phases: { criuRestoreMs: 50, memoryFillWaitMs: 5, totalMs: 200 },
      memoryFill: { by: 'thaw-fill', copiedBytes: 4096, zeroedBytes: 8192, faults: 1, existing: 0, retried: 0, waited: 0, events: 0, faultFrames: 0, threads: 2, chunks: 3, fillMs: 1, totalMs: 2 },
    });
    m.onRestoreEvent({ event: 'restore', outcome: 'fallback', cause: 'RESTORE_CRIU_FAILED', checkpoint: 'c', containerId: 'y', container: 'w', pod: 'ns/q', phases: { totalMs: 50 } });
    stats.countFallback('RESTORE_CRIU_FAILED');
    stats.countRestoreFallbackAtCreate('RESTORE_CHECKPOINT_MISSING');
    stats.countTenancyRefusal('team-a', 'RESTORE_NOT_ALLOWED');
    m.onCheckpointEvent({ event: 'checkpoint', outcome: 'succeeded', name: 'ns/c', namespace: 'ns', pod: 'ns/s', container: 'w', containerId: 'z', bytes: 5000, phases: { inspectMs: 1, dumpMs: 100, rootfsDiffMs: 2, publishMs: 3, totalMs: 110 } });
    m.onCheckpointEvent({ event: 'checkpoint', outcome: 'failed', name: 'ns/d', namespace: 'ns', pod: 'ns/s', container: 'w', containerId: 'z' });
    const after = parseExposition(await m.registry.render());
    expect(after.get('thaw_restores_total{outcome="restored"}')).toBe(2);
    expect(after.get('thaw_restores_by_namespace_total{namespace="ns",outcome="restored"}')).toBe(2);
    // Who filled the memory: the first event has no memoryFill (CRIU's restorer), the second thaw-fill's account.
    expect(after.get('thaw_restore_memory_fills_total{by="criu"}')).toBe(1);
    expect(after.get('thaw_restore_memory_fills_total{by="thaw-fill"}')).toBe(1);
    expect(after.get('thaw_restore_memory_filled_bytes_total{kind="copied"}')).toBe(4096);
    expect(after.get('thaw_restore_memory_filled_bytes_total{kind="zero"}')).toBe(8192);
    expect(after.get('thaw_restores_by_namespace_total{namespace="ns",outcome="fallback"}')).toBe(1);
    expect(after.get('thaw_tenancy_refusals_total{namespace="team-a",cause="RESTORE_NOT_ALLOWED"}')).toBe(1);
    expect(after.get('thaw_restores_total{outcome="fallback"}')).toBe(2);
    expect(after.get('thaw_fallbacks_total{cause="RESTORE_CRIU_FAILED"}')).toBe(1);
    expect(after.get('thaw_fallbacks_total{cause="RESTORE_CHECKPOINT_MISSING"}')).toBe(1);
    expect(after.get('thaw_restore_bytes_read_total')).toBe(1000);
    expect(after.get('thaw_restore_phase_seconds_count{phase="total"}')).toBe(3);
    expect(after.get('thaw_restore_phase_seconds_count{phase="criu-restore"}')).toBe(2);
    expect(after.get('thaw_restore_phase_seconds_sum{phase="criu-restore"}')).toBeCloseTo(0.35);
    expect(after.get('thaw_restore_phase_seconds_count{phase="memory-fill-wait"}')).toBe(1);
    expect(after.get('thaw_checkpoints_total{outcome="succeeded"}')).toBe(1);
    expect(after.get('thaw_checkpoints_total{outcome="failed"}')).toBe(1);
    expect(after.get('thaw_checkpoint_bytes_written_total')).toBe(5000);
    expect(after.get('thaw_checkpoint_phase_seconds_count{phase="dump"}')).toBe(1);
    expect(after.get('thaw_checkpoints_stored')).toBe(2);
    expect(after.get('thaw_checkpoints_stored_bytes')).toBe(300);
    expect(after.get('thaw_store_bytes{namespace="team-a"}')).toBe(100);
    expect(after.get('thaw_store_bytes{namespace=".oci"}')).toBe(200);
    expect(after.get('thaw_store_checkpoints{namespace="team-a"}')).toBe(1);
    expect(after.get('thaw_checkpoints_by_namespace_total{namespace="ns",outcome="succeeded"}')).toBe(1);
    expect(after.get('thaw_checkpoints_by_namespace_total{namespace="ns",outcome="failed"}')).toBe(1);
    expect(after.get('thaw_gc_runs_total')).toBe(1);
    expect(after.get('thaw_gc_collected_total{namespace="team-a"}')).toBe(2);
    expect(after.get('thaw_gc_collected_bytes_total{namespace="team-a"}')).toBe(4096);
    expect(after.get('thaw_gc_cache_files_collected_total')).toBe(3);
    expect(after.get('thaw_gc_cache_bytes_collected_total')).toBe(300);
    // A namespace whose checkpoints are gone reads 0, not its last value.
    byNamespace = new Map([['.oci', { count: 1, bytes: 200 }]]);
    const later = parseExposition(await m.registry.render());
    expect(later.get('thaw_store_bytes{namespace="team-a"}')).toBe(0);
    expect(later.get('thaw_store_checkpoints{namespace="team-a"}')).toBe(0);
    expect(after.get('thaw_restores_in_flight')).toBe(1);
    expect(after.get('thaw_agent_info{version="9.9.9"}')).toBe(1);
  });
});
