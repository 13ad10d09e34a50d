/**
 * The demo worker's OCI image: the host's `node` with exactly the shared libraries `ldd` lists (and the
 * dynamic loader at its path), the worker's JS under /app, and busybox for `sh` and debugging.
 *
 * Where the JS comes from: run from dist/ (`npm run demo`, the bench), this module copies the compiled
 * files beside it; run from source (vitest), it transpiles the worker's .ts files with TypeScript's
 * transpileModule. Either way only the import closure of the worker entry goes in (demo/worker/*, the
 * SDK modules it imports, src/errors), at the same relative paths, with a package.json saying ESM.
 *
 * The layer is reproducible (node-stack's buildOciArchive), so building twice with the same inputs
 * finds the archive in the image cache; the cost left is copying node and hashing the layer.
 */
import { copyFile, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NodeStack } from '../src/node-stack/containerd.js';
import { runCommand } from '../src/node-stack/exec.js';
import { buildBusyboxRootfs, importImageInto, tempRootfsDir, type ImageTarget } from '../src/node-stack/images.js';
import { DEMO_ERROR_CODES, DemoError } from './worker/errors.js';

export const DEMO_WORKER_IMAGE_REF = 'docker.io/thaw/demo-worker:1';
/** The worker entry inside the image, relative to /app (the same path as under dist/). */
export const WORKER_ENTRY_REL = 'demo/worker/worker.js';
export const WORKER_IMAGE_ENTRYPOINT = ['/usr/bin/node', `/app/${WORKER_ENTRY_REL}`];
export const WORKER_IMAGE_ENV = [
  'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  // libuv in Node 20 can use io_uring for fs ops; CRIU cannot dump an io_uring instance.
  'UV_USE_IO_URING=0',
];
export const LDD_TIMEOUT_MS = 10_000;

/** A stack, or any image target plus the busybox to put in the rootfs. */
export type WorkerImageTarget = NodeStack | (ImageTarget & { busyboxPath: string });

export interface BuildWorkerImageOptions {
  /** Default DEMO_WORKER_IMAGE_REF. */
  ref?: string;
  /** The node binary to ship as /usr/bin/node; default the one running this (process.execPath). */
  nodePath?: string;
  signal?: AbortSignal;
  /** ctr import deadline. */
  timeoutMs?: number;
}

export interface WorkerImage {
  ref: string;
  manifestDigest: string;
  /** The OCI archive was already in the image cache (same rootfs, same config). */
  cached: boolean;
  buildMs: number;
  /** The /app files, relative to /app. */
  appFiles: string[];
  /** The shared libraries and loader copied, at their paths in the rootfs. */
  libraries: string[];
}

function isNodeStack(t: WorkerImageTarget): t is NodeStack {
  return 'cri' in t && 'paths' in t;
}

/**
 * The shared objects `ldd` reports for `binary` (absolute paths as the loader resolves them, the
 * loader included, vdso excluded). A static binary has none. Throws DEMO_IMAGE_BUILD_FAILED when
 * one is "not found".
 */
export function parseLdd(text: string): string[] {
  const libs: string[] = [];
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (t === '' || t.startsWith('linux-vdso') || t.includes('statically linked')) continue;
    if (t.includes('=> not found')) {
      throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `a shared library is missing: ${t}`, { step: 'read ldd output', evidence: { line: t } });
    }
    const m = /=>\s*(\/\S+)/.exec(t) ?? /^(\/\S+)\s+\(0x/.exec(t);
    if (m?.[1]) libs.push(m[1]);
  }
  return libs;
}

async function sharedLibraries(binary: string, signal: AbortSignal | undefined): Promise<string[]> {
  const r = await runCommand('ldd', [binary], { step: `ldd ${binary}`, timeoutMs: LDD_TIMEOUT_MS, allowFailure: true, ...(signal ? { signal } : {}) });
  // ldd exits 1 with "not a dynamic executable" for a static binary: nothing to copy.
  if (r.exitCode !== 0 && /not a dynamic executable/.test(r.stdout + r.stderr)) return [];
  if (r.exitCode !== 0) {
    throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `ldd ${binary} exited ${r.exitCode}`, {
      step: 'list shared libraries', evidence: { stderr: r.stderr.slice(-2000) },
    });
  }
  return parseLdd(r.stdout);
}

/**
 * Module specifiers of the static imports and re-exports in JS or TS source: statements that begin a
 * line, so examples in doc comments (` * import ...`) do not count. Dynamic import() is not followed.
 */
export function relativeImports(source: string): string[] {
  const specs = new Set<string>();
  for (const re of [/^(?:import|export)\b[^'";]*?\bfrom\s*['"]([^'"]+)['"]/gm, /^import\s*['"]([^'"]+)['"]/gm]) {
    for (const m of source.matchAll(re)) if (m[1]) specs.add(m[1]);
  }
  const out: string[] = [];
  for (const s of specs) {
    if (s.startsWith('./') || s.startsWith('../')) out.push(s);
    else if (!s.startsWith('node:')) {
      // The image has no node_modules: the worker may use only node: builtins and its own modules.
      throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `the worker imports "${s}", which the image cannot hold`, {
        step: 'collect worker modules', evidence: { specifier: s },
      });
    }
  }
  return out;
}

/**
 * Writes the worker's import closure as JS into `appDir` at paths relative to the project root.
 * From dist/ it copies the compiled files; from source it transpiles the .ts files.
 */
export async function collectWorkerApp(appDir: string): Promise<string[]> {
  const self = fileURLToPath(import.meta.url);
  const compiled = self.endsWith('.js');
  // demo/worker-image.{ts,js} sits one level under the root (the repo, or dist/).
  const root = path.dirname(path.dirname(self));
  const transpile = compiled ? undefined : (await import('typescript')).default;
  const seen = new Set<string>();
  const queue = [WORKER_ENTRY_REL];
  while (queue.length > 0) {
    const rel = queue.shift() as string;
    if (seen.has(rel)) continue;
    seen.add(rel);
    const sourceRel = compiled ? rel : rel.replace(/\.js$/, '.ts');
    const source = await readFile(path.join(root, sourceRel), 'utf8').catch((cause: unknown) => {
      throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `cannot read ${sourceRel}${compiled ? ' (run npm run build)' : ''}`, {
        step: 'collect worker modules', cause, evidence: { root, file: sourceRel },
      });
    });
    const js = transpile
      ? transpile.transpileModule(source, {
        fileName: sourceRel,
        compilerOptions: { module: transpile.ModuleKind.ES2022, target: transpile.ScriptTarget.ES2022, verbatimModuleSyntax: false },
      }).outputText
      : source;
    const target = path.join(appDir, rel);
    await mkdir(path.dirname(target), { recursive: true, mode: 0o755 });
    await writeFile(target, js, { mode: 0o644 });
    // Transpiled output has type-only imports elided, so walking it follows only what runs.
    for (const spec of relativeImports(js)) {
      const next = path.posix.normalize(path.posix.join(path.posix.dirname(rel), spec));
      if (next.startsWith('../')) {
        throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `${rel} imports ${spec}, outside the project`, { step: 'collect worker modules' });
      }
      queue.push(next);
    }
  }
  await writeFile(path.join(appDir, 'package.json'), `${JSON.stringify({ name: 'thaw-demo-worker', private: true, type: 'module' })}\n`);
  return [...seen].sort();
}

/**
 * Builds the demo worker image and imports it into `target`'s containerd (namespace k8s.io).
 * Entrypoint `/usr/bin/node /app/demo/worker/worker.js`, env UV_USE_IO_URING=0, /tmp and /run present
 * (CRIU needs /run in a restore target's root). Throws DEMO_IMAGE_BUILD_FAILED or node-stack's
 * STACK_IMAGE_FAILED.
 */
export async function buildWorkerImage(target: WorkerImageTarget, options: BuildWorkerImageOptions = {}): Promise<WorkerImage> {
  const started = Date.now();
  const ref = options.ref ?? DEMO_WORKER_IMAGE_REF;
  const nodePath = options.nodePath ?? process.execPath;
  const imageTarget: ImageTarget = isNodeStack(target)
    ? { address: target.address, ctrPath: target.paths.ctr, tarPath: target.paths.tar, imageCacheDir: target.paths.imageCacheDir }
    : target;
  const busyboxPath = isNodeStack(target) ? target.paths.busybox : target.busyboxPath;
  const rootfs = await tempRootfsDir();
  try {
    await buildBusyboxRootfs(rootfs, busyboxPath);
    await copyFile(nodePath, path.join(rootfs, 'usr/bin/node'));
    const libraries = await sharedLibraries(nodePath, options.signal);
    for (const lib of libraries) {
      // copyFile follows symlinks: the file lands at the path the loader looks for (e.g. /lib64/ld-linux-x86-64.so.2).
      const dest = path.join(rootfs, lib);
      await mkdir(path.dirname(dest), { recursive: true, mode: 0o755 });
      await copyFile(lib, dest);
    }
    const appFiles = await collectWorkerApp(path.join(rootfs, 'app'));
    const imported = await importImageInto(imageTarget, {
      ref, rootfsDir: rootfs, entrypoint: WORKER_IMAGE_ENTRYPOINT, env: WORKER_IMAGE_ENV, workingDir: '/app',
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}),
    });
    return { ref, manifestDigest: imported.manifestDigest, cached: imported.cached, buildMs: Date.now() - started, appFiles, libraries };
  } finally {
    await rm(rootfs, { recursive: true, force: true });
  }
}
