/**
 * containerd's own NRI template plugin (Go), built here from Debian's packages: the anchor bench:nri measures
 * thaw's plugin against (what any NRI plugin written with the upstream stub costs).
 *
 * Debian ships the NRI library as Go source (`golang-github-containerd-nri-dev`, sid 0.8.0) but not its example
 * plugins (upstream keeps them in separate Go modules), so the template's source comes from the same version's
 * source package: the `.orig.tar.gz` fetched through a private `deb-src` list (its SHA256 is the one apt read
 * from the signed Sources index, checked by apt-helper), never copied into this repository. It is compiled with
 * Debian's Go (`golang-go`) in GOPATH mode over `/usr/share/gocode` of the packaged dependencies (GO111MODULE=off,
 * GOPROXY=off, CGO_ENABLED=0: no module download, nothing of the network but Debian's archive). Everything lives
 * under `<root>/go-nri-plugin/`: only the static binary and its stamp are kept; the toolchain and sources are
 * unpacked into a temporary directory beside it and removed after the build (the .debs stay in the private apt
 * cache, so a rebuild downloads nothing).
 *
 * The template subscribes to every event its stub implements (its Configure returns an empty mask): more than
 * thaw's plugin does, so it is a generous anchor.
 */
import { constants as fsConstants } from 'node:fs';
import { access, chmod, copyFile, mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { silentLogger, type Logger } from '../log.js';
import { StackError, STACK_ERROR_CODES } from './errors.js';
import { chooseVersions, fetchDebs, parseAptPolicy, privateApt, readHostSource, renderPrivateSources } from './apt.js';
import { runCommand, tail } from './exec.js';
import { acquireLock } from './lock.js';
import { DEFAULT_STACK_ROOT } from './paths.js';
import { DEFAULT_PROVISION_LOCK_TIMEOUT_MS } from './provision-options.js';

export const GO_NRI_PLUGIN_COMPONENT = 'go-nri-plugin';
/** Bumped when what the prefix holds or how it is built changes. */
export const GO_NRI_PLUGIN_FORMAT_VERSION = 1;
export const GO_NRI_PLUGIN_SUITE = 'sid';
/** The source package whose `plugins/template/plugin.go` is built, and its version. */
export const GO_NRI_SOURCE = { name: 'golang-github-containerd-nri', version: '0.8.0-1', templatePath: 'plugins/template/plugin.go' } as const;
/**
 * The Go toolchain and exactly the Go source packages the template's import graph needs (found by building it
 * against the sid archive and adding the package of each missing import path until it built).
 */
export const GO_NRI_PLUGIN_PINS: Readonly<Record<string, string>> = {
  'golang-go': '2:1.27~1',
  'golang-1.27-go': '1.27.3-1',
  'golang-1.27-src': '1.27.3-1',
  'golang-github-containerd-nri-dev': '0.8.0-1',
  'golang-github-containerd-log-dev': '0.1.0-2',
  'golang-github-containerd-ttrpc-dev': '1.2.7-1',
  'golang-github-gogo-protobuf-dev': '1.3.2-3',
  'golang-github-golang-protobuf-1-5-dev': '1.5.4-2',
  'golang-github-kubernetes-cri-api-dev': '0.32.3-1',
  'golang-github-moby-sys-dev': '0.0~git20260904.79376e0-2',
  'golang-github-opencontainers-specs-dev': '1.2.1-2',
  'golang-github-sirupsen-logrus-dev': '1.9.3-2',
  'golang-golang-x-net-dev': '1:0.62.0-1',
  'golang-golang-x-sys-dev': '0.49.0+dfsg-1',
  'golang-golang-x-text-dev': '0.43.0-1',
  'golang-google-genproto-dev': '0.0~git20260414.afd174a-2',
  'golang-google-grpc-dev': '1.81.1-1',
  'golang-google-protobuf-dev': '1.36.10-2',
  'golang-gopkg-yaml.v2-dev': '2.4.4-1',
  'golang-k8s-sigs-yaml-dev': '1.6.0-1',
};
const GO_SUBPATH = 'usr/lib/go-1.27';
const GOCODE_SUBPATH = 'usr/share/gocode';
const STAMP = '.thaw-go-nri-plugin.json';
/** The binary's path inside the prefix. */
export const GO_NRI_PLUGIN_BINARY_SUBPATH = 'bin/nri-template';
/** One apt or build command; the first `go build` compiles the standard library too (~2 min on 2 loaded cores). */
const COMMAND_TIMEOUT_MS = 600_000;

export interface GoNriPluginStamp {
  formatVersion: number;
  component: typeof GO_NRI_PLUGIN_COMPONENT;
  pins: Record<string, string>;
  source: string;
  sourceSha256: string;
  /** `go version` of the toolchain that built it. */
  goVersion: string;
  warnings: string[];
  createdAt: string;
}

export function goNriPluginPaths(root: string = DEFAULT_STACK_ROOT): { prefix: string; binary: string; stampFile: string } {
  const prefix = path.join(path.resolve(root), GO_NRI_PLUGIN_COMPONENT);
  return { prefix, binary: path.join(prefix, GO_NRI_PLUGIN_BINARY_SUBPATH), stampFile: path.join(prefix, STAMP) };
}

function expectedPins(): Record<string, string> {
  return { ...GO_NRI_PLUGIN_PINS, [`source:${GO_NRI_SOURCE.name}`]: GO_NRI_SOURCE.version };
}

/** The stamp when the binary is there and was built from the current pins; else undefined. */
export async function isGoNriPluginProvisioned(root: string = DEFAULT_STACK_ROOT): Promise<GoNriPluginStamp | undefined> {
  const p = goNriPluginPaths(root);
  const stamp = await readFile(p.stampFile, 'utf8').then((t) => JSON.parse(t) as GoNriPluginStamp, () => undefined);
  if (!stamp || stamp.formatVersion !== GO_NRI_PLUGIN_FORMAT_VERSION || stamp.component !== GO_NRI_PLUGIN_COMPONENT) return undefined;
  if (JSON.stringify(stamp.pins) !== JSON.stringify(expectedPins())) return undefined;
  return (await access(p.binary, fsConstants.X_OK).then(() => true, () => false)) ? stamp : undefined;
}

/** Parses one `'URI' file size SHA256:hex` line of `apt-get --print-uris source` for `fileSuffix`. Pure. */
export function parseSourceUri(text: string, fileSuffix: string): { uri: string; file: string; sha256: string } | undefined {
  for (const line of text.split('\n')) {
    const m = /^'([^']+)'\s+(\S+)\s+\d+\s+SHA256:([0-9a-f]{64})\s*$/.exec(line.trim());
    if (m?.[1] && m[2] && m[3] && m[2].endsWith(fileSuffix)) return { uri: m[1], file: m[2], sha256: m[3] };
  }
  return undefined;
}

/**
 * Provisions `<root>/go-nri-plugin/bin/nri-template`; returns at once when its stamp matches. Throws
 * STACK_PROVISION_FAILED naming the step (apt, download, build) or STACK_CHECK_FAILED.
 */
export async function provisionGoNriPlugin(options: { root?: string; force?: boolean; logger?: Logger; signal?: AbortSignal }):
Promise<{ binary: string; built: boolean; stamp: GoNriPluginStamp }> {
  const log = (options.logger ?? silentLogger).child({ component: 'node-stack', flavor: GO_NRI_PLUGIN_COMPONENT });
  const root = path.resolve(options.root ?? DEFAULT_STACK_ROOT);
  const paths = goNriPluginPaths(root);
  const signal = options.signal;
  const run = { signal, timeoutMs: COMMAND_TIMEOUT_MS };
  if (!options.force) {
    const stamp = await isGoNriPluginProvisioned(root);
    if (stamp) return { binary: paths.binary, built: false, stamp };
  }
  await mkdir(root, { recursive: true, mode: 0o755 });
  const release = await acquireLock(path.join(root, `.${GO_NRI_PLUGIN_COMPONENT}.lock`), DEFAULT_PROVISION_LOCK_TIMEOUT_MS, signal);
  try {
    if (!options.force) {
      const stamp = await isGoNriPluginProvisioned(root);
      if (stamp) return { binary: paths.binary, built: false, stamp };
    }
    const host = await readHostSource({});
    const sources = renderPrivateSources(host, GO_NRI_PLUGIN_SUITE);
    const binApt = await privateApt(root, `${GO_NRI_PLUGIN_COMPONENT}-${GO_NRI_PLUGIN_SUITE}`, 'thaw.sources', sources, run);
    const srcApt = await privateApt(root, `${GO_NRI_PLUGIN_COMPONENT}-${GO_NRI_PLUGIN_SUITE}-src`, 'thaw.sources', sources.replace(/^Types: deb$/m, 'Types: deb-src'), run);
    log.info('fetching package lists', { suite: GO_NRI_PLUGIN_SUITE });
    await binApt.aptGet(['-q', 'update'], 'apt-get update (sid)');
    await srcApt.aptGet(['-q', 'update'], 'apt-get update (sid sources)');
    const names = Object.keys(GO_NRI_PLUGIN_PINS).sort();
    const policy = parseAptPolicy((await binApt.aptCache(['policy', ...names], 'resolve versions')).stdout);
    const { chosen, warnings } = chooseVersions(names, { suite: GO_NRI_PLUGIN_SUITE, pins: GO_NRI_PLUGIN_PINS }, policy, log);
    const debs = await fetchDebs(binApt, chosen, log);

    // The source package's upstream tarball: its URI and SHA256 as apt read them from the signed Sources index.
    const printed = await srcApt.aptGet(['-q', '--print-uris', 'source', `${GO_NRI_SOURCE.name}=${GO_NRI_SOURCE.version}`], 'resolve the nri source package', srcApt.archives);
    const orig = parseSourceUri(printed.stdout, '.orig.tar.gz');
    if (!orig) {
      throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `no .orig.tar.gz in the sources of ${GO_NRI_SOURCE.name} ${GO_NRI_SOURCE.version}`, {
        step: 'resolve the nri source package', evidence: { printUris: tail(printed.stdout, 1000) },
      });
    }
    const tarball = path.join(srcApt.archives, orig.file);
    if (!(await access(tarball).then(() => true, () => false))) {
      await runCommand('/usr/lib/apt/apt-helper', ['download-file', orig.uri, `${tarball}.part`, `SHA256:${orig.sha256}`], { step: 'download the nri source tarball', ...run });
      await rename(`${tarball}.part`, tarball);
    }

    for (const f of await readdir(root)) {
      if (f.startsWith(`.${GO_NRI_PLUGIN_COMPONENT}.tmp-`)) await rm(path.join(root, f), { recursive: true, force: true });
    }
    const tmp = await mkdtemp(path.join(root, `.${GO_NRI_PLUGIN_COMPONENT}.tmp-`));
    let goVersion = '';
    let swapped = false;
    try {
      await chmod(tmp, 0o755);
      const tree = path.join(tmp, 'tree');
      await mkdir(tree);
      for (const [name, deb] of debs) await runCommand('dpkg-deb', ['-x', deb, tree], { step: `dpkg -x ${name}`, ...run });
      // The source tarball's single top-level directory (nri-0.8.0/) is stripped: only the template is used.
      const srcDir = path.join(tmp, 'src');
      await mkdir(srcDir);
      await runCommand('tar', ['-xzf', tarball, '-C', srcDir, '--strip-components=1', '--wildcards', `*/${GO_NRI_SOURCE.templatePath}`], { step: 'unpack the template plugin', ...run });
      const gopath = path.join(tmp, 'gopath');
      const pkgDir = path.join(gopath, 'src', 'thaw.invalid', 'nri-template');
      await mkdir(pkgDir, { recursive: true });
      await copyFile(path.join(srcDir, GO_NRI_SOURCE.templatePath), path.join(pkgDir, 'plugin.go'));
      const goroot = path.join(tree, GO_SUBPATH);
      const env: NodeJS.ProcessEnv = {
        PATH: `${path.join(goroot, 'bin')}:/usr/bin:/bin`, HOME: tmp, GOROOT: goroot,
        GOPATH: `${gopath}:${path.join(tree, GOCODE_SUBPATH)}`, GO111MODULE: 'off', GOPROXY: 'off', GOFLAGS: '',
        GOTOOLCHAIN: 'local', GOCACHE: path.join(tmp, 'cache'), CGO_ENABLED: '0', GOTELEMETRY: 'off',
      };
      goVersion = (await runCommand(path.join(goroot, 'bin', 'go'), ['version'], { step: 'go version', env, ...run })).stdout.trim();
      const out = path.join(tmp, 'prefix', GO_NRI_PLUGIN_BINARY_SUBPATH);
      await mkdir(path.dirname(out), { recursive: true, mode: 0o755 });
      log.info('building the NRI template plugin', { goVersion });
      await runCommand(path.join(goroot, 'bin', 'go'), ['build', '-trimpath', '-o', out, '.'], { step: 'go build the NRI template plugin', cwd: pkgDir, env, ...run });
      await rm(paths.prefix, { recursive: true, force: true });
      await rename(path.join(tmp, 'prefix'), paths.prefix);
      await chmod(paths.prefix, 0o755);
      swapped = true;
    } finally {
      await rm(tmp, { recursive: true, force: true });
      if (!swapped) log.warn('go-nri-plugin build failed; nothing swapped in', {});
    }
    // A run with a bad flag proves the binary starts (Go's flag package exits 2 after printing usage).
    const check = await runCommand(paths.binary, ['-no-such-flag'], { step: 'check nri-template', allowFailure: true, timeoutMs: 30_000, errorCode: STACK_ERROR_CODES.CHECK_FAILED });
    if (!/-idx/.test(check.stderr)) {
      throw new StackError(STACK_ERROR_CODES.CHECK_FAILED, 'the built nri-template did not print its usage', { step: 'check nri-template', evidence: { stderr: tail(check.stderr, 1000) } });
    }
    const stamp: GoNriPluginStamp = {
      formatVersion: GO_NRI_PLUGIN_FORMAT_VERSION,
      component: GO_NRI_PLUGIN_COMPONENT,
      pins: expectedPins(),
      source: `${GO_NRI_SOURCE.name} ${GO_NRI_SOURCE.version} ${GO_NRI_SOURCE.templatePath}`,
      sourceSha256: orig.sha256,
      goVersion,
      warnings,
      createdAt: new Date().toISOString(),
    };
    await writeFile(`${paths.stampFile}.tmp`, `${JSON.stringify(stamp, null, 2)}\n`, { mode: 0o644 });
    await rename(`${paths.stampFile}.tmp`, paths.stampFile);
    log.info('go nri plugin provisioned', { binary: paths.binary, goVersion });
    return { binary: paths.binary, built: true, stamp };
  } finally {
    await release();
  }
}
