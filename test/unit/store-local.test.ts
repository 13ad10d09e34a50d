import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { chmod, mkdir, readdir, readFile, rm, stat, symlink, truncate, unlink, writeFile } from 'node:fs/promises';
import { openSync, readSync, closeSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { openLocalStore, type LocalStore } from '../../src/store/local-store.js';
import { manifestFields, tempRoot, writeCheckpointFiles } from '../helpers/store-fixtures.js';
import { rejection } from '../helpers/rejection.js';
import { PREFETCH_RESIDENT_FRACTION } from '../../src/sys/prefetch.js';

const repo = resolve(fileURLToPath(import.meta.url), '../../..');


/** Root entries less the store's own stamp, last-use and restore-failure directories, kept beside its checkpoints. */
const withoutStamps = (entries: string[]): string[] => entries.filter((e) => e !== '.verified' && e !== '.used' && e !== '.restore-failed');

async function publishSample(store: LocalStore, name: string, options: { replace?: boolean; pagesBytes?: number } = {}) {
  const pending = await store.beginCheckpoint(name);
  await writeCheckpointFiles(pending.paths, options.pagesBytes);
  return pending.publish(manifestFields(), { replace: options.replace ?? false });
}

describe('local checkpoint store', () => {
  let root: string;
  let cleanup: () => Promise<void>;
  let store: LocalStore;
  const logger = createCollectingLogger();

  beforeEach(async () => {
    ({ root, cleanup } = await tempRoot());
    store = await openLocalStore({ root, logger });
  });
  afterEach(async () => cleanup());

  it('publishes, opens and verifies a checkpoint, with 0700 directories and 0600 root-owned files', async () => {
    const published = await publishSample(store, 'default/llm-7b');
    expect(published.paths.dir).toBe(join(root, 'default/llm-7b'));
    expect((await readdir(root)).filter((e) => e.startsWith('.tmp-'))).toEqual([]);

    const opened = await store.open('default/llm-7b');
    expect(opened.manifest).toEqual(published.manifest);
    expect(opened.manifest.files.map((f) => f.path)).toEqual([
      'criu/core-1.img',
      'criu/inventory.img',
      'criu/pages-1.img',
      'deleted-files.json',
      'rootfs-diff.tar',
    ]);
    expect(opened.manifest.totals).toEqual({ bytes: 3 * 1024 * 1024 + 17 + 9 + 4 + 16 + 3, fileCount: 5, liveBytes: 4096 });
    expect(opened.manifest.source.envKeys).toEqual(['HF_TOKEN', 'PATH']);
    const inventory = opened.manifest.files.find((f) => f.path === 'criu/inventory.img')!;
    expect(inventory.sha256).toBe(execFileSync('sha256sum', [join(root, 'default/llm-7b/criu/inventory.img')], { encoding: 'utf8' }).split(' ')[0]);

    for (const dir of ['default/llm-7b', 'default/llm-7b/criu']) {
      const st = await stat(join(root, dir));
      expect([dir, (st.mode & 0o7777).toString(8), st.uid]).toEqual([dir, '700', 0]);
    }
    for (const file of [...opened.manifest.files.map((f) => f.path), 'manifest.json']) {
      const st = await stat(join(root, 'default/llm-7b', file));
      expect([file, (st.mode & 0o7777).toString(8), st.uid]).toEqual([file, '600', 0]);
    }
    const result = await store.verify('default/llm-7b', { concurrency: 2 });
    expect(result).toMatchObject({ files: 5, bytes: opened.manifest.totals.bytes });
    expect(await store.sizeOf('default/llm-7b')).toBe(opened.manifest.totals.bytes + (await stat(opened.paths.manifest)).size);
    expect(await store.list()).toEqual([{ name: 'default/llm-7b', namespace: 'default', manifest: opened.manifest }]);
  });

  it('names the file, the expected and the actual digest when one byte changes', async () => {
    await publishSample(store, 'default/c1');
    const fd = openSync(join(root, 'default/c1/criu/pages-1.img'), 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, 5000);
    writeSync(fd, Buffer.from([b[0]! ^ 0xff]), 0, 1, 5000);
    closeSync(fd);
    const err = await rejection(store.verify('default/c1'));
    expect(err.code).toBe('STORE_DIGEST_MISMATCH');
    expect(err.message).toMatch(/^verify checkpoint default\/c1: criu\/pages-1\.img: expected sha256:[0-9a-f]{64} \(3145745 bytes\), found sha256:[0-9a-f]{64} \(3145745 bytes\)$/);
    expect(err.evidence['file']).toBe('criu/pages-1.img');
    expect(err.evidence['expected']).not.toBe(err.evidence['actual']);
  });

  it('verifies against the manifest object the caller checked: the same passes, a replaced checkpoint is STORE_MANIFEST_CHANGED', async () => {
    await publishSample(store, 'default/c3');
    const checked = (await store.open('default/c3')).manifest;
    expect((await store.verify('default/c3', { manifest: checked })).files).toBe(checked.files.length);
    await publishSample(store, 'default/c3', { replace: true });
    const err = await rejection(store.verify('default/c3', { manifest: checked }));
    expect(err.code).toBe('STORE_MANIFEST_CHANGED');
    expect(err.evidence['checkedId']).toBe(checked.id);
    expect(err.evidence['onDiskId']).not.toBe(checked.id);
  });

  it('hashes once per node: an unchanged checkpoint verifies from its stamp, a changed byte is hashed and caught', async () => {
    await publishSample(store, 'default/c2');
    expect((await store.verify('default/c2')).hashed, 'publish hashed every file already').toBe(false);
    expect((await store.verify('default/c2', { rehash: true })).hashed).toBe(true);
    expect((await store.verify('default/c2')).hashed).toBe(false);
    expect((await store.verify('default/c2', { rehash: true })).hashed).toBe(true);
    // A byte changed after the stamp: the file's ctime moved, so verify hashes again and finds it.
    const fd = openSync(join(root, 'default/c2/criu/pages-1.img'), 'r+');
    writeSync(fd, Buffer.from([0x5a]), 0, 1, 100);
    closeSync(fd);
    expect((await rejection(store.verify('default/c2'))).code).toBe('STORE_DIGEST_MISMATCH');
    expect((await rejection(store.verify('default/c2'))).code, 'a failed verify leaves no stamp behind').toBe('STORE_DIGEST_MISMATCH');
    // A replaced checkpoint has a new manifest id: its stamp does not carry over.
    await publishSample(store, 'default/c2', { replace: true });
    await rm(join(root, '.verified', 'default+c2.json'));
    expect((await store.verify('default/c2')).hashed, 'no stamp: hashed').toBe(true);
    const stampMode = (await stat(join(root, '.verified', 'default+c2.json'))).mode & 0o777;
    expect(stampMode.toString(8)).toBe('600');
  });

  it('refuses a truncated file, an extra file, a missing file and a missing manifest with their own codes', async () => {
    await publishSample(store, 'default/c1');
    await truncate(join(root, 'default/c1/criu/pages-1.img'), 100);
    let err = await rejection(store.open('default/c1'));
    expect([err.code, err.message]).toEqual([
      'STORE_DIGEST_MISMATCH',
      'open checkpoint default/c1: criu/pages-1.img is 100 bytes, the manifest says 3145745 (truncated or rewritten)',
    ]);

    await publishSample(store, 'default/c2');
    await writeFile(join(root, 'default/c2/criu/extra.img'), 'x', { mode: 0o600 });
    err = await rejection(store.verify('default/c2'));
    expect([err.code, err.message]).toEqual(['STORE_FILE_UNEXPECTED', 'open checkpoint default/c2: criu/extra.img is in checkpoint default/c2 but not in its manifest']);

    await publishSample(store, 'default/c3');
    await unlink(join(root, 'default/c3/rootfs-diff.tar'));
    err = await rejection(store.open('default/c3'));
    expect([err.code, err.message]).toEqual(['STORE_FILE_MISSING', 'open checkpoint default/c3: rootfs-diff.tar is listed in the manifest but missing from checkpoint default/c3']);

    await publishSample(store, 'default/c4');
    await unlink(join(root, 'default/c4/manifest.json'));
    err = await rejection(store.open('default/c4'));
    expect([err.code, err.message]).toEqual(['STORE_MANIFEST_INVALID', 'open checkpoint default/c4: checkpoint default/c4 has no manifest.json (an unfinished or foreign directory)']);

    const listed = await store.list();
    expect(listed.map((l) => [l.name, l.problem?.code])).toEqual([
      ['default/c1', 'STORE_DIGEST_MISMATCH'],
      ['default/c2', 'STORE_FILE_UNEXPECTED'],
      ['default/c3', 'STORE_FILE_MISSING'],
      ['default/c4', 'STORE_MANIFEST_INVALID'],
    ]);
  });

  it('refuses a foreign manifest, one of another schema, and one that names another checkpoint', async () => {
    await publishSample(store, 'default/c1');
    const path = join(root, 'default/c1/manifest.json');
    const original = await readFile(path, 'utf8');
    await writeFile(path, '{"apiVersion":"v1","kind":"Pod"}');
    let err = await rejection(store.open('default/c1'));
    expect([err.code, err.message]).toEqual([
      'STORE_MANIFEST_INVALID',
      'parse checkpoint manifest: not a thaw checkpoint manifest: manifest.kind is "Pod" (expected "thaw.checkpoint")',
    ]);
    await writeFile(path, original.replace('"schemaVersion": 1', '"schemaVersion": 7'));
    err = await rejection(store.open('default/c1'));
    expect(err.message).toBe('parse checkpoint manifest: manifest.schemaVersion 7 is not supported (this thaw reads schemas 1 and 2)');
    await writeFile(path, original.replace('"name": "c1"', '"name": "c9"'));
    err = await rejection(store.open('default/c1'));
    expect(err.message).toBe('open checkpoint default/c1: manifest.name is "c9" but the directory is "c1"');
  });

  it.each([['../x'], ['/abs'], ['a\0b'], ['..'], [''], ['A'], ['x'.repeat(129)]])('refuses the name %j everywhere', async (name) => {
    for (const call of [
      () => store.beginCheckpoint(name),
      () => store.open(name),
      () => store.verify(name),
      () => store.delete(name),
      () => store.acquireLease(name),
      () => store.prefetch(name),
    ]) {
      const err = await rejection(call());
      expect(err.code).toBe('STORE_INVALID_NAME');
    }
    expect(await readdir(root)).toEqual([]);
  });

  it('names the reason for an invalid name', async () => {
    expect((await rejection(store.open('../x'))).message).toMatch(/^open checkpoint: namespace "\.\." is not a Kubernetes namespace name/);
    expect((await rejection(store.open('default/a/b'))).message).toBe(`open checkpoint: checkpoint name "a/b" contains '/' (names cannot be paths)`);
    expect((await rejection(store.open('llm'))).message, 'a bare name is no store key').toBe('open checkpoint: checkpoint "llm" names no namespace (the store names checkpoints namespace/name)');
    expect((await rejection(store.open('default/oci-x'))).message).toMatch(/reserved for checkpoints pulled from a registry/);
    expect((await rejection(store.open('..'))).message).toMatch(/checkpoint name "\.\." contains '\.\.'/);
    expect((await rejection(store.open('a\0b'))).message).toMatch(/contains a NUL byte/);
  });

  it('refuses loose permissions and foreign owners', async () => {
    await publishSample(store, 'default/c1');
    await chmod(join(root, 'default/c1/criu/pages-1.img'), 0o644);
    let err = await rejection(store.open('default/c1'));
    expect([err.code, err.message]).toEqual([
      'STORE_INSECURE_PERMISSIONS',
      `open checkpoint default/c1: ${root}/default/c1/criu/pages-1.img is mode 0644 owned by uid 0 (must be 0600 owned by uid 0)`,
    ]);
    await chmod(join(root, 'default/c1/criu/pages-1.img'), 0o600);
    await chmod(join(root, 'default/c1'), 0o755);
    err = await rejection(store.open('default/c1'));
    expect(err.code).toBe('STORE_INSECURE_PERMISSIONS');
    await chmod(join(root, 'default/c1'), 0o700);
    execFileSync('chown', ['65534', join(root, 'default/c1/rootfs-diff.tar')]);
    err = await rejection(store.open('default/c1'));
    expect(err.message).toMatch(/rootfs-diff\.tar is mode 0600 owned by uid 65534/);
  });

  it('refuses symlinks planted in a checkpoint, at publish and at open', async () => {
    const outside = join(root, '..', `thaw-outside-${process.pid}`);
    await writeFile(outside, 'secret');
    await chmod(outside, 0o644);
    try {
      const pending = await store.beginCheckpoint('default/c1');
      await writeCheckpointFiles(pending.paths);
      await symlink(outside, join(pending.paths.criuDir, 'link.img'));
      const err = await rejection(pending.publish(manifestFields()));
      expect([err.code, err.message]).toEqual([
        'STORE_PATH_ESCAPE',
        'publish checkpoint: criu/link.img is a symlink (a checkpoint holds only files and directories)',
      ]);
      expect((await stat(outside)).mode & 0o777).toBe(0o644); // publish chmodded nothing outside the store
      await unlink(join(pending.paths.criuDir, 'link.img'));
      await pending.publish(manifestFields());

      await unlink(join(root, 'default/c1/rootfs-diff.tar'));
      await symlink(outside, join(root, 'default/c1/rootfs-diff.tar'));
      expect((await rejection(store.verify('default/c1'))).code).toBe('STORE_PATH_ESCAPE');
      expect((await rejection(store.prefetch('default/c1'))).code).toBe('STORE_PATH_ESCAPE');
    } finally {
      await unlink(outside);
    }
  });

  it('marks a checkpoint failed for its manifest: read back, listed, cleared; a replacement or delete drops it', async () => {
    const first = await publishSample(store, 'default/c1');
    expect(await store.restoreFailure('default/c1', first.manifest)).toBeUndefined();
    const failure = { cause: 'RESTORE_CRIU', reason: 'criu said no', containerId: 'abc', pod: 'ns/p' };
    const recorded = await store.recordRestoreFailure(first, failure);
    expect(recorded).toMatchObject({ ...failure, name: 'default/c1', manifestId: first.manifest.id });
    expect(recorded.manifestDigest).toMatch(/^[0-9a-f]{64}$/);
    const file = join(root, '.restore-failed', 'default+c1.json');
    expect(((await stat(file)).mode & 0o777).toString(8)).toBe('600');
    expect(((await stat(join(root, '.restore-failed'))).mode & 0o777).toString(8)).toBe('700');
    expect(await store.restoreFailure('default/c1', first.manifest)).toEqual(recorded);
    expect((await store.list())[0]?.restoreFailure).toEqual(recorded);
    // A manifest that differs in anything (here: one file's digest) is another checkpoint: the mark does not hold.
    const edited = { ...first.manifest, files: first.manifest.files.map((f, i) => (i === 0 ? { ...f, sha256: '0'.repeat(64) } : f)) };
    expect(await store.restoreFailure('default/c1', edited)).toBeUndefined();
    expect(await readdir(join(root, '.restore-failed'))).toEqual([]);
    // Cleared by the operator.
    await store.recordRestoreFailure(first, failure);
    expect(await store.clearRestoreFailure('default/c1')).toBe(true);
    expect(await store.clearRestoreFailure('default/c1')).toBe(false);
    expect(await store.restoreFailure('default/c1', first.manifest)).toBeUndefined();
    // Replaced under the same name: publish removes the mark.
    await store.recordRestoreFailure(first, failure);
    const second = await publishSample(store, 'default/c1', { replace: true });
    expect(second.manifest.id).not.toBe(first.manifest.id);
    expect(await readdir(join(root, '.restore-failed'))).toEqual([]);
    // Written again with the old manifest (a race with the replace): the new manifest does not see it.
    await store.recordRestoreFailure(first, failure);
    expect(await store.restoreFailure('default/c1', second.manifest)).toBeUndefined();
    // Deleted: the mark goes with it.
    await store.recordRestoreFailure(second, failure);
    await store.delete('default/c1');
    expect(await readdir(join(root, '.restore-failed'))).toEqual([]);
    // A record that does not parse is no mark; names follow the name rule.
    const third = await publishSample(store, 'default/c1');
    await writeFile(file, '{not json');
    expect(await store.restoreFailure('default/c1', third.manifest)).toBeUndefined();
    expect((await rejection(store.clearRestoreFailure('../x'))).code).toBe('STORE_INVALID_NAME');
    expect((await rejection(store.clearRestoreFailure('c1'))).code, 'a bare name is no store key').toBe('STORE_INVALID_NAME');
    // The marks directory is the store's own: never listed as a namespace.
    await store.recordRestoreFailure(third, failure);
    expect((await store.list()).map((l) => l.name)).toEqual(['default/c1']);
  });

  it('keeps a name taken unless replace is asked, and abort leaves nothing', async () => {
    await publishSample(store, 'default/c1');
    const pending = await store.beginCheckpoint('default/c1');
    await writeCheckpointFiles(pending.paths);
    const err = await rejection(pending.publish(manifestFields()));
    expect([err.code, err.message]).toEqual(['STORE_EXISTS', 'publish checkpoint: checkpoint default/c1 exists (publish with replace: true to replace it)']);
    // Publish left the pending directory as it was: it can be retried or aborted.
    expect(await readdir(pending.dir)).not.toContain('manifest.json');
    await pending.abort();
    await pending.abort();
    expect(withoutStamps(await readdir(root))).toEqual(['default']);
    expect(await readdir(join(root, 'default'))).toEqual(['c1']);
    expect((await rejection(pending.publish(manifestFields()))).code).toBe('STORE_BAD_STATE');
  });

  it('also refuses to publish over an empty directory of that name', async () => {
    await mkdir(join(root, 'default/c1'), { mode: 0o700, recursive: true });
    const pending = await store.beginCheckpoint('default/c1');
    await writeCheckpointFiles(pending.paths);
    expect((await rejection(pending.publish(manifestFields()))).code).toBe('STORE_EXISTS');
    await pending.abort();
  });

  it('replaces atomically: a reader in another process always finds a manifest', async () => {
    const first = await publishSample(store, 'default/c1');
    // A tight loop in another process, reading <root>/c1/manifest.json while we replace it 30 times.
    const reader = spawn(process.execPath, [
      '-e',
      `const fs = require('fs'); const p = process.argv[1]; const ids = new Set(); let misses = 0, reads = 0;
       process.on('SIGTERM', () => { process.stdout.write(JSON.stringify({ misses, reads, ids: ids.size })); process.exit(0); });
       process.stdout.write('ready\\n');
       (function loop() { for (let i = 0; i < 200; i++) { try { ids.add(JSON.parse(fs.readFileSync(p, 'utf8')).id); reads++; } catch { misses++; } } setImmediate(loop); })();`,
      join(root, 'default/c1/manifest.json'),
    ]);
    let out = '';
    reader.stdout.on('data', (d: Buffer) => (out += d.toString()));
    await new Promise<void>((res) => reader.stdout.once('data', () => res()));
    let last = first;
    for (let i = 0; i < 30; i++) last = await publishSample(store, 'default/c1', { replace: true, pagesBytes: 4096 });
    const exited = new Promise((res) => reader.once('exit', res));
    reader.kill('SIGTERM');
    await exited;
    const stats = JSON.parse(out.slice(out.indexOf('{'))) as { misses: number; reads: number; ids: number };
    expect(stats.misses).toBe(0);
    expect(stats.reads).toBeGreaterThan(100);
    expect(stats.ids).toBeGreaterThan(1);
    expect((await store.open('default/c1')).manifest.id).toBe(last.manifest.id);
    expect(withoutStamps(await readdir(root)).sort()).toEqual(['default']);
    expect(await readdir(join(root, 'default'))).toEqual(['c1']);
    await store.verify('default/c1');
  });

  it('refuses delete and replace while a lease is held, in this process and from another one', async () => {
    await publishSample(store, 'default/c1');
    const release1 = await store.acquireLease('default/c1');
    const release2 = await store.acquireLease('default/c1');
    expect((await rejection(store.delete('default/c1'))).code).toBe('STORE_IN_USE');
    const pending = await store.beginCheckpoint('default/c1');
    await writeCheckpointFiles(pending.paths);
    expect((await rejection(pending.publish(manifestFields(), { replace: true }))).code).toBe('STORE_IN_USE');
    await pending.abort();
    // A second store instance sees the lease through the lease file (another process would too: see below).
    const other = await openLocalStore({ root });
    const err = await rejection(other.delete('default/c1'));
    expect([err.code, err.message]).toEqual(['STORE_IN_USE', 'delete checkpoint default/c1: checkpoint default/c1 is in use by a restore']);
    await release1();
    await release1();
    expect(await store.isLeased('default/c1')).toBe(true);
    await release2();
    expect(await store.isLeased('default/c1')).toBe(false);
    expect(await readdir(join(root, '.leases'))).toEqual([]);
    await store.delete('default/c1');
    expect(withoutStamps(await readdir(root)).sort(), 'an emptied namespace directory stays').toEqual(['.leases', 'default']);
    expect(await readdir(join(root, 'default'))).toEqual([]);
    expect((await rejection(store.open('default/c1'))).code).toBe('STORE_NOT_FOUND');
    expect((await rejection(store.acquireLease('default/c1'))).code).toBe('STORE_NOT_FOUND');
  });

  it('brings every byte into the page cache, reads only what is not cached, and stops when aborted', async () => {
    const published = await publishSample(store, 'default/c1', { pagesBytes: 8 * 1024 * 1024 });
    const pages = join(root, 'default/c1/criu/pages-1.img');
    // Evict this one file (fadvise DONTNEED through dd), then count its cached pages with fincore. The file was
    // just written: its dirty pages stay cached through DONTNEED, so it is written back first (sync FILE).
    const evict = (): void => {
      execFileSync('sync', [pages]);
      execFileSync('dd', [`if=${pages}`, 'iflag=nocache', 'count=0', 'status=none']);
    };
    evict();
    const cachedBytes = (): number => Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', pages], { encoding: 'utf8' }).trim());
    expect(cachedBytes(), 'evicted below what prefetch leaves alone').toBeLessThan(8 * 1024 * 1024 * PREFETCH_RESIDENT_FRACTION);
    const first = await store.prefetch('default/c1', { concurrency: 2 });
    expect(first.bytes).toBe(published.manifest.totals.bytes);
    expect(first.bytesRead, 'the evicted file was read').toBeGreaterThanOrEqual(8 * 1024 * 1024);
    expect(cachedBytes(), 'the whole file is in the page cache').toBeGreaterThanOrEqual(8 * 1024 * 1024);
    const second = await store.prefetch('default/c1', { concurrency: 2 });
    expect(second.bytesRead, 'nothing is read twice once cached').toBe(0);
    // A large file is read as segments by several readers (3 MiB segments: the last one short): every byte once.
    evict();
    const segmented = await store.prefetch('default/c1', { concurrency: 3, segmentBytes: 3 * 1024 * 1024 });
    expect(segmented.bytesRead).toBe(8 * 1024 * 1024);
    expect(cachedBytes(), 'the whole file is in the page cache').toBeGreaterThanOrEqual(8 * 1024 * 1024);
    // A gate holds every read back until it opens (a restore reading its worker's file pages first).
    evict();
    let open: () => void = () => undefined;
    const opened = new Promise<void>((resolve) => (open = resolve));
    let gateCalls = 0;
    let settled = false;
    const gated = store.prefetch('default/c1', { concurrency: 2, gate: () => ((gateCalls += 1), opened) });
    void gated.finally(() => (settled = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(settled, 'the prefetch waits while the gate is shut').toBe(false);
    open();
    expect((await gated).bytesRead).toBe(8 * 1024 * 1024);
    expect(gateCalls, 'asked before each read').toBeGreaterThanOrEqual(1);
    const controller = new AbortController();
    controller.abort(new Error('pod deleted'));
    expect((await rejection(store.prefetch('default/c1', { signal: controller.signal }))).code).toBe('STORE_ABORTED');
    expect((await rejection(store.verify('default/c1', { signal: controller.signal }))).code).toBe('STORE_ABORTED');
  });

  it('writes a manifest only through the store and validates the fields it is given', async () => {
    const pending = await store.beginCheckpoint('default/c1');
    await writeCheckpointFiles(pending.paths);
    const bad = manifestFields();
    bad.source.envKeys = ['HF_TOKEN=secret'];
    const err = await rejection(pending.publish(bad));
    expect(err.code).toBe('STORE_MANIFEST_INVALID');
    expect(await readdir(pending.dir)).not.toContain('manifest.json');
    await pending.abort();
  });
});

describe('crash safety', () => {
  let root: string;
  let cleanup: () => Promise<void>;
  let outDir: string;

  // The child is a real Node process running the compiled store, so that a SIGKILL interrupts publish() for real.
  beforeAll(async () => {
    outDir = join(repo, 'node_modules/.cache', `thaw-store-test-${process.pid}`);
    execFileSync(
      process.execPath,
      [join(repo, 'node_modules/typescript/bin/tsc'), '--outDir', outDir, '--rootDir', join(repo, 'src'), '--module', 'nodenext', '--moduleResolution', 'nodenext',
        '--target', 'es2022', '--types', 'node', '--skipLibCheck', '--strict', join(repo, 'src/store/local-store.ts')],
      { stdio: 'inherit' },
    );
    await writeFile(join(outDir, 'package.json'), '{"type":"module"}');
    await writeFile(
      join(outDir, 'crash-child.js'),
      `import { writeFileSync } from 'node:fs';
       import { join } from 'node:path';
       import { openLocalStore } from './store/local-store.js';
       const [root, mode, fields] = process.argv.slice(2);
       const store = await openLocalStore({ root });
       const pending = await store.beginCheckpoint('default/crashy');
       writeFileSync(join(pending.paths.criuDir, 'pages-1.img'), Buffer.alloc(128 * 1024 * 1024, 7));
       writeFileSync(pending.paths.rootfsDiff, 'tar');
       if (mode === 'wait') { process.stdout.write('ready\\n'); setInterval(() => {}, 1000); }
       else { process.stdout.write('publishing\\n'); await pending.publish(JSON.parse(fields)); process.stdout.write('published\\n'); }`,
    );
  }, 120_000);
  afterAll(async () => {
    execFileSync('rm', ['-rf', outDir]);
  });
  beforeEach(async () => ({ root, cleanup } = await tempRoot()));
  afterEach(async () => cleanup());

  function startChild(mode: 'wait' | 'publish'): { child: ChildProcess; lines: AsyncIterator<string> } {
    const child = spawn(process.execPath, [join(outDir, 'crash-child.js'), root, mode, JSON.stringify(manifestFields())], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    return { child, lines: createInterface({ input: child.stdout! })[Symbol.asyncIterator]() };
  }

  it('a writer killed mid-publish leaves no checkpoint, and recover() removes its directory', async () => {
    const { child, lines } = startChild('publish');
    expect((await lines.next()).value).toBe('publishing');
    const exited = new Promise((res) => child.once('exit', res));
    child.kill('SIGKILL');
    await exited;
    const left = await readdir(root);
    expect(left.filter((e) => !e.startsWith('.tmp-'))).toEqual([]);
    expect(left.filter((e) => e.startsWith('.tmp-default+crashy-'))).toHaveLength(1);

    const logger = createCollectingLogger();
    const store = await openLocalStore({ root, logger });
    expect(await readdir(root)).toEqual([]);
    expect(logger.lines).toEqual([
      expect.objectContaining({ level: 'info', msg: 'removed an unfinished checkpoint directory', fields: expect.objectContaining({ writerPid: child.pid }) }),
    ]);
    expect((await rejection(store.open('default/crashy'))).code).toBe('STORE_NOT_FOUND');
  });

  it("recover() leaves a live writer's directory alone", async () => {
    const { child, lines } = startChild('wait');
    try {
      expect((await lines.next()).value).toBe('ready');
      await openLocalStore({ root });
      expect((await readdir(root)).filter((e) => e.startsWith('.tmp-default+crashy-'))).toHaveLength(1);
    } finally {
      const exited = new Promise((res) => child.once('exit', res));
      child.kill('SIGKILL');
      await exited;
    }
    const store = await openLocalStore({ root });
    expect(await readdir(root)).toEqual([]);
    expect(await store.recover()).toEqual([]);
  });

  it('keeps a live writer of this process, and removes one of an earlier process that had the same pid', async () => {
    const first = await openLocalStore({ root });
    const pending = await first.beginCheckpoint('default/live');
    await writeCheckpointFiles(pending.paths);
    // An agent restarted as pid 1 of its container reuses its pid; its start time tells it apart.
    const stale = join(root, `.tmp-old-${process.pid}-1-${'0'.repeat(16)}`);
    await mkdir(stale, { mode: 0o700 });
    await mkdir(join(root, '.leases'), { mode: 0o700 });
    await writeFile(join(root, `.leases/old@${process.pid}-1-abcdef01`), '{}');
    const logger = createCollectingLogger();
    await openLocalStore({ root, logger });
    expect((await readdir(root)).sort()).toEqual(['.leases', pending.dir.slice(root.length + 1)]);
    expect(await readdir(join(root, '.leases'))).toEqual([]);
    expect(logger.lines.map((l) => l.msg)).toEqual(['removed an unfinished checkpoint directory', 'removed a stale checkpoint lease']);
    await pending.publish(manifestFields());
    await first.verify('default/live');
  });

  it('sees a lease held by another process', async () => {
    const store = await openLocalStore({ root });
    await publishSample(store, 'default/c1');
    const child = spawn(process.execPath, ['--input-type=module', '-e',
      `import { openLocalStore } from ${JSON.stringify(join(outDir, 'store/local-store.js'))};
       const s = await openLocalStore({ root: process.argv[1] }); await s.acquireLease('default/c1');
       process.stdout.write('leased\\n'); setInterval(() => {}, 1000);`, root], { stdio: ['ignore', 'pipe', 'inherit'] });
    const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
    try {
      expect((await lines.next()).value).toBe('leased');
      expect((await rejection(store.delete('default/c1'))).code).toBe('STORE_IN_USE');
    } finally {
      const exited = new Promise((res) => child.once('exit', res));
      child.kill('SIGKILL');
      await exited;
    }
    // The holder died without releasing: its lease no longer counts.
    await store.delete('default/c1');
  });
});
