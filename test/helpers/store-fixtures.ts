// Shared by the store tests (not a test file itself: vitest includes *.test.ts only).
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ManifestFields } from '../../src/store/manifest.js';

export function manifestFields(overrides: Partial<ManifestFields> = {}): ManifestFields {
  return {
    source: {
      nodeHostname: 'node-a',
      pod: { name: 'llm-0', namespace: 'default', uid: '8d2f7a4e-0000-4000-8000-000000000001' },
      container: { name: 'worker', id: 'c0ffee' },
      command: ['python3', '-m', 'vllm.entrypoints.openai.api_server'],
      args: ['--model', 'Qwen/Qwen2.5-0.5B'],
      envKeys: ['HF_TOKEN', 'PATH'],
    },
    constraints: {
      arch: { node: 'x64', machine: 'x86_64' },
      kernelRelease: '6.8.0-45-generic',
      criuVersion: '4.1',
      containerdVersion: '2.1.4',
      image: { ref: 'registry.example/llm:1', digest: `sha256:${'a'.repeat(64)}` },
    },
    criu: {
      pid: 1234,
      externalMounts: [{ key: '/snapshot-control', path: '/snapshot-control' }],
      netnsKey: 'extNetNs',
      stdioFds: ['/dev/null', 'pipe:[123]', 'pipe:[124]'],
      options: { tcpEstablished: true, manageCgroupsMode: 'soft', ghostLimit: 536870912 },
    },
    timings: { phaseMs: { 'criu-dump': 1200 } },
    liveBytes: 4096,
    ...overrides,
  };
}

/** A fresh store root under /tmp (mkdtemp: 0700, root-owned when tests run as root). */
export async function tempRoot(prefix = 'thaw-store-'): Promise<{ root: string; cleanup: () => Promise<void> }> {
  const root = await mkdtemp(join(tmpdir(), prefix));
  return { root, cleanup: () => rm(root, { recursive: true, force: true }) };
}

/** Writes what a checkpoint flow writes: CRIU images, a rootfs diff and the deleted-files list. */
export async function writeCheckpointFiles(paths: { criuDir: string; rootfsDiff: string; deletedFiles: string }, pagesBytes = 3 * 1024 * 1024 + 17): Promise<void> {
  const pages = Buffer.alloc(pagesBytes);
  for (let i = 0; i < pages.length; i += 4096) pages[i] = i % 251;
  await writeFile(join(paths.criuDir, 'pages-1.img'), pages);
  await writeFile(join(paths.criuDir, 'inventory.img'), 'inventory');
  await writeFile(join(paths.criuDir, 'core-1.img'), Buffer.from([1, 2, 3, 4]));
  await writeFile(paths.rootfsDiff, 'not really a tar');
  await writeFile(paths.deletedFiles, '[]\n');
}
