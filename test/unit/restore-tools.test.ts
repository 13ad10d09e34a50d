/**
 * What a restore reads besides its checkpoint (src/agent/restore-tools.ts), and readIntoPageCache bringing
 * files into the page cache (checked with mincore through the store's PageCache).
 */
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { executableFiles, moduleGraph, parseLoaderList, relativeImports, restoreToolFiles } from '../../src/agent/restore-tools.js';
import { bindPageCache, readIntoPageCache } from '../../src/sys/page-cache.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'thaw-tools-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('restore tools', () => {
  it('parses the loader\'s --list output (the same lines as ldd)', () => {
    const text = [
      '\tlinux-vdso.so.1 (0x00007ffd4a7e6000)',
      '\tlibmount.so.1 => /lib/x86_64-linux-gnu/libmount.so.1 (0x00007f1c0e1c0000)',
      '\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1c0dfc0000)',
      '\t/lib64/ld-linux-x86-64.so.2 (0x00007f1c0e240000)',
      '\tlibmissing.so.9 => not found',
      '',
    ].join('\n');
    expect(parseLoaderList(text)).toEqual(['/lib/x86_64-linux-gnu/libmount.so.1', '/lib/x86_64-linux-gnu/libc.so.6', '/lib64/ld-linux-x86-64.so.2']);
  });

  it('follows an ES module graph through relative imports, static and dynamic, once each', async () => {
    const src = join(dir, 'dist', 'src');
    await mkdir(join(src, 'oci-hooks'), { recursive: true });
    await mkdir(join(src, 'store'), { recursive: true });
    await writeFile(join(src, 'oci-hooks', 'main.js'), "import { a } from './a.js';\nimport { parseArgs } from 'node:util';\nimport koffi from 'koffi';\n");
    await writeFile(join(src, 'oci-hooks', 'a.js'), "export { m } from '../store/m.js';\nexport const a = 1;\nconst lazy = () => import('../store/lazy.js');\n");
    await writeFile(join(src, 'store', 'm.js'), "import { a } from '../oci-hooks/a.js';\nexport const m = a;\n");
    await writeFile(join(src, 'store', 'lazy.js'), "import './side-effect.js';\n");
    await writeFile(join(src, 'store', 'unrelated.js'), 'export const x = 1;\n');
    expect(relativeImports("import './side-effect.js';\nexport * from \"../x.js\";")).toEqual(['../x.js', './side-effect.js']);
    const graph = await moduleGraph(join(src, 'oci-hooks', 'main.js'));
    // side-effect.js does not exist: nothing to read, no error.
    expect(graph.map((f) => f.slice(src.length + 1)).sort()).toEqual(['oci-hooks/a.js', 'oci-hooks/main.js', 'store/lazy.js', 'store/m.js']);
  });

  it('lists an executable with its loader and libraries as the loader resolves them', async () => {
    const files = await executableFiles('/usr/bin/mount');
    expect(files[0]).toBe('/usr/bin/mount');
    expect(files.some((f) => /\/ld-linux-x86-64\.so\.2$/.test(f))).toBe(true);
    expect(files.some((f) => /\/libmount\.so\.1$/.test(f))).toBe(true);
    // A static binary or a script is just itself.
    const script = join(dir, 'script.sh');
    await writeFile(script, '#!/bin/sh\ntrue\n', { mode: 0o755 });
    expect(await executableFiles(script)).toEqual([script]);
  });

  it('restoreToolFiles: the hook\'s modules, thaw-pause, the executables; each file once', async () => {
    const pause = join(dir, 'thaw-pause');
    await writeFile(pause, 'not really');
    const files = await restoreToolFiles({
      hookArgv: ['/usr/bin/node', join(dir, 'dist', 'src', 'oci-hooks', 'main.js')],
      thawPausePath: pause,
      executables: ['/usr/bin/mount', '/usr/bin/umount', join(dir, 'no-such-tool')],
    });
    expect(new Set(files).size).toBe(files.length);
    expect(files).toContain(pause);
    expect(files).toContain(join(dir, 'dist', 'src', 'store', 'm.js'));
    expect(files).toContain('/usr/bin/umount');
    // Real paths: libmount.so.1 is a link to its versioned file, listed once for mount and umount.
    expect(files.filter((f) => /\/libmount\.so\.1[.0-9]*$/.test(f))).toHaveLength(1);
    expect(files.some((f) => f.includes('no-such-tool'))).toBe(false);
  });
});

describe('readIntoPageCache', () => {
  it('reads what is not cached, skips what is, reports what it cannot read', async () => {
    const pageCache = bindPageCache();
    const file = join(dir, 'blob.bin');
    const size = 8 * 1024 * 1024 + 123;
    await writeFile(file, randomFillSync(Buffer.allocUnsafe(size)));
    const fh = await open(file, 'r');
    try {
      await fh.sync();
      // GNU dd's documented way to drop one file's pages from the cache.
      execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
      expect(pageCache.residentBytes(fh.fd, size)).toBeLessThan(size);
      const first = await readIntoPageCache([file, join(dir, 'missing'), dir], pageCache);
      expect(first).toMatchObject({ files: 1, bytes: size });
      expect(first.bytesRead).toBeGreaterThan(0);
      expect(first.skipped.map((s) => [s.path, s.reason])).toEqual([
        [join(dir, 'missing'), 'ENOENT'],
        [dir, 'not a regular file'],
      ]);
      expect(pageCache.residentBytes(fh.fd, size)).toBe(size);
      const second = await readIntoPageCache([file], pageCache);
      expect(second).toMatchObject({ files: 1, bytes: size, bytesRead: 0 });
      const aborted = new AbortController();
      aborted.abort();
      expect(await readIntoPageCache([file], pageCache, { signal: aborted.signal })).toMatchObject({ files: 0, bytesRead: 0 });
    } finally {
      await fh.close();
    }
  });
});
