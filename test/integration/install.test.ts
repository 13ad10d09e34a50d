/**
 * `installThaw` into a temporary root: every file of the installed layout (config-contract.md) with its mode,
 * production-only node_modules, the toolkit's ELF interpreters, then the installed copy RUN where it will
 * live: a private mount namespace binds <root>/opt/thaw over /opt/thaw (nothing outside this test sees it), so
 * the installed node, hook and toolkit run at their real absolute paths. Then idempotence, --force, the
 * operator's agent.yaml, and the typed errors.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync, copyFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { parse as parseYaml } from 'yaml';
import { DEFAULT_TOOLKIT_DIR } from '../../src/defaults.js';
import {
  INSTALL_PATHS,
  INSTALL_STAMP_FILE,
  InstallErrorCode,
  installThaw,
  productionModules,
  renderWrapper,
  type InstallReport,
} from '../../src/cli/install.js';
import { elfInterpreter } from '../../src/elf.js';
import { stackPaths } from '../../src/node-stack/paths.js';
import { rejection } from '../helpers/rejection.js';

const REPO = path.resolve(import.meta.dirname, '../..');
const SOURCES = { packageRoot: REPO, toolkitDir: DEFAULT_TOOLKIT_DIR, nodePath: process.execPath };
const mode = (p: string): number => lstatSync(p).mode & 0o7777;
const sha256 = (p: string): string => createHash('sha256').update(readFileSync(p)).digest('hex');

describe('thaw install --root DIR', () => {
  let scratch: string;
  let root: string;
  let report: InstallReport;
  const progress: string[] = [];
  const under = (hostPath: string): string => path.join(root, hostPath);

  beforeAll(async () => {
    scratch = mkdtempSync(path.join(os.tmpdir(), 'thaw-install-test-'));
    root = path.join(scratch, 'root');
    report = await installThaw({ root, ...SOURCES, progress: (l) => progress.push(l) });
  }, 120_000);
  afterAll(() => {
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  it('reports what it installed, with progress lines', () => {
    expect(report.root).toBe(root);
    expect(report.files).toEqual([
      INSTALL_PATHS.lib, INSTALL_PATHS.node, DEFAULT_TOOLKIT_DIR, INSTALL_PATHS.wrapper, INSTALL_PATHS.agentConfig, INSTALL_PATHS.containerdDropIn, INSTALL_PATHS.systemdUnit,
    ]);
    expect(report.bytes).toBeGreaterThan(statSync(process.execPath).size);
    expect(progress).toContain(`installed ${INSTALL_PATHS.lib}`);
    expect(progress.at(-1)).toMatch(/^thaw installed in /);
  });

  it('lays down the package: package.json, dist/src, proto, config, native/build, production node_modules only', () => {
    const lib = under(INSTALL_PATHS.lib);
    expect(mode(lib)).toBe(0o755);
    expect(JSON.parse(readFileSync(path.join(lib, 'package.json'), 'utf8'))).toEqual(JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')));
    for (const rel of ['dist/src/oci-hooks/main.js', 'dist/src/agent/engine.js', 'proto/nri/api.proto', 'proto/criu/rpc.proto', 'config/agent.yaml']) {
      expect(statSync(path.join(lib, rel)).isFile(), rel).toBe(true);
    }
    expect(mode(path.join(lib, 'native/build/thaw-pause'))).toBe(0o755);
    expect(sha256(path.join(lib, 'native/build/thaw-pause'))).toBe(sha256(path.join(REPO, 'native/build/thaw-pause')));
    // The native createRuntime hook, beside thaw-pause where the agent looks for it.
    expect(mode(path.join(lib, 'native/build/thaw-hook'))).toBe(0o755);
    expect(sha256(path.join(lib, 'native/build/thaw-hook'))).toBe(sha256(path.join(REPO, 'native/build/thaw-hook')));
    // Not the tests, the benchmarks or the demo.
    expect(existsSync(path.join(lib, 'dist/bench'))).toBe(false);
    expect(existsSync(path.join(lib, 'test'))).toBe(false);
    // Nor the test harness (src/node-stack/): the package's own code never imports it.
    expect(existsSync(path.join(lib, 'dist/src/node-stack'))).toBe(false);
    // node_modules: every production package of the lockfile, none of the dev ones.
    const lock = JSON.parse(readFileSync(path.join(REPO, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
    for (const dep of ['@grpc/grpc-js', '@grpc/proto-loader', 'koffi', 'protobufjs', 'yaml']) {
      expect(existsSync(path.join(lib, 'node_modules', dep, 'package.json')), dep).toBe(true);
    }
    const devOnly = Object.entries(lock.packages).filter(([k, v]) => k.startsWith('node_modules/') && v.dev === true).map(([k]) => k);
    expect(devOnly).toContain('node_modules/vitest');
    expect(devOnly).toContain('node_modules/typescript');
    for (const k of devOnly) expect(existsSync(path.join(lib, k)), k).toBe(false);
    // The stamp that makes a second install a no-op.
    expect(JSON.parse(readFileSync(path.join(lib, INSTALL_STAMP_FILE), 'utf8'))).toMatchObject({ name: 'thaw', version: JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')).version });
  });

  it('installs the node binary, the wrapper, the config, the containerd drop-in and the systemd unit with their modes', () => {
    expect(mode(under(INSTALL_PATHS.node))).toBe(0o755);
    expect(sha256(under(INSTALL_PATHS.node))).toBe(sha256(process.execPath));
    expect(mode(under('/opt/thaw/bin'))).toBe(0o755);

    const wrapper = readFileSync(under(INSTALL_PATHS.wrapper), 'utf8');
    expect(wrapper).toBe(renderWrapper());
    expect(wrapper.split('\n')[0]).toBe('#!/bin/sh');
    expect(wrapper).toContain('\nexec /opt/thaw/bin/node /opt/thaw/lib/dist/src/cli/main.js "$@"\n');
    expect(mode(under(INSTALL_PATHS.wrapper))).toBe(0o755);

    expect(readFileSync(under(INSTALL_PATHS.agentConfig), 'utf8')).toBe(readFileSync(path.join(REPO, 'config/agent.yaml'), 'utf8'));
    expect(parseYaml(readFileSync(under(INSTALL_PATHS.agentConfig), 'utf8'))).toHaveProperty('paths.toolkitDir', DEFAULT_TOOLKIT_DIR);
    expect(mode(under(INSTALL_PATHS.agentConfig))).toBe(0o644);
    expect(mode(under('/etc/thaw'))).toBe(0o755);

    expect(readFileSync(under(INSTALL_PATHS.containerdDropIn), 'utf8')).toBe(readFileSync(path.join(REPO, 'config/conf.d/thaw-nri.toml'), 'utf8'));
    expect(mode(under(INSTALL_PATHS.containerdDropIn))).toBe(0o644);

    const unit = readFileSync(under(INSTALL_PATHS.systemdUnit), 'utf8').split('\n');
    for (const line of ['ExecStart=/usr/local/bin/thaw agent --config /etc/thaw/agent.yaml', 'After=containerd.service', 'Wants=containerd.service',
      'Restart=on-failure', 'KillSignal=SIGTERM', 'TimeoutStopSec=60', 'WantedBy=multi-user.target']) {
      expect(unit, line).toContain(line);
    }
    expect(mode(under(INSTALL_PATHS.systemdUnit))).toBe(0o644);
  });

  it('creates the checkpoint store 0700 (checkpoints hold process memory)', () => {
    expect(mode(under('/var/lib/thaw'))).toBe(0o700);
    expect(mode(under('/var/lib/thaw/checkpoints'))).toBe(0o700);
  });

  it('copies the toolkit at its own absolute path, links as they were, ELF interpreters inside it', async () => {
    const copy = under(DEFAULT_TOOLKIT_DIR);
    // Only the toolkit: not the private containerd, runc and CNI plugins of the test stack, nor links to them.
    for (const rel of ['usr/bin/containerd', 'usr/sbin/runc', 'usr/lib/cni', 'bin/containerd', 'bin/runc', 'bin/ctr']) {
      expect(existsSync(path.join(DEFAULT_TOOLKIT_DIR, rel)), `the stack has ${rel}`).toBe(true);
      expect(lstatSync(path.join(copy, rel), { throwIfNoEntry: false }), rel).toBeUndefined();
    }
    for (const rel of ['bin/busybox', 'usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2', '.thaw-stack.json']) expect(existsSync(path.join(copy, rel)), rel).toBe(true);
    expect(readlinkSync(path.join(copy, 'bin/criu'))).toBe(readlinkSync(path.join(DEFAULT_TOOLKIT_DIR, 'bin/criu')));
    const patchelf = stackPaths('1.7').patchelf;
    for (const bin of ['criu', 'tar', 'gzip']) {
      const real = path.resolve(path.join(copy, 'bin'), readlinkSync(path.join(copy, 'bin', bin)));
      expect(real.startsWith(`${copy}/`), real).toBe(true);
      const interp = await elfInterpreter(real);
      expect(interp).toBe(`${DEFAULT_TOOLKIT_DIR}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2`);
      // The same answer from an independent reader.
      expect(execFileSync(patchelf, ['--print-interpreter', real], { encoding: 'utf8' }).trim()).toBe(interp);
      expect(existsSync(path.join(root, interp as string)), `${interp} is in the copy`).toBe(true);
      expect(mode(real) & 0o111).not.toBe(0);
    }
  });

  it('is self-contained: every module of dist/src loads from the installed copy, resolving nothing outside it', () => {
    const lib = under(INSTALL_PATHS.lib);
    const dist = path.join(lib, 'dist/src');
    const modules: string[] = [];
    const walk = (d: string): void => {
      for (const name of readdirSync(d)) {
        const p = path.join(d, name);
        if (statSync(p).isDirectory()) walk(p);
        // Entry points run their main() when imported; the hook entry is run for real below.
        else if (name.endsWith('.js') && !/(^|-)main\.js$/.test(name)) modules.push(p);
      }
    };
    walk(dist);
    expect(modules.length).toBeGreaterThan(40);
    const resolvedLog = path.join(scratch, 'resolved.log');
    // ESM resolutions go through a resolve hook that logs each URL; CommonJS ones (grpc-js, protobufjs) are in
    // require.cache afterwards.
    const hooks = `import { appendFileSync } from 'node:fs';
export async function resolve(spec, ctx, next) { const r = await next(spec, ctx); appendFileSync(${JSON.stringify(resolvedLog)}, r.url + '\\n'); return r; }`;
    const script = `import { register, createRequire } from 'node:module';
register('data:text/javascript,' + encodeURIComponent(${JSON.stringify(hooks)}));
const mods = ${JSON.stringify(modules)};
for (const m of mods) await import(m);
const req = createRequire(import.meta.url);
process.stdout.write(JSON.stringify(Object.keys(req.cache)));`;
    const cwd = mkdtempSync(path.join(scratch, 'cwd-'));
    const r = spawnSync(under(INSTALL_PATHS.node), ['--input-type=module', '-e', script], { cwd, encoding: 'utf8', env: { PATH: '/usr/bin:/bin' } });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const cjs = JSON.parse(r.stdout) as string[];
    const esm = readFileSync(resolvedLog, 'utf8').split('\n').filter((l) => l !== '');
    const files = [...cjs, ...esm.filter((u) => u.startsWith('file:')).map((u) => new URL(u).pathname)];
    expect(files.some((f) => f.includes('/node_modules/@grpc/grpc-js/'))).toBe(true);
    expect(files.some((f) => f.includes('/node_modules/koffi/'))).toBe(true);
    expect(files.filter((f) => !f.startsWith(`${lib}/`))).toEqual([]);
    expect(esm.filter((u) => !u.startsWith('file:') && !u.startsWith('node:') && !u.startsWith('data:'))).toEqual([]);
  });

  it('runs from its host paths: the toolkit\'s CRIU, tar and gzip and the OCI hook entry, as runc would run it', () => {
    // A private mount namespace where <root>/opt/thaw is /opt/thaw: the installed copy at its real paths.
    const work = mkdtempSync(path.join(scratch, 'hook-'));
    const controlDir = path.join(work, 'control', 'c1');
    const workDir = path.join(work, 'restore', 'c1');
    mkdirSync(controlDir, { recursive: true });
    mkdirSync(workDir, { recursive: true });
    writeFileSync(path.join(controlDir, 'restore-complete'), '');
    const hook = `/opt/thaw/bin/node ${INSTALL_PATHS.lib}/dist/src/oci-hooks/main.js poststop --control-dir ${controlDir} --work-dir ${workDir}`;
    const script = [
      'set -e',
      `mount --bind ${JSON.stringify(under('/opt/thaw'))} /opt/thaw`,
      'cd /',
      `${DEFAULT_TOOLKIT_DIR}/bin/criu --version`,
      // The kernel checks CRIU makes before any dump, from the pruned copy (it passes with the full stack here).
      `${DEFAULT_TOOLKIT_DIR}/bin/criu check 2>&1 | tail -1`,
      `${DEFAULT_TOOLKIT_DIR}/bin/tar --version | head -1`,
      `${DEFAULT_TOOLKIT_DIR}/bin/gzip --version | head -1`,
      `echo '{"ociVersion":"1.0.2","id":"c1","status":"stopped","bundle":"/nonexistent"}' | env -i ${hook}`,
      'echo hook-exit=$?',
      // The wrapper as installed (its paths are /opt/thaw/...): it must run the installed node on the CLI entry.
      `sh ${JSON.stringify(under(INSTALL_PATHS.wrapper))} --help > ${JSON.stringify(path.join(work, 'wrapper.out'))} 2>&1 && echo wrapper-exit=0 || echo wrapper-exit=$?`,
      // What the namespace ran: the copy, not the machine's /opt/thaw.
      "awk '$5 == \"/opt/thaw\" {print \"mounted-from=\" $4}' /proc/self/mountinfo",
    ].join('\n');
    const r = spawnSync('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { encoding: 'utf8', cwd: work });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^Version: \d+\.\d+/m);
    expect(r.stdout).toContain('Looks good.');
    expect(r.stdout).toContain('tar (GNU tar)');
    expect(r.stdout).toMatch(/^gzip \d/m);
    expect(r.stdout).toContain('hook-exit=0');
    expect(r.stdout).toContain(`mounted-from=${under('/opt/thaw')}`);
    // The installed wrapper reaches the installed CLI: `thaw --help` succeeds.
    const wrapperOut = readFileSync(path.join(work, 'wrapper.out'), 'utf8');
    expect(r.stdout, wrapperOut).toContain('wrapper-exit=0');
    expect(wrapperOut).toMatch(/thaw/);
    // The hook did its job: the control and work directories are gone.
    expect(existsSync(controlDir)).toBe(false);
    expect(existsSync(workDir)).toBe(false);
  });

  it('the installed copy installs itself onto another root (the DaemonSet\'s init container: image -> host)', () => {
    // As in the image: /opt/thaw is the installed layout, and install.js runs from it with its own defaults.
    const host = path.join(scratch, 'host');
    const script = `const m = await import('${INSTALL_PATHS.lib}/dist/src/cli/install.js');
const r = await m.installThaw({ root: ${JSON.stringify(host)}, ...m.defaultInstallSources() });
process.stdout.write(JSON.stringify({ sources: m.defaultInstallSources(), files: r.files }));`;
    const r = spawnSync('unshare', ['--mount', '--propagation', 'private', 'sh', '-c',
      `mount --bind ${JSON.stringify(under('/opt/thaw'))} /opt/thaw && cd / && ${INSTALL_PATHS.node} --input-type=module -e "$0"`, script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout) as { sources: Record<string, string>; files: string[] };
    expect(out.sources).toEqual({ packageRoot: INSTALL_PATHS.lib, toolkitDir: DEFAULT_TOOLKIT_DIR, nodePath: INSTALL_PATHS.node });
    expect(out.files).toEqual(report.files);
    const inHost = (p: string): string => path.join(host, p);
    expect(readFileSync(path.join(inHost(INSTALL_PATHS.lib), INSTALL_STAMP_FILE), 'utf8')).toBe(readFileSync(path.join(under(INSTALL_PATHS.lib), INSTALL_STAMP_FILE), 'utf8'));
    expect(sha256(inHost(INSTALL_PATHS.node))).toBe(sha256(process.execPath));
    expect(readlinkSync(path.join(inHost(DEFAULT_TOOLKIT_DIR), 'bin/criu'))).toBe(readlinkSync(path.join(DEFAULT_TOOLKIT_DIR, 'bin/criu')));
    expect(existsSync(path.join(inHost(INSTALL_PATHS.lib), 'node_modules/vitest'))).toBe(false);
    rmSync(host, { recursive: true, force: true });
  }, 120_000);

  it('a second install of the same content changes nothing', async () => {
    const before = statSync(under(INSTALL_PATHS.lib)).ino;
    const lines: string[] = [];
    const again = await installThaw({ root, ...SOURCES, progress: (l) => lines.push(l) });
    expect(again).toEqual({ root, files: [], bytes: 0 });
    expect(statSync(under(INSTALL_PATHS.lib)).ino).toBe(before);
    expect(lines.at(-1)).toBe(`thaw is installed and up to date in ${root}`);
  }, 60_000);

  it('refuses to replace an install of other content without force, and loses nothing', async () => {
    const stampPath = path.join(under(INSTALL_PATHS.lib), INSTALL_STAMP_FILE);
    const otherStamp = readFileSync(stampPath, 'utf8').replace('"thaw"', '"thaw-older"');
    writeFileSync(stampPath, otherStamp);
    writeFileSync(under(INSTALL_PATHS.wrapper), '#!/bin/sh\necho older\n');
    const err = await rejection(installThaw({ root, ...SOURCES }));
    expect(err).toMatchObject({ code: InstallErrorCode.EXISTS });
    expect(err.evidence['paths']).toContain(INSTALL_PATHS.lib);
    expect(readFileSync(stampPath, 'utf8')).toBe(otherStamp);
    expect(readFileSync(under(INSTALL_PATHS.wrapper), 'utf8')).toBe('#!/bin/sh\necho older\n');
    expect(readdirSync(path.dirname(under(INSTALL_PATHS.lib))).filter((n) => n.includes('.thaw-'))).toEqual([]);
  }, 60_000);

  it('with force replaces it, keeps the operator\'s agent.yaml and leaves no staging behind', async () => {
    const edited = 'log:\n  level: debug\n';
    writeFileSync(under(INSTALL_PATHS.agentConfig), edited);
    // A crashed install's staging entry is cleaned up (pid above any pid_max), a running one's is not.
    mkdirSync(path.join(under('/opt/thaw'), '.lib.thaw-new-4194399'));
    const running = spawn('sleep', ['600'], { stdio: 'ignore' });
    onTestFinished(() => void running.kill());
    const runningEntry = path.join(under('/opt/thaw'), `.lib.thaw-new-${running.pid}`);
    mkdirSync(runningEntry);
    const lines: string[] = [];
    const toolkitInode = statSync(under(DEFAULT_TOOLKIT_DIR)).ino;
    const r = await installThaw({ root, ...SOURCES, force: true, progress: (l) => lines.push(l) });
    // Only what differs is replaced: the toolkit (bind-mounted into restore targets) and node stay as they were.
    expect(r.files).toEqual([INSTALL_PATHS.lib, INSTALL_PATHS.wrapper]);
    expect(statSync(under(DEFAULT_TOOLKIT_DIR)).ino).toBe(toolkitInode);
    expect(lines).toContain(`keeping the existing ${INSTALL_PATHS.agentConfig}`);
    expect(readFileSync(under(INSTALL_PATHS.agentConfig), 'utf8')).toBe(edited);
    expect(readFileSync(under(INSTALL_PATHS.wrapper), 'utf8')).toBe(renderWrapper());
    expect(readFileSync(path.join(under(INSTALL_PATHS.lib), INSTALL_STAMP_FILE), 'utf8')).toContain('"name": "thaw"');
    expect(existsSync(runningEntry)).toBe(true);
    rmSync(runningEntry, { recursive: true });
    for (const dir of [under('/opt/thaw'), under('/usr/local/bin'), path.dirname(under(DEFAULT_TOOLKIT_DIR))]) {
      expect(readdirSync(dir).filter((n) => n.includes('.thaw-')), dir).toEqual([]);
    }
    // And it is up to date again.
    expect((await installThaw({ root, ...SOURCES })).files).toEqual([]);
  }, 120_000);

  it('gives typed errors for bad options and sources, before touching the root', async () => {
    const fresh = path.join(scratch, 'fresh');
    expect(await rejection(installThaw({ ...SOURCES, root: 'relative/root' }))).toMatchObject({ code: InstallErrorCode.INVALID_OPTION });
    expect(await rejection(installThaw({ ...SOURCES, root: fresh, packageRoot: scratch }))).toMatchObject({ code: InstallErrorCode.SOURCE_MISSING });
    expect(await rejection(installThaw({ ...SOURCES, root: fresh, nodePath: path.join(scratch, 'no-node') }))).toMatchObject({ code: InstallErrorCode.SOURCE_MISSING });
    const aborted = AbortSignal.abort(new Error('stop'));
    expect(await rejection(installThaw({ ...SOURCES, root: fresh, signal: aborted }))).toMatchObject({ code: InstallErrorCode.ABORTED });

    // A toolkit whose binaries use the machine's loader would not run from another root: refused.
    const foreign = path.join(scratch, 'foreign-toolkit');
    mkdirSync(path.join(foreign, 'bin'), { recursive: true });
    for (const bin of ['criu', 'tar', 'gzip', 'busybox']) copyFileSync('/usr/bin/tar', path.join(foreign, 'bin', bin));
    const err = await rejection(installThaw({ ...SOURCES, root: fresh, toolkitDir: foreign }));
    expect(err).toMatchObject({ code: InstallErrorCode.TOOLKIT_NOT_RELOCATED });
    expect(err.evidence['interpreter']).toMatch(/^\/lib/);
    expect(await rejection(installThaw({ ...SOURCES, root: fresh, toolkitDir: path.join(scratch, 'none') }))).toMatchObject({ code: InstallErrorCode.SOURCE_MISSING });
    expect(existsSync(fresh)).toBe(false);
  });

  it('prunes by the lockfile: a production package missing from node_modules is an error naming it', async () => {
    const pkg = path.join(scratch, 'pkg');
    mkdirSync(path.join(pkg, 'node_modules/present'), { recursive: true });
    writeFileSync(path.join(pkg, 'package-lock.json'), JSON.stringify({
      lockfileVersion: 3,
      packages: {
        '': {}, 'node_modules/present': {}, 'node_modules/present/node_modules/nested': {}, 'node_modules/devtool': { dev: true },
        'node_modules/platform-only': { optional: true }, 'node_modules/absent': {},
      },
    }));
    const err = await rejection(productionModules(pkg));
    expect(err).toMatchObject({ code: InstallErrorCode.SOURCE_MISSING, evidence: { missing: ['node_modules/absent'] } });
    mkdirSync(path.join(pkg, 'node_modules/absent'));
    expect(await productionModules(pkg)).toEqual(['node_modules/absent', 'node_modules/present']);
  });
});
