/**
 * The demo worker's OCI image: the host's `node` with exactly the shared libraries `ldd` lists (and the
 * dynamic loader at its path), the worker's JS under /app, and busybox for `sh` and debugging.
 *
 * Where the JS comes from: run from dist/ (`npm run demo`, the bench), this module copies the compiled
 * files beside it; run from source (vitest), it transpiles the worker's .ts files with TypeScript's
 * transpileModule. Either way only the import closure of the worker entry goes in (demo/worker/*, the
 * SDK modules it imports, src/errors), at the same relative paths, with a package.json saying ESM.
 *
 * Caching, two levels. A key over the inputs (node, its libraries and busybox by file identity, the
 * worker modules by content, the image config) is recorded in the image cache dir; when containerd
 * already holds that image under the ref, nothing is built or imported (`reused`). Otherwise the layer
 * is reproducible (node-stack's buildOciArchive), so the same rootfs finds its archive in the image
 * cache (`cached`) and only the tar, hash and `ctr import` are paid again.
 */
import { createHash } from 'node:crypto';
import { copyFile, mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NodeStack } from '../src/node-stack/index.js';
import { runCommand } from '../src/node-stack/index.js';
import { buildBusyboxRootfs, importImageInto, tempRootfsDir, type ImageTarget } from '../src/node-stack/index.js';
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
export const CTR_LS_TIMEOUT_MS = 10_000;

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
  /** More `KEY=VALUE` entries for the image config's env: another image (another digest) of the same worker. */
  extraEnv?: string[];
}

export interface WorkerImage {
  ref: string;
  manifestDigest: string;
  /** The OCI archive was already in the image cache (same rootfs, same config). */
  cached: boolean;
  /** Nothing was built or imported: the same inputs were built before and containerd has that image. */
  reused: boolean;
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
  for (const re of [/^(?:import|export)\b(?!\s+type\b)[^'";]*?\bfrom\s*['"]([^'"]+)['"]/gm, /^import\s*['"]([^'"]+)['"]/gm]) {
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

/** A module of the worker's import closure, as read from the project (TS source, or JS under dist/). */
export interface WorkerModule {
  /** Path of the JS file relative to the project root (and to /app). */
  rel: string;
  source: string;
  /** The source is TypeScript and must be transpiled. */
  typescript: boolean;
}

/**
 * Reads the import closure of the worker entry. From dist/ that is the compiled JS; from source the .ts
 * files (type-only `import type` lines are not followed; an inline `{ type X }` import pulls in a module
 * that only costs a few bytes).
 */
export async function workerModules(): Promise<WorkerModule[]> {
  const self = fileURLToPath(import.meta.url);
  const typescript = !self.endsWith('.js');
  // demo/worker-image.{ts,js} sits one level under the root (the repo, or dist/).
  const root = path.dirname(path.dirname(self));
  const modules: WorkerModule[] = [];
  const seen = new Set<string>();
  const queue = [WORKER_ENTRY_REL];
  while (queue.length > 0) {
    const rel = queue.shift() as string;
    if (seen.has(rel)) continue;
    seen.add(rel);
    const sourceRel = typescript ? rel.replace(/\.js$/, '.ts') : rel;
    const source = await readFile(path.join(root, sourceRel), 'utf8').catch((cause: unknown) => {
      throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `cannot read ${sourceRel}${typescript ? '' : ' (run npm run build)'}`, {
        step: 'collect worker modules', cause, evidence: { root, file: sourceRel },
      });
    });
    modules.push({ rel, source, typescript });
    for (const spec of relativeImports(source)) {
      const next = path.posix.normalize(path.posix.join(path.posix.dirname(rel), spec));
      if (next.startsWith('../')) {
        throw new DemoError(DEMO_ERROR_CODES.IMAGE_BUILD_FAILED, `${rel} imports ${spec}, outside the project`, { step: 'collect worker modules' });
      }
      queue.push(next);
    }
  }
  return modules.sort((a, b) => a.rel.localeCompare(b.rel));
}

/** Writes the modules as JS under `appDir` (transpiling TypeScript), plus a package.json saying ESM. */
export async function writeWorkerApp(appDir: string, modules: readonly WorkerModule[]): Promise<void> {
  // Loaded only when needed: from dist/ nothing is transpiled, and typescript takes seconds to load.
  const ts = modules.some((m) => m.typescript) ? (await import('typescript')).default : undefined;
  for (const m of modules) {
    const js = m.typescript && ts
      ? ts.transpileModule(m.source, { fileName: m.rel.replace(/\.js$/, '.ts'), compilerOptions: { module: ts.ModuleKind.ES2022, target: ts.ScriptTarget.ES2022 } }).outputText
      : m.source;
    const target = path.join(appDir, m.rel);
    await mkdir(path.dirname(target), { recursive: true, mode: 0o755 });
    await writeFile(target, js, { mode: 0o644 });
  }
  await writeFile(path.join(appDir, 'package.json'), `${JSON.stringify({ name: 'thaw-demo-worker', private: true, type: 'module' })}\n`);
}

/** Bump when the rootfs layout changes in a way the inputs below do not show. */
const INPUT_KEY_VERSION = 1;

async function fileIdentity(file: string): Promise<Record<string, unknown>> {
  // Identity, not content, for the big binaries: hashing node costs more than the rebuild it would save.
  const st = await stat(file);
  return { file, dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs };
}

/** A key over everything that goes into the image; equal keys mean an equal image. */
async function imageInputKey(ref: string, nodePath: string, libraries: readonly string[], busyboxPath: string, modules: readonly WorkerModule[], env: readonly string[]): Promise<string> {
  const inputs = {
    version: INPUT_KEY_VERSION, ref, entrypoint: WORKER_IMAGE_ENTRYPOINT, env,
    node: await fileIdentity(nodePath),
    libraries: await Promise.all(libraries.map(fileIdentity)),
    busybox: await fileIdentity(busyboxPath),
    modules: modules.map((m) => [m.rel, createHash('sha256').update(m.source).digest('hex')]),
  };
  return createHash('sha256').update(JSON.stringify(inputs)).digest('hex');
}

/** What the image cache dir records for an input key. */
interface InputRecord {
  ref: string;
  manifestDigest: string;
  /** What `ctr images ls` shows for ref: the digest of the OCI index (ctr import --index-name points there). */
  importedDigest: string;
}

/** The digest containerd has under `ref` (namespace k8s.io; an index digest for our imports), or undefined. */
async function importedDigest(target: ImageTarget, ref: string, signal: AbortSignal | undefined): Promise<string | undefined> {
  const r = await runCommand(target.ctrPath, ['-a', target.address, '-n', 'k8s.io', 'images', 'ls', `name==${ref}`], {
    step: `ctr images ls ${ref}`, timeoutMs: CTR_LS_TIMEOUT_MS, allowFailure: true, ...(signal ? { signal } : {}),
  });
  if (r.exitCode !== 0) return undefined;
  const row = r.stdout.split('\n').slice(1).map((l) => l.trim().split(/\s+/)).find((cols) => cols[0] === ref);
  return row?.find((c) => c.startsWith('sha256:'));
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
  const modules = await workerModules();
  const libraries = await sharedLibraries(nodePath, options.signal);
  // Fast path: the same inputs were built before and containerd still has that image under ref.
  const env = [...WORKER_IMAGE_ENV, ...(options.extraEnv ?? [])];
  const key = await imageInputKey(ref, nodePath, libraries, busyboxPath, modules, env);
  const recordPath = path.join(imageTarget.imageCacheDir, `demo-worker-inputs-${key}.json`);
  const recorded = await readFile(recordPath, 'utf8').then((t) => JSON.parse(t) as Partial<InputRecord>, () => undefined);
  const appFiles = modules.map((m) => m.rel);
  if (recorded?.manifestDigest && recorded.importedDigest && (await importedDigest(imageTarget, ref, options.signal)) === recorded.importedDigest) {
    return { ref, manifestDigest: recorded.manifestDigest, cached: true, reused: true, buildMs: Date.now() - started, appFiles, libraries };
  }
  const rootfs = await tempRootfsDir();
  try {
    await buildBusyboxRootfs(rootfs, {}, busyboxPath);
    await copyFile(nodePath, path.join(rootfs, 'usr/bin/node'));
    for (const lib of libraries) {
      // copyFile follows symlinks: the file lands at the path the loader looks for (e.g. /lib64/ld-linux-x86-64.so.2).
      const dest = path.join(rootfs, lib);
      await mkdir(path.dirname(dest), { recursive: true, mode: 0o755 });
      await copyFile(lib, dest);
    }
    await writeWorkerApp(path.join(rootfs, 'app'), modules);
    const imported = await importImageInto(imageTarget, {
      ref, rootfsDir: rootfs, entrypoint: WORKER_IMAGE_ENTRYPOINT, env, workingDir: '/app',
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}),
    });
    const imagesDigest = await importedDigest(imageTarget, ref, options.signal);
    if (imagesDigest !== undefined) {
      const record: InputRecord = { ref, manifestDigest: imported.manifestDigest, importedDigest: imagesDigest };
      await writeFile(recordPath, `${JSON.stringify(record)}\n`);
    }
    return { ref, manifestDigest: imported.manifestDigest, cached: imported.cached, reused: false, buildMs: Date.now() - started, appFiles, libraries };
  } finally {
    await rm(rootfs, { recursive: true, force: true });
  }
}
