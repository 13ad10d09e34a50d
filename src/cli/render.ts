/** Human renderings of the CLI's data (pure; `--json` prints the data itself). */
import type { CheckpointProgressMsg, CheckpointSummaryMsg, CollectGarbageResponseMsg, InspectCheckpointResponseMsg, SnapshotPodsMsg, StatusResponseMsg } from '../agent/index.js';
import type { Manifest } from '../store/index.js';
import { renderTable } from '../table.js';

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

/**
 * The store's checkpoints; a SNAPSHOT column (name and short key) when any is a `thaw.dev/snapshot` checkpoint,
 * and, when `snapshotPods` has rows, how each snapshot workload's pods started on this node.
 */
export function renderList(checkpoints: readonly CheckpointSummaryMsg[], snapshotPods: readonly SnapshotPodsMsg[] = []): string {
  const withSnapshot = checkpoints.some((c) => c.snapshot);
  const snap = (c: CheckpointSummaryMsg): string[] => (withSnapshot ? [c.snapshot ? `${c.snapshot} (key ${c.snapshot_key.slice(0, 12)})` : '-'] : []);
  const table =
    checkpoints.length === 0
      ? 'no checkpoints'
      : renderTable(
          ['NAME', ...(withSnapshot ? ['SNAPSHOT'] : []), 'CREATED', 'SIZE', 'GPU', 'IN USE', 'RESTORE', 'IMAGE'],
          checkpoints.map((c) =>
            c.problem
              ? [c.name, ...snap(c), '-', '-', '-', c.in_use ? 'yes' : 'no', '-', `BROKEN: ${c.problem}`]
              : [c.name, ...snap(c), c.created_at.replace(/\.\d+Z$/, 'Z'), formatBytes(c.bytes), c.gpu ? 'yes' : 'no', c.in_use ? 'yes' : 'no', restoreColumn(c), c.image],
          ),
        );
  if (snapshotPods.length === 0) return table;
  return [
    table,
    '',
    'snapshot pods started on this node (since the agent started):',
    renderTable(['NAMESPACE', 'SNAPSHOT', 'STARTED', 'CAUSE', 'PODS'], snapshotPods.map((p) => [p.namespace, p.snapshot, p.outcome, p.cause || '-', String(p.count)])),
  ].join('\n');
}

/** "ok", or the cause of the restore failure that marks the checkpoint on this node (thaw clear-failure). */
function restoreColumn(c: CheckpointSummaryMsg): string {
  if (!c.restore_failure_json) return 'ok';
  const f = JSON.parse(c.restore_failure_json) as { cause?: string };
  return `FAILED ${f.cause ?? ''}`.trim();
}

export function renderGc(r: CollectGarbageResponseMsg): string {
  const verb = r.dry_run ? 'would collect' : 'collected';
  const lines = r.collected.length === 0 ? [`${verb} no checkpoint`] : [
    `${verb} ${r.collected.length} checkpoint${r.collected.length === 1 ? '' : 's'} (${formatBytes(r.bytes)}), least recently used first:`,
    renderTable(['NAME', 'SIZE', 'LAST USED'], r.collected.map((c) => [c.name, formatBytes(c.bytes), c.last_used.replace(/\.\d+Z$/, 'Z')])),
  ];
  lines.push(`${verb} ${r.cache_files} file cache entr${r.cache_files === 1 ? 'y' : 'ies'} no checkpoint links (${formatBytes(r.cache_bytes)})`);
  if (r.unmet) lines.push(`not within bounds: ${r.unmet}`);
  return lines.join('\n');
}

export function renderInspect(r: InspectCheckpointResponseMsg): string {
  const s = r.summary;
  const m = JSON.parse(r.manifest_json) as Partial<Manifest>;
  const lines = [
    `name:        ${s.name}`,
    `id:          ${s.id}`,
    `created:     ${s.created_at}`,
    `directory:   ${r.directory}`,
    `size:        ${formatBytes(s.bytes)} in ${s.files} files (${formatBytes(r.disk_bytes)} on disk)`,
    `image:       ${s.image}`,
    `source:      ${s.source_pod || '-'}${m.source?.container.name ? ` container ${m.source.container.name}` : ''}${m.source?.nodeHostname ? ` on ${m.source.nodeHostname}` : ''}`,
    `constraints: ${m.constraints ? `${m.constraints.arch.node}, kernel ${m.constraints.kernelRelease}, CRIU ${m.constraints.criuVersion}, containerd ${m.constraints.containerdVersion}` : '-'}`,
    `gpu state:   ${s.gpu ? 'yes' : 'no'}`,
    ...(s.snapshot ? [`snapshot:    ${s.snapshot} (key ${s.snapshot_key})`] : []),
    `in use:      ${s.in_use ? 'yes (a restore reads it)' : 'no'}`,
    `restorable here: ${r.restorable ? 'yes' : 'no'}`,
  ];
  if (s.restore_failure_json) {
    const f = JSON.parse(s.restore_failure_json) as { cause?: string; reason?: string; at?: string; pod?: string };
    lines.push(`restore failed here: ${f.cause} at ${f.at} (pod ${f.pod}): ${f.reason}; pods cold-start until \`thaw clear-failure ${s.name}\``);
  }
  for (const x of r.mismatches) lines.push(`  ${x.severity === 'fatal' ? 'FATAL' : 'warning'} ${x.what}: checkpoint ${x.expected}, this node ${x.actual}`);
  return lines.join('\n');
}

export function renderStatus(s: StatusResponseMsg): string {
  const lines = [`agent ${s.version} pid ${s.pid}, up since ${s.started_at}`, `NRI: ${s.nri}${s.runtime ? ` (${s.runtime})` : ''}, managed containers: ${s.managed_containers}`];
  if (s.restores.length === 0) lines.push('restores in flight: none');
  else lines.push('restores in flight:', renderTable(['CONTAINER', 'POD', 'CHECKPOINT', 'PHASE', 'SINCE'], s.restores.map((r) => [r.container_id.slice(0, 12), r.pod, r.checkpoint, r.phase, r.since])));
  if (s.checkpoints.length === 0) lines.push('checkpoints in flight: none');
  else lines.push('checkpoints in flight:', renderTable(['CONTAINER', 'POD', 'NAME', 'STATE'], s.checkpoints.map((c) => [c.container_id.slice(0, 12), c.pod, c.name, c.state])));
  return lines.join('\n');
}

/** One stderr line per state change of a checkpoint. */
export function renderProgress(p: CheckpointProgressMsg): string {
  return `thaw: checkpoint ${p.name} of ${p.pod} (container ${p.container_id.slice(0, 12)}): ${p.state}`;
}

export function renderCheckpointResult(p: CheckpointProgressMsg): string {
  if (p.state === 'succeeded') {
    const phases = p.phases_json ? (JSON.parse(p.phases_json) as Record<string, number>) : {};
    const parts = Object.entries(phases).filter(([k]) => k !== 'totalMs').map(([k, v]) => `${k.replace(/Ms$/, '')} ${formatMs(v)}`);
    return `checkpoint ${p.name} (${p.id}): ${formatBytes(p.bytes)} in ${formatMs(phases['totalMs'] ?? 0)}${parts.length ? ` (${parts.join(', ')})` : ''}`;
  }
  const err = p.error_json ? (JSON.parse(p.error_json) as { code?: string; message?: string }) : {};
  return `checkpoint ${p.name} ${p.state}: ${err.code ? `${err.code}: ` : ''}${err.message ?? 'no reason given'}`;
}
