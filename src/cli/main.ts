/**
 * `thaw <command>`: the CLI (bin/thaw.js, or dist/src/cli/main.js run directly). Each command gathers typed
 * data (from the agent's control API, or the node for doctor), then renders it: human text by default, one
 * JSON document with --json. Errors go to stderr as one line `thaw <command>: <message>`; exit codes in
 * exit-codes.ts.
 */
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { resolve } from 'node:path';
import { agentLogger, describeStartFailure, runAgent } from '../agent/index.js';
import { packageRoot } from '../util.js';
import { ConfigError, ConfigErrorCode, DEFAULT_CONFIG_PATH, resolveAgentConfig, type AgentConfig } from '../agent/index.js';
import { errorMessage, isThawError } from '../errors.js';
import { DEFAULT_NAMESPACE, resolveStoreKey } from '../checkpoint-name.js';
import { StoreErrorCode } from '../store/index.js';
import { apiSocketOf, commandHelp, parseCommandLine, parseTarget, topLevelHelp, UsageError, type CommandLine } from './args.js';
import { AgentClient, ApiCallError } from './client.js';
import { renderDoctor, runDoctor } from './doctor.js';
import { defaultInstallSources, installThaw } from './install.js';
import { loadRegistryConfig } from '../agent/index.js';
import { openLocalStore, type LocalStore } from '../store/index.js';
import { loadSigningKey, OciErrorCode, parseReference, pullCheckpoint, pushCheckpoint, type RegistryAccess } from '../store/index.js';
import { ExitCode } from './exit-codes.js';
import { renderCheckpointResult, renderGc, renderInspect, renderList, renderProgress, renderStatus } from './render.js';

export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  env: Readonly<Record<string, string | undefined>>;
}

const processIo: CliIo = {
  stdout: (t) => void process.stdout.write(t),
  stderr: (t) => void process.stderr.write(t),
  env: process.env,
};

function version(): string {
  try {
    return (JSON.parse(readFileSync(`${packageRoot()}/package.json`, 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

/** The agent's configuration for `agent` and `doctor`: --config, else /etc/thaw/agent.yaml when it exists. */
async function loadConfig(line: CommandLine, env: CliIo['env']): Promise<AgentConfig> {
  const explicit = line.values['config'];
  const path = typeof explicit === 'string' ? explicit : existsSync(DEFAULT_CONFIG_PATH) ? DEFAULT_CONFIG_PATH : undefined;
  let file: { path: string; text: string } | undefined;
  if (path !== undefined) {
    try {
      file = { path, text: await readFile(path, 'utf8') };
    } catch (err) {
      throw new ConfigError(ConfigErrorCode.UNREADABLE, `cannot read ${path}: ${errorMessage(err)}`, { step: 'load agent configuration', cause: err });
    }
  }
  const flags = Object.fromEntries(Object.entries(line.values).filter((e): e is [string, string] => typeof e[1] === 'string'));
  return resolveAgentConfig({ ...(file ? { file } : {}), env, flags, packageRoot: packageRoot() });
}

const json = (io: CliIo, data: unknown): void => io.stdout(`${JSON.stringify(data, null, 2)}\n`);

async function withClient<T>(line: CommandLine, io: CliIo, fn: (c: AgentClient) => Promise<T>): Promise<T> {
  const client = new AgentClient(apiSocketOf(line.values, io.env));
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

async function agentCommand(line: CommandLine, io: CliIo): Promise<number> {
  const config = await loadConfig(line, io.env);
  const { logger, close } = agentLogger(config);
  const stop = new AbortController();
  const onSignal = (signal: string): void => {
    logger.info('signal received', { signal });
    stop.abort();
  };
  const onTerm = (): void => onSignal('SIGTERM');
  const onInt = (): void => onSignal('SIGINT');
  process.on('SIGTERM', onTerm);
  process.on('SIGINT', onInt);
  try {
    const hookMain = fileURLToPath(new URL('../oci-hooks/main.js', import.meta.url));
    return await runAgent({ config, version: version(), hookArgv: [process.execPath, hookMain], stop: stop.signal }, logger);
  } catch (err) {
    logger.error('thaw agent cannot start', { error: describeStartFailure(err) });
    io.stderr(`thaw agent: ${errorMessage(err)}${err instanceof ConfigError ? ` (${err.code})` : ''}\n`);
    return err instanceof ConfigError ? ExitCode.USAGE : ExitCode.FAILED;
  } finally {
    process.off('SIGTERM', onTerm);
    process.off('SIGINT', onInt);
    await close();
  }
}

async function checkpointCommand(line: CommandLine, io: CliIo): Promise<number> {
  const target = parseTarget(line.positionals[0]!);
  const given = (line.values['name'] as string | undefined) ?? '';
  const ns = line.values['namespace'] as string | undefined;
  // A bare name with --namespace is qualified here; without, the agent puts it in the pod's own namespace.
  const name = given !== '' && !given.includes('/') && ns !== undefined ? `${ns}/${given}` : given;
  const request = {
    ...('containerId' in target ? { container_id: target.containerId } : { pod: { namespace: target.pod.namespace, name: target.pod.name, uid: '' } }),
    name,
    container_name: (line.values['container'] as string | undefined) ?? '',
    replace: line.values['replace'] === true,
  };
  return withClient(line, io, async (client) => {
    let last;
    for await (const p of client.checkpoint(request)) {
      if (!p.done) io.stderr(`${renderProgress(p)}\n`);
      last = p;
    }
    if (!last) throw new ApiCallError('the agent ended the checkpoint stream without a result', 13, 'AGENT_STREAM_EMPTY');
    if (line.values['json']) json(io, { ...last, phases: last.phases_json ? JSON.parse(last.phases_json) : undefined, error: last.error_json ? JSON.parse(last.error_json) : undefined });
    else io.stdout(`${renderCheckpointResult(last)}\n`);
    return last.state === 'succeeded' ? ExitCode.OK : ExitCode.FAILED;
  });
}

async function doctorCommand(line: CommandLine, io: CliIo): Promise<number> {
  const config = await loadConfig(line, io.env);
  const checks = await runDoctor({
    config,
    apiSocket: typeof line.values['socket'] === 'string' ? line.values['socket'] : io.env['THAW_API_SOCKET'] ?? config.api.socket,
    requireGpu: line.values['require-gpu'] === true,
    ...(typeof line.values['containerd'] === 'string' ? { containerd: line.values['containerd'] } : {}),
  });
  const ok = checks.every((c) => c.status !== 'fail');
  if (line.values['json']) json(io, { ok, checks });
  else io.stdout(`${renderDoctor(checks)}\n`);
  return ok ? ExitCode.OK : ExitCode.FAILED;
}

async function installCommand(line: CommandLine, io: CliIo): Promise<number> {
  const root = line.values['root'];
  if (typeof root !== 'string') throw new UsageError('--root DIR is required', 'install');
  const report = await installThaw({
    ...defaultInstallSources(),
    ...(typeof line.values['toolkit-dir'] === 'string' ? { toolkitDir: line.values['toolkit-dir'] } : {}),
    root,
    force: line.values['force'] === true,
    progress: (l) => io.stderr(`${l}\n`),
  });
  if (line.values['json']) json(io, report);
  else io.stdout(report.files.length === 0 ? `up to date under ${report.root}\n` : `installed ${report.files.join(', ')} (${report.bytes} bytes) under ${report.root}\n`);
  return ExitCode.OK;
}

/** The store and the registry access `push`/`pull` use: the agent's configuration, overridden by their flags. */
async function registryContext(line: CommandLine, io: CliIo, reference: string): Promise<{ store: LocalStore; access: RegistryAccess; modelDirs: string[] }> {
  const config = await loadConfig(line, io.env);
  const accessFile = typeof line.values['registry-config'] === 'string' ? line.values['registry-config'] : config.registry.config;
  const host = parseReference(reference).registry.toLowerCase();
  const access: RegistryAccess = accessFile !== '' ? { ...((await loadRegistryConfig(accessFile)).access?.[host] ?? {}) } : {};
  if (line.values['plain-http'] === true) access.plainHttp = true;
  const store = await openLocalStore({ root: config.paths.storeRoot });
  return { store, access, modelDirs: config.weights.modelDirs === '' ? [] : config.weights.modelDirs.split(':') };
}

async function pushCommand(line: CommandLine, io: CliIo): Promise<number> {
  const [, reference] = line.positionals as [string, string];
  const name = checkpointKeyOf(line);
  const keyFile = line.values['sign-key'];
  // The key first: a refused key costs no upload.
  const sign = typeof keyFile === 'string' ? await loadSigningKey(resolve(keyFile)) : undefined;
  const { store, access, modelDirs } = await registryContext(line, io, reference);
  io.stderr(`pushing ${name} to ${reference}${sign ? `, signed with ${sign.source}` : ''}\n`);
  const extra = line.values['weights-dir'];
  const withWeights = line.values['with-weights'] === true ? { dirs: [...(Array.isArray(extra) ? extra.map(String) : []), ...modelDirs] } : undefined;
  const r = await pushCheckpoint({ store, name, reference, access, ...(withWeights ? { withWeights } : {}), ...(sign ? { sign } : {}) });
  if (line.values['json']) json(io, r);
  else io.stdout(`${r.reference}\n${(r.bytesUploaded / 1e9).toFixed(2)} GB uploaded, ${(r.bytesSkipped / 1e9).toFixed(2)} GB already there${r.weightsLayers > 0 ? `, ${r.weightsLayers} weights layers (${(r.weightsBytes / 1e9).toFixed(2)} GB)` : ''}, ${(r.ms / 1000).toFixed(1)} s${r.signature ? `\nsigned: ${r.signature.tag}` : ''}\n`);
  return ExitCode.OK;
}

async function pullCommand(line: CommandLine, io: CliIo): Promise<number> {
  const [reference] = line.positionals as [string];
  const { store, access } = await registryContext(line, io, reference);
  let lastReport = 0;
  const r = await pullCheckpoint({
    store,
    reference,
    access,
    onProgress: (bytes) => {
      if (bytes - lastReport < 256 * 2 ** 20) return;
      lastReport = bytes;
      io.stderr(`pulled ${(bytes / 1e9).toFixed(2)} GB\n`);
    },
  });
  const { checkpoint: _opened, ...result } = r;
  if (line.values['json']) json(io, result);
  else io.stdout(`${r.name}\n${r.alreadyPresent ? 'already in the store' : `${(r.bytesFetched / 1e9).toFixed(2)} GB fetched, ${(r.bytesFromCache / 1e9).toFixed(2)} GB from the cache, ${(r.ms / 1000).toFixed(1)} s`}\n`);
  return ExitCode.OK;
}

/**
 * The store key of the checkpoint the first positional names: `namespace/name` as given, a bare name in
 * --namespace (default "default"), a pulled checkpoint's `oci-<digest>` as it is.
 */
function checkpointKeyOf(line: CommandLine): string {
  const text = line.positionals[0]!;
  const resolved = resolveStoreKey(text, (line.values['namespace'] as string | undefined) ?? DEFAULT_NAMESPACE, { allowPulled: true });
  if ('reason' in resolved) throw new UsageError(resolved.reason, line.command);
  return resolved.key;
}

async function dispatch(line: CommandLine, io: CliIo): Promise<number> {
  const asJson = line.values['json'] === true;
  switch (line.command) {
    case 'agent':
      return agentCommand(line, io);
    case 'checkpoint':
      return checkpointCommand(line, io);
    case 'list':
      return withClient(line, io, async (c) => {
        const { checkpoints, snapshot_pods } = await c.list((line.values['namespace'] as string | undefined) ?? '');
        if (asJson) json(io, checkpoints);
        else io.stdout(`${renderList(checkpoints, snapshot_pods ?? [])}\n`);
        return ExitCode.OK;
      });
    case 'inspect':
      return withClient(line, io, async (c) => {
        const r = await c.inspect(checkpointKeyOf(line));
        if (asJson) json(io, { ...r, manifest: JSON.parse(r.manifest_json), manifest_json: undefined });
        else io.stdout(`${renderInspect(r)}\n`);
        return ExitCode.OK;
      });
    case 'delete':
      return withClient(line, io, async (c) => {
        const name = checkpointKeyOf(line);
        await c.delete(name);
        if (asJson) json(io, { deleted: name });
        else io.stdout(`deleted ${name}\n`);
        return ExitCode.OK;
      });
    case 'clear-failure':
      return withClient(line, io, async (c) => {
        const name = checkpointKeyOf(line);
        const { cleared } = await c.clearRestoreFailure(name);
        if (asJson) json(io, { name, cleared });
        else io.stdout(cleared ? `cleared the restore-failure mark of ${name}: pods naming it restore from it again\n` : `${name} has no restore-failure mark\n`);
        return ExitCode.OK;
      });
    case 'gc':
      return withClient(line, io, async (c) => {
        const r = await c.collectGarbage(line.values['dry-run'] === true);
        if (asJson) json(io, r);
        else io.stdout(`${renderGc(r)}\n`);
        return ExitCode.OK;
      });
    case 'status':
      return withClient(line, io, async (c) => {
        const s = await c.status();
        if (asJson) json(io, s);
        else io.stdout(`${renderStatus(s)}\n`);
        return ExitCode.OK;
      });
    case 'doctor':
      return doctorCommand(line, io);
    case 'install':
      return installCommand(line, io);
    case 'push':
      return pushCommand(line, io);
    case 'pull':
      return pullCommand(line, io);
    default:
      throw new UsageError(`unknown command ${line.command}`);
  }
}

/** Exit codes of what push/pull do here, without the agent: a bad reference is usage, an absent one not found. */
function localExitCode(err: unknown): number {
  if (!isThawError(err)) return ExitCode.FAILED;
  if (err.code === OciErrorCode.INVALID_REFERENCE) return ExitCode.USAGE;
  if (err.code === OciErrorCode.NOT_FOUND || err.code === StoreErrorCode.NOT_FOUND || err.code === OciErrorCode.WEIGHTS_SOURCE_NOT_FOUND) return ExitCode.NOT_FOUND;
  return ExitCode.FAILED;
}

/** Runs one command line; returns the exit code (never throws). */
export async function runCli(argv: readonly string[], io: CliIo = processIo): Promise<number> {
  let line: CommandLine;
  try {
    line = parseCommandLine(argv);
  } catch (err) {
    const cmd = err instanceof UsageError && err.command ? ` ${err.command}` : '';
    io.stderr(`thaw${cmd}: ${errorMessage(err)}\n${cmd ? `(thaw${cmd} --help for usage)` : '(thaw --help for usage)'}\n`);
    return ExitCode.USAGE;
  }
  if (line.help) {
    io.stdout(`${line.command ? commandHelp(line.command) : topLevelHelp()}\n`);
    return ExitCode.OK;
  }
  try {
    return await dispatch(line, io);
  } catch (err) {
    const code = err instanceof ApiCallError ? err.exitCode : err instanceof UsageError || err instanceof ConfigError ? ExitCode.USAGE : localExitCode(err);
    const thawCode = err instanceof ApiCallError ? err.thawCode : isThawError(err) ? err.code : undefined;
    if (line.values['json'] === true) json(io, { error: { code: thawCode ?? 'FAILED', message: errorMessage(err), exitCode: code } });
    io.stderr(`thaw ${line.command}: ${errorMessage(err)}${thawCode ? ` (${thawCode})` : ''}\n`);
    return code;
  }
}

/** Runs the process's own command line and exits with its code. */
export function runFromProcess(): void {
  runCli(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
      // The agent has closed its servers; a CLI command has closed its channel. Exit now rather than wait for
      // a stray handle (grpc-js keeps timers a while).
      setImmediate(() => process.exit(code));
    },
    (err: unknown) => {
      process.stderr.write(`thaw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(ExitCode.FAILED);
    },
  );
}

const invokedDirectly = ((): boolean => {
  try {
    return process.argv[1] !== undefined && pathToFileURL(realpathSync(process.argv[1])).href === import.meta.url;
  } catch {
    return false;
  }
})();
if (invokedDirectly) runFromProcess();
