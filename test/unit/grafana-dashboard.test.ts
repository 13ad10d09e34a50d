/**
 * deploy/grafana/thaw.json against the agent's metrics (src/agent/agent-metrics.ts): every query names only
 * series the agent exports (a histogram's _bucket/_sum/_count included), groups and matches only on labels those
 * series carry (plus `le` of buckets and the `instance`/`job` labels Prometheus adds at scrape), with label values
 * the agent emits; the quantile panels are histogram_quantile over buckets grouped by `le`; and the panels the
 * dashboard promises are there. The series and their labels come from a rendering of the agent's own registry
 * after events of every kind, not from a list kept here.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createAgentMetrics } from '../../src/agent/agent-metrics.js';
import { ThawNriStats } from '../../src/agent/nri-stats.js';

const REPO = path.resolve(import.meta.dirname, '../..');
const DASHBOARD = JSON.parse(readFileSync(path.join(REPO, 'deploy/grafana/thaw.json'), 'utf8')) as Dashboard;

interface Target { refId: string; expr: string; datasource?: { type: string; uid: string } }
interface Panel { id: number; type: string; title: string; targets?: Target[]; panels?: Panel[]; datasource?: { type: string; uid: string } }
interface Dashboard { uid: string; title: string; panels: Panel[]; templating: { list: Array<{ name: string; type: string; query?: unknown; definition?: string }> } }

/** Labels Prometheus attaches to every scraped series. */
const SCRAPE_LABELS = new Set(['instance', 'job']);

/** Series name → its label names → the values the agent emitted. */
type Exported = Map<string, Map<string, Set<string>>>;

async function exportedSeries(): Promise<Exported> {
  const stats = new ThawNriStats();
  const m = createAgentMetrics({
    stats, version: '0.0.0-test', restoresInFlight: () => 0, checkpointsInFlight: () => 0,
    stored: async () => ({ count: 1, bytes: 10, snapshots: [{ namespace: 'ns', snapshot: 's', count: 1 }] }),
    // One row of every outcome (the cause label's values are codes, open-ended like thaw_fallbacks_total's).
    snapshotPods: () => (['restored', 'cold', 'checkpointed'] as const).map((outcome) => ({ namespace: 'ns', snapshot: 's', outcome, cause: outcome === 'cold' ? 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS' : '', count: 1 })),
  });
  // One event with every phase of each kind, so every phase label value appears.
  m.onRestoreEvent({
    event: 'restore', outcome: 'restored', checkpoint: 'c', containerId: 'x', container: 'w', pod: 'ns/p', bytes: 1,
    phases: { hookMs: 1, hookStartupMs: 1, transferMs: 1, verifyMs: 1, waitVerifyMs: 1, overlayMs: 1, criuRestoreMs: 1, cudaRestoreMs: 1, totalMs: 1 },
  });
  m.onRestoreEvent({ event: 'restore', outcome: 'fallback', cause: 'RESTORE_CRIU_FAILED', checkpoint: 'c', containerId: 'y', container: 'w', pod: 'ns/q', phases: { totalMs: 1 } });
  m.onCheckpointEvent({ event: 'checkpoint', outcome: 'succeeded', name: 'ns/c', namespace: 'ns', pod: 'ns/s', container: 'w', containerId: 'z', bytes: 1, phases: { inspectMs: 1, cudaMs: 1, dumpMs: 1, rootfsDiffMs: 1, publishMs: 1, totalMs: 1 } });
  stats.countFallback('RESTORE_CRIU_FAILED');
  const out: Exported = new Map();
  for (const line of (await m.registry.render()).split('\n')) {
    const s = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$/.exec(line);
    if (!s?.[1]) continue;
    const labels = out.get(s[1]) ?? new Map<string, Set<string>>();
    for (const [, k, v] of (s[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      if (!labels.has(k!)) labels.set(k!, new Set());
      labels.get(k!)!.add(v!);
    }
    out.set(s[1], labels);
  }
  return out;
}

function allPanels(panels: Panel[]): Panel[] {
  return panels.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
}

const PROMQL_WORDS = new Set([
  'sum', 'avg', 'min', 'max', 'count', 'rate', 'irate', 'increase', 'histogram_quantile', 'by', 'without', 'on', 'ignoring',
  'group_left', 'group_right', 'and', 'or', 'unless', 'offset', 'label_values', 'topk', 'bottomk', 'clamp_min', 'delta', 'deriv',
]);

/** What a query is wrong about, as messages (empty: it names only what the agent exports). */
function problemsOf(expr: string, exported: Exported): string[] {
  const problems: string[] = [];
  // Strip quoted strings and Grafana's $variables before looking for identifiers.
  const bare = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/\$\{?[a-zA-Z_]+\}?/g, '0');
  const metrics = [...new Set([...bare.matchAll(/[a-zA-Z_:][a-zA-Z0-9_:]*/g)].map((m) => m[0]).filter((w) => !PROMQL_WORDS.has(w) && !/^(le|\d)/.test(w)))]
    .filter((w) => w.startsWith('thaw_') || !/^[a-z_]+$/.test(w) || ![...bare.matchAll(new RegExp(`\\b(?:by|without)\\s*\\(([^)]*\\b${w}\\b[^)]*)\\)`, 'g'))].length);
  const named = metrics.filter((w) => exported.has(w) || w.startsWith('thaw_'));
  if (named.length === 0) problems.push('names no thaw metric');
  for (const w of named) if (!exported.has(w)) problems.push(`${w} is not a series the agent exports`);
  const labelsOf = new Set<string>(SCRAPE_LABELS);
  for (const w of named) {
    for (const l of exported.get(w)?.keys() ?? []) labelsOf.add(l);
    if (w.endsWith('_bucket')) labelsOf.add('le');
  }
  for (const [, list] of bare.matchAll(/\b(?:by|without)\s*\(([^)]*)\)/g)) {
    for (const l of list!.split(',').map((x) => x.trim()).filter((x) => x !== '')) {
      if (!labelsOf.has(l)) problems.push(`groups by ${l}, a label none of ${named.join(', ')} carries`);
    }
  }
  for (const [, metric, matchers] of expr.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}/g)) {
    for (const [, l, op, v] of matchers!.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"/g)) {
      if (SCRAPE_LABELS.has(l!)) continue;
      const values = exported.get(metric!)?.get(l!);
      if (!values) problems.push(`${metric} has no label ${l}`);
      else if (op === '=' && !values.has(v!)) problems.push(`${metric}{${l}} is never "${v}" (the agent emits ${[...values].join(', ')})`);
    }
  }
  if (/histogram_quantile/.test(expr) && !/_bucket\b/.test(expr)) problems.push('histogram_quantile over something that is not a histogram\'s buckets');
  if (/histogram_quantile/.test(expr) && !/by\s*\([^)]*\ble\b/.test(expr)) problems.push('histogram_quantile without grouping by le');
  return problems;
}

describe('deploy/grafana/thaw.json', () => {
  let exported: Exported;
  const panels = allPanels(DASHBOARD.panels);
  const queries = panels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, expr: t.expr })));

  beforeAll(async () => {
    exported = await exportedSeries();
  });

  it('every query names only series the agent exports, with their labels and label values', () => {
    expect(queries.length).toBeGreaterThanOrEqual(10);
    for (const q of queries) expect(problemsOf(q.expr, exported), `${q.panel}: ${q.expr}`).toEqual([]);
    // The node variable's query too.
    const instance = DASHBOARD.templating.list.find((v) => v.name === 'instance');
    expect(problemsOf(instance?.definition ?? '', exported)).toEqual([]);
  });

  it('the checker is not vacuous: a misspelled metric, an unknown label, a label value never emitted and a quantile without le are caught', () => {
    expect(problemsOf('sum(rate(thaw_restore_total[5m]))', exported)).toEqual(['thaw_restore_total is not a series the agent exports']);
    expect(problemsOf('sum by (reason) (rate(thaw_fallbacks_total[5m]))', exported)).toEqual(['groups by reason, a label none of thaw_fallbacks_total carries']);
    expect(problemsOf('thaw_restores_total{outcome="restore"}', exported)).toEqual(['thaw_restores_total{outcome} is never "restore" (the agent emits restored, fallback)']);
    expect(problemsOf('histogram_quantile(0.5, sum by (phase) (rate(thaw_restore_phase_seconds_bucket[5m])))', exported)).toEqual(['histogram_quantile without grouping by le']);
    expect(problemsOf('up', exported)).toEqual(['names no thaw metric']);
  });

  it('has the panels it promises: restores by outcome, restore p50/p99 by phase, fallbacks by cause, bytes read, store usage', () => {
    const byTitle = (re: RegExp): string[] => queries.filter((q) => re.test(q.panel)).map((q) => q.expr);
    expect(byTitle(/^Restores by outcome$/).join()).toMatch(/sum by \(outcome\) \(rate\(thaw_restores_total\{/);
    expect(byTitle(/^Restore time by phase, p50$/).join()).toMatch(/^histogram_quantile\(0\.5, sum by \(le, phase\) \(rate\(thaw_restore_phase_seconds_bucket/);
    expect(byTitle(/^Restore time by phase, p99$/).join()).toMatch(/^histogram_quantile\(0\.99, sum by \(le, phase\) \(rate\(thaw_restore_phase_seconds_bucket/);
    expect(byTitle(/^Fallbacks by cause$/).join()).toMatch(/sum by \(cause\) \(increase\(thaw_fallbacks_total/);
    expect(byTitle(/bytes read/i).join()).toMatch(/thaw_restore_bytes_read_total/);
    expect(byTitle(/^Store usage$/).join()).toMatch(/thaw_checkpoints_stored_bytes/);
    expect(byTitle(/^Snapshot pods by how they started$/).join()).toMatch(/sum by \(namespace, snapshot, outcome, cause\) \(increase\(thaw_snapshot_pods_total/);
  });

  it('is importable: unique panel ids, every query panel on the datasource variable, a uid and a title', () => {
    expect(DASHBOARD.uid).toMatch(/^[a-zA-Z0-9-]{1,40}$/);
    expect(DASHBOARD.title).toBe('thaw');
    const ids = panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(DASHBOARD.templating.list.find((v) => v.name === 'datasource')?.type).toBe('datasource');
    for (const p of panels.filter((x) => x.type !== 'row')) {
      expect(p.datasource, p.title).toEqual({ type: 'prometheus', uid: '${datasource}' });
      expect(p.targets?.length, p.title).toBeGreaterThan(0);
      for (const t of p.targets ?? []) expect(t.datasource, p.title).toEqual({ type: 'prometheus', uid: '${datasource}' });
    }
  });
});
