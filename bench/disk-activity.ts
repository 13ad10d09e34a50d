/**
 * What the disks did while something ran: /proc/diskstats sampled every few ms, binned into MB read and busy
 * time per bin (bench:gpu records one per restore: whether a dropped restore waits on the disk or on itself).
 * Whole disks only (nvme0n1, sda, vda, ...): partitions and device-mapper volumes count the same reads again.
 */
import { readFileSync } from 'node:fs';

const SECTOR_BYTES = 512;
const WHOLE_DISK = /^(nvme\d+n\d+|[shv]d[a-z]+|xvd[a-z]+)$/;

export interface DiskCounters {
  /** Per whole disk: sectors read (field 6) and milliseconds spent doing I/O (field 13). */
  disks: Map<string, { sectorsRead: number; ioTicksMs: number }>;
}

/** Parses /proc/diskstats (Documentation/admin-guide/iostats.rst); lines it cannot read are skipped. Pure. */
export function parseDiskstats(text: string): DiskCounters {
  const disks = new Map<string, { sectorsRead: number; ioTicksMs: number }>();
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f.length < 14 || !WHOLE_DISK.test(f[2]!)) continue;
    const sectorsRead = Number(f[5]);
    const ioTicksMs = Number(f[12]);
    if (Number.isFinite(sectorsRead) && Number.isFinite(ioTicksMs)) disks.set(f[2]!, { sectorsRead, ioTicksMs });
  }
  return { disks };
}

export interface DiskTimeline {
  disks: string[];
  binMs: number;
  /** Epoch ms of the first sample: bin i covers [startAt + i·binMs, startAt + (i+1)·binMs). */
  startAt: number;
  /** MB (1e6 bytes) read in each bin, all disks together. */
  readMB: number[];
  /** The busiest disk's share of each bin spent doing I/O, in percent. */
  busyPct: number[];
  totalMB: number;
}

interface Sample {
  at: number;
  counters: DiskCounters;
}

/** Bins consecutive samples (sorted by time). Pure. */
export function binSamples(samples: readonly Sample[], binMs: number): DiskTimeline {
  const first = samples[0];
  const disks = first === undefined ? [] : [...first.counters.disks.keys()].sort();
  const startAt = first?.at ?? 0;
  const last = samples[samples.length - 1];
  const bins = last === undefined ? 0 : Math.max(1, Math.ceil((last.at - startAt) / binMs));
  const read = new Array<number>(bins).fill(0);
  const busy = disks.map(() => new Array<number>(bins).fill(0));
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1]!;
    const b = samples[i]!;
    // A sample's deltas go to the bin of its end (10 ms samples in 50 ms bins: the smearing is one sample).
    const bin = Math.min(bins - 1, Math.max(0, Math.floor((b.at - startAt - 1e-9) / binMs)));
    disks.forEach((d, k) => {
      const x = a.counters.disks.get(d);
      const y = b.counters.disks.get(d);
      if (x === undefined || y === undefined) return;
      read[bin]! += Math.max(0, y.sectorsRead - x.sectorsRead) * SECTOR_BYTES;
      busy[k]![bin]! += Math.max(0, y.ioTicksMs - x.ioTicksMs);
    });
  }
  const r1 = (v: number): number => Math.round(v * 10) / 10;
  return {
    disks,
    binMs,
    startAt,
    readMB: read.map((b) => r1(b / 1e6)),
    busyPct: read.map((_, i) => Math.min(100, Math.round((Math.max(0, ...busy.map((d) => d[i]!)) / binMs) * 100))),
    totalMB: r1(read.reduce((s, b) => s + b, 0) / 1e6),
  };
}

/** Samples /proc/diskstats every `intervalMs` until stop(); stop() returns the timeline in `binMs` bins. */
export function sampleDisks(o: { intervalMs?: number; binMs?: number; path?: string } = {}): { stop(): DiskTimeline } {
  const path = o.path ?? '/proc/diskstats';
  const samples: Sample[] = [];
  const take = (): void => {
    try {
      samples.push({ at: Date.now(), counters: parseDiskstats(readFileSync(path, 'utf8')) });
    } catch {
      // no diskstats (a container without /proc of the host): an empty timeline
    }
  };
  take();
  const timer = setInterval(take, o.intervalMs ?? 10);
  return {
    stop() {
      clearInterval(timer);
      take();
      return binSamples(samples, o.binMs ?? 50);
    },
  };
}
