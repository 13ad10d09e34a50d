/**
 * `thaw push` and `thaw pull` as an operator runs them: the CLI process (dist/src/cli/main.js) against a real
 * docker-registry on loopback, on node A's store and node B's store. Exit codes per src/cli/exit-codes.ts.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { ensureBuilt, PACKAGE_ROOT } from '../../src/node-stack/thaw-plugin-process.js';
import { openLocalStore } from '../../src/store/local-store.js';
import { weightsCacheDir } from '../../src/store/index.js';
import { manifestFields, writeCheckpointFiles } from '../helpers/store-fixtures.js';

const execFileP = promisify(execFile);
const CLI = join(PACKAGE_ROOT, 'dist/src/cli/main.js');
const MiB = 1024 * 1024;

/** Runs the CLI; resolves with its exit code and output (a non-zero exit is a result, not an exception). */
async function thaw(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await execFileP(process.execPath, [CLI, ...args], { timeout: 120_000, env: { ...process.env, THAW_API_SOCKET: '/nonexistent' } });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe('thaw push / thaw pull against a real registry', () => {
  let registry: RunningRegistry;
  let rootA: string;
  let rootB: string;
  let config: string;
  let configDir: string;

  beforeAll(async () => {
    ensureBuilt();
    registry = await startRegistry();
    rootA = await mkdtemp(join(tmpdir(), 'thaw-cli-reg-a-'));
    rootB = await mkdtemp(join(tmpdir(), 'thaw-cli-reg-b-'));
    const store = await openLocalStore({ root: rootA });
    const pending = await store.beginCheckpoint('default/worker');
    await writeCheckpointFiles(pending.paths, 3 * MiB + 17);
    await pending.publish(manifestFields());
    // The registry access comes from the agent's configuration, as on a node.
    configDir = await mkdtemp(join(tmpdir(), 'thaw-cli-reg-etc-'));
    const access = join(configDir, 'registry.json');
    await writeFile(access, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
    config = join(configDir, 'agent.yaml');
    await writeFile(config, `registry:\n  config: ${access}\n`);
  });
  afterAll(async () => {
    await registry?.stop();
    for (const d of [rootA, rootB, configDir]) if (d) await rm(d, { recursive: true, force: true });
  });

  it('pushes from node A, pulls on node B (same bytes, digest-derived name), and a second pull transfers nothing', async () => {
    const ref = `${registry.host}/team/worker:v1`;
    const push = await thaw(['push', 'worker', ref, '--config', config, '--paths-store-root', rootA, '--json']);
    expect(push.code, push.stderr).toBe(0);
    const pushed = JSON.parse(push.stdout) as { reference: string; digest: string; bytesUploaded: number };
    expect(pushed.reference).toBe(`${ref}@${pushed.digest}`);
    expect(pushed.bytesUploaded).toBeGreaterThan(3 * MiB);

    const pull = await thaw(['pull', ref, '--config', config, '--paths-store-root', rootB]);
    expect(pull.code, pull.stderr).toBe(0);
    const name = `oci-${pushed.digest.slice('sha256:'.length)}`;
    expect(pull.stdout.split('\n')[0]).toBe(name);
    const a = await (await openLocalStore({ root: rootA })).open('default/worker');
    const b = await (await openLocalStore({ root: rootB })).open(name);
    for (const f of a.manifest.files) expect((await readFile(join(b.paths.dir, f.path))).equals(await readFile(join(a.paths.dir, f.path))), f.path).toBe(true);

    const again = await thaw(['pull', `${ref}@${pushed.digest}`, '--config', config, '--paths-store-root', rootB, '--json']);
    expect(again.code, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ name, alreadyPresent: true, bytesFetched: 0 });
  });

  it('exit codes: a bad reference is a usage error (2), an absent tag not found (4), an absent checkpoint not found (4)', async () => {
    const bad = await thaw(['pull', 'not a reference', '--config', config, '--paths-store-root', rootB]);
    expect(bad.code, bad.stderr).toBe(2);
    expect(bad.stderr).toMatch(/OCI_INVALID_REFERENCE/);
    const absentTag = await thaw(['pull', `${registry.host}/team/worker:nope`, '--config', config, '--paths-store-root', rootB]);
    expect(absentTag.code, absentTag.stderr).toBe(4);
    const absentCheckpoint = await thaw(['push', 'no-such', `${registry.host}/team/worker:v2`, '--config', config, '--paths-store-root', rootA]);
    expect(absentCheckpoint.code, absentCheckpoint.stderr).toBe(4);
    expect(absentCheckpoint.stderr).toMatch(/STORE_NOT_FOUND/);
  });

  it('--plain-http without a registry access file works too; --help documents both commands', async () => {
    const push = await thaw(['push', 'worker', `${registry.host}/team/worker:v3`, '--plain-http', '--paths-store-root', rootA]);
    expect(push.code, push.stderr).toBe(0);
    for (const cmd of ['push', 'pull']) {
      const help = await thaw([cmd, '--help']);
      expect(help.code).toBe(0);
      expect(help.stdout).toMatch(/--registry-config FILE/);
    }
  });

  it('push --with-weights: each weights source as a layer, found under --weights-dir; pulled into the weights cache of node B', async () => {
    const models = join(configDir, 'host-models/qwen');
    await mkdir(models, { recursive: true });
    const bytes = Buffer.alloc(2 * MiB + 3);
    for (let i = 0; i < bytes.length; i += 997) bytes[i] = i % 253;
    await writeFile(join(models, 'model-00001.safetensors'), bytes);
    const sha = createHash('sha256').update(bytes).digest('hex');
    const store = await openLocalStore({ root: rootA });
    const pending = await store.beginCheckpoint('default/with-weights');
    await writeCheckpointFiles(pending.paths, 64 * 1024);
    const source = { path: '/models/model-00001.safetensors', fileOffset: 0, length: bytes.length, fileSize: bytes.length, sha256: sha };
    await pending.publish(manifestFields({ weights: { schema: 'thaw.dev/weights-regions/v1', bytes: bytes.length, regions: [{ name: 'w', device: 0, va: '0x7f0000000000', size: 4 * MiB, granularity: 2 * MiB, allocations: [{ offset: 0, size: 4 * MiB, kind: 'file', source }] }] } }));
    const ref = `${registry.host}/team/worker:weights`;

    // Found nowhere (no --weights-dir, no weights.modelDirs): not found (4), nothing pushed.
    const nowhere = await thaw(['push', 'with-weights', ref, '--with-weights', '--config', config, '--paths-store-root', rootA]);
    expect(nowhere.code, nowhere.stderr).toBe(4);
    expect(nowhere.stderr).toMatch(/OCI_WEIGHTS_SOURCE_NOT_FOUND/);

    const push = await thaw(['push', 'with-weights', ref, '--with-weights', '--weights-dir', join(configDir, 'host-models'), '--config', config, '--paths-store-root', rootA, '--json']);
    expect(push.code, push.stderr).toBe(0);
    const pushed = JSON.parse(push.stdout) as { digest: string; weightsLayers: number; weightsBytes: number; bytesUploaded: number };
    expect([pushed.weightsLayers, pushed.weightsBytes]).toEqual([1, bytes.length]);
    expect(pushed.bytesUploaded).toBeGreaterThan(bytes.length);

    const pull = await thaw(['pull', ref, '--config', config, '--paths-store-root', rootB, '--json']);
    expect(pull.code, pull.stderr).toBe(0);
    expect(JSON.parse(pull.stdout)).toMatchObject({ weightsBytes: bytes.length });
    expect(await readdir(weightsCacheDir(rootB))).toEqual([sha]);
    expect((await readFile(join(weightsCacheDir(rootB), sha))).equals(bytes)).toBe(true);
    // The checkpoint itself holds its own files only.
    const b = await (await openLocalStore({ root: rootB })).open(`oci-${pushed.digest.slice('sha256:'.length)}`);
    expect((await readdir(b.paths.dir)).some((e) => e.includes('weights'))).toBe(false);
  });
});
