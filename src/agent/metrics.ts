/**
 * A small registry that renders the Prometheus text exposition format (version 0.0.4): counters, gauges and
 * histograms with labels. Hand-written rather than prom-client: the agent needs a dozen series, the format is
 * small and stable, and prom-client brings a process-global default registry and dependencies of its own.
 * Rendering is pure (`render()` reads the values; `collect` callbacks refresh gauges just before).
 *
 * Format rules followed here: one `# HELP` and `# TYPE` per family; label values escape `\`, `"` and newline;
 * HELP text escapes `\` and newline; histograms expose cumulative `_bucket{le=..}` series ending with
 * `le="+Inf"`, then `_sum` and `_count`; values are decimal floats (`+Inf`, `-Inf`, `NaN` spelled so).
 */

export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

type Labels = Record<string, string>;

const NAME_PATTERN = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_PATTERN = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

export function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

export function escapeHelp(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
}

export function formatValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

function formatLabels(labels: Labels): string {
  const entries = Object.entries(labels);
  if (entries.length === 0) return '';
  return `{${entries.map(([k, v]) => `${k}="${escapeLabelValue(v)}"`).join(',')}}`;
}

/** A series key independent of the order labels were given in. */
function keyOf(labelNames: readonly string[], labels: Labels): string {
  return JSON.stringify(labelNames.map((n) => labels[n] ?? ''));
}

function checkLabels(family: string, labelNames: readonly string[], labels: Labels): void {
  for (const k of Object.keys(labels)) if (!labelNames.includes(k)) throw new Error(`metric ${family}: unknown label ${k}`);
}

abstract class Family {
  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'gauge' | 'histogram',
    readonly labelNames: readonly string[],
  ) {
    if (!NAME_PATTERN.test(name)) throw new Error(`metric name ${JSON.stringify(name)} is not a valid Prometheus name`);
    for (const l of labelNames) if (!LABEL_PATTERN.test(l) || l === 'le') throw new Error(`metric ${name}: bad label name ${l}`);
  }
  abstract lines(): string[];
}

class ScalarFamily extends Family {
  protected readonly series = new Map<string, { labels: Labels; value: number }>();

  protected entry(labels: Labels): { labels: Labels; value: number } {
    checkLabels(this.name, this.labelNames, labels);
    const key = keyOf(this.labelNames, labels);
    let e = this.series.get(key);
    if (!e) {
      e = { labels: Object.fromEntries(this.labelNames.map((n) => [n, labels[n] ?? ''])), value: 0 };
      this.series.set(key, e);
    }
    return e;
  }

  get(labels: Labels = {}): number {
    return this.series.get(keyOf(this.labelNames, labels))?.value ?? 0;
  }

  lines(): string[] {
    return [...this.series.values()].map((e) => `${this.name}${formatLabels(e.labels)} ${formatValue(e.value)}`);
  }
}

export class Counter extends ScalarFamily {
  constructor(name: string, help: string, labelNames: readonly string[] = []) {
    super(name, help, 'counter', labelNames);
  }
  inc(labels: Labels = {}, by = 1): void {
    if (!(by >= 0)) throw new Error(`counter ${this.name} can only go up (inc by ${by})`);
    this.entry(labels).value += by;
  }
  /**
   * Sets a counter kept elsewhere (read at scrape). Refuses to go down: a counter that decreased would read as
   * a reset to Prometheus.
   */
  setTotal(value: number, labels: Labels = {}): void {
    const e = this.entry(labels);
    if (value < e.value) throw new Error(`counter ${this.name} cannot go down (${e.value} → ${value})`);
    e.value = value;
  }
  /** Declares a series at 0 so that it is exposed before its first event (rate() needs the zero). */
  touch(labels: Labels = {}): void {
    this.entry(labels);
  }
}

export class Gauge extends ScalarFamily {
  constructor(name: string, help: string, labelNames: readonly string[] = []) {
    super(name, help, 'gauge', labelNames);
  }
  set(value: number, labels: Labels = {}): void {
    this.entry(labels).value = value;
  }
  /** Forgets every series (a collect callback that sets the current set of series anew). */
  reset(): void {
    this.series.clear();
  }
}

export class Histogram extends Family {
  private readonly series = new Map<string, { labels: Labels; counts: number[]; sum: number; count: number }>();
  readonly buckets: readonly number[];

  constructor(name: string, help: string, buckets: readonly number[], labelNames: readonly string[] = []) {
    super(name, help, 'histogram', labelNames);
    const sorted = [...buckets].sort((a, b) => a - b);
    if (sorted.length === 0 || sorted.some((b, i) => i > 0 && b === sorted[i - 1])) throw new Error(`histogram ${name}: buckets must be distinct and non-empty`);
    this.buckets = sorted;
  }

  observe(value: number, labels: Labels = {}): void {
    checkLabels(this.name, this.labelNames, labels);
    const key = keyOf(this.labelNames, labels);
    let e = this.series.get(key);
    if (!e) {
      e = { labels: Object.fromEntries(this.labelNames.map((n) => [n, labels[n] ?? ''])), counts: this.buckets.map(() => 0), sum: 0, count: 0 };
      this.series.set(key, e);
    }
    for (let i = 0; i < this.buckets.length; i++) if (value <= this.buckets[i]!) e.counts[i]!++;
    e.sum += value;
    e.count++;
  }

  /** Observations of one series (tests, status). */
  countOf(labels: Labels = {}): number {
    return this.series.get(keyOf(this.labelNames, labels))?.count ?? 0;
  }

  lines(): string[] {
    const out: string[] = [];
    for (const e of this.series.values()) {
      this.buckets.forEach((b, i) => out.push(`${this.name}_bucket${formatLabels({ ...e.labels, le: formatValue(b) })} ${e.counts[i]}`));
      out.push(`${this.name}_bucket${formatLabels({ ...e.labels, le: '+Inf' })} ${e.count}`);
      out.push(`${this.name}_sum${formatLabels(e.labels)} ${formatValue(e.sum)}`);
      out.push(`${this.name}_count${formatLabels(e.labels)} ${e.count}`);
    }
    return out;
  }
}

export class MetricsRegistry {
  private readonly families: Family[] = [];
  private readonly collectors: Array<() => Promise<void> | void> = [];

  private add<T extends Family>(f: T): T {
    if (this.families.some((x) => x.name === f.name)) throw new Error(`metric ${f.name} registered twice`);
    this.families.push(f);
    return f;
  }
  counter(name: string, help: string, labelNames: readonly string[] = []): Counter {
    return this.add(new Counter(name, help, labelNames));
  }
  gauge(name: string, help: string, labelNames: readonly string[] = []): Gauge {
    return this.add(new Gauge(name, help, labelNames));
  }
  histogram(name: string, help: string, buckets: readonly number[], labelNames: readonly string[] = []): Histogram {
    return this.add(new Histogram(name, help, buckets, labelNames));
  }
  /** Runs before every render (gauges read from the store, the engine). */
  onCollect(fn: () => Promise<void> | void): void {
    this.collectors.push(fn);
  }

  /** The exposition text after running the collectors; a collector that throws leaves its gauges as they were. */
  async render(): Promise<string> {
    await Promise.allSettled(this.collectors.map(async (c) => c()));
    return this.renderNow();
  }

  /** The exposition text of the values as they are (pure). */
  renderNow(): string {
    const out: string[] = [];
    for (const f of this.families) {
      out.push(`# HELP ${f.name} ${escapeHelp(f.help)}`, `# TYPE ${f.name} ${f.type}`, ...f.lines());
    }
    return `${out.join('\n')}\n`;
  }
}

/** Parses exposition text into `name{labels}` → value (tests, `thaw status`). Comments and blank lines skipped. */
export function parseExposition(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`not an exposition line: ${JSON.stringify(line)}`);
    const v = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : Number(m[3]);
    out.set(`${m[1]}${m[2] ?? ''}`, v);
  }
  return out;
}
