/**
 * The thaw NRI plugin as a process, in either of NRI's two modes:
 *   pre-launched:      node dist/src/agent/nri-main.js --socket /var/run/nri/nri.sock [options]
 *   runtime-launched:  containerd starts an executable named NN-thaw from its plugin_path with
 *                      NRI_PLUGIN_SOCKET=3 (and no PATH, and stdout/stderr on /dev/null: hence --log-file).
 * Options: --annotation-prefix P (default thaw.dev/), --control-root DIR (default /run/thaw/control),
 * --store-root DIR (default /var/lib/thaw/checkpoints), --stack-prefix DIR (the toolkit: CRIU, GNU tar, gzip;
 * default /opt/thaw/stack/1.7), --thaw-pause PATH (default native/build/thaw-pause of this package),
 * --work-root DIR (CRIU work dirs of restores, default /run/thaw/restore),
 * --libcuda PATH and --libnvml PATH (the CUDA driver and NVML; default the system's, found by the dynamic
 * loader; none → workers are checkpointed as CPU-only), --cuda-lock-timeout-ms MS,
 * --name N --idx NN (pre-launched identity), --log-file FILE, --log-level debug|info|warn|error.
 * Stops on SIGTERM/SIGINT; a launched plugin also exits when containerd closes its socket.
 *
 * The long-running `thaw agent` (issue "node agent") will host these same handlers next to the engine, the
 * store and the control API; this entry point is the plugin alone.
 */
import { createWriteStream } from 'node:fs';
import { parseArgs } from 'node:util';
import { createJsonLogger, parseLogLevel } from '../log.js';
import { fileURLToPath } from 'node:url';
import { createNriPlugin, readLaunchEnv } from '../nri-plugin/plugin.js';
import { DEFAULT_ANNOTATION_PREFIX, validateAnnotationPrefix } from '../nri-plugin/policy.js';
import { DEFAULT_CONTROL_ROOT } from '../sdk/control-dir.js';
import { errorMessage } from '../errors.js';
import { loadRegistryConfig } from './registry-config.js';
import type { RegistrySourceOptions } from './checkpoint-sources.js';
import { createThawEngine, DEFAULT_RESTORE_WORK_ROOT, DEFAULT_STORE_ROOT } from './engine.js';

export const DEFAULT_STACK_PREFIX = '/opt/thaw/stack/1.7';
/** This file is dist/src/agent/nri-main.js: the package root is three levels up. */
const PACKAGE_ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const DEFAULT_THAW_PAUSE = `${PACKAGE_ROOT}native/build/thaw-pause`;
const HOOK_MAIN = fileURLToPath(new URL('../oci-hooks/main.js', import.meta.url));

export const DEFAULT_PLUGIN_NAME = 'thaw';
export const DEFAULT_PLUGIN_IDX = '50';

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      socket: { type: 'string' },
      'annotation-prefix': { type: 'string', default: DEFAULT_ANNOTATION_PREFIX },
      'control-root': { type: 'string', default: DEFAULT_CONTROL_ROOT },
      'store-root': { type: 'string', default: DEFAULT_STORE_ROOT },
      'stack-prefix': { type: 'string', default: DEFAULT_STACK_PREFIX },
      'thaw-pause': { type: 'string', default: DEFAULT_THAW_PAUSE },
      'work-root': { type: 'string', default: DEFAULT_RESTORE_WORK_ROOT },
      libcuda: { type: 'string' },
      libnvml: { type: 'string' },
      'cuda-lock-timeout-ms': { type: 'string' },
      'shared-store-root': { type: 'string' },
      // JSON: { "access": { "<host:port>": { "plainHttp"?, "caFile"?, "credentialsFile"? } }, "resolveTimeoutMs"? }
      'registry-config': { type: 'string' },
      name: { type: 'string', default: DEFAULT_PLUGIN_NAME },
      idx: { type: 'string', default: DEFAULT_PLUGIN_IDX },
      'log-file': { type: 'string' },
      'log-level': { type: 'string', default: 'info' },
    },
    strict: true,
  });
  const logFile = values['log-file'];
  const stream = logFile ? createWriteStream(logFile, { flags: 'a', mode: 0o600 }) : undefined;
  const logger = createJsonLogger({
    level: parseLogLevel(values['log-level']),
    ...(stream ? { write: (line: string) => void stream.write(line) } : {}),
    fields: { component: 'thaw-nri' },
  });

  const prefix = values['annotation-prefix'] as string;
  const badPrefix = validateAnnotationPrefix(prefix);
  if (badPrefix) {
    logger.error(`--annotation-prefix: ${badPrefix}`);
    return 2;
  }

  const lockTimeout = values['cuda-lock-timeout-ms'];
  const cudaLockTimeoutMs = lockTimeout === undefined ? undefined : Number(lockTimeout);
  if (cudaLockTimeoutMs !== undefined && (!Number.isInteger(cudaLockTimeoutMs) || cudaLockTimeoutMs <= 0)) {
    logger.error(`--cuda-lock-timeout-ms must be a positive integer, got ${JSON.stringify(lockTimeout)}`);
    return 2;
  }

  let registry: RegistrySourceOptions | undefined;
  if (values['registry-config'] !== undefined) {
    try {
      registry = await loadRegistryConfig(values['registry-config']);
    } catch (err) {
      logger.error(`--registry-config: ${errorMessage(err)}`);
      return 2;
    }
  }

  const launched = process.env['NRI_PLUGIN_SOCKET'] !== undefined;
  const identity = launched ? readLaunchEnv() : { name: values.name as string, idx: values.idx as string, fd: undefined };
  const engine = await createThawEngine({
    logger,
    annotationPrefix: prefix,
    controlRoot: values['control-root'] as string,
    storeRoot: values['store-root'] as string,
    toolkitDir: values['stack-prefix'] as string,
    thawPausePath: values['thaw-pause'] as string,
    hookArgv: [process.execPath, HOOK_MAIN],
    workRoot: values['work-root'] as string,
    ...(values.libcuda !== undefined ? { libcudaPath: values.libcuda } : {}),
    ...(values.libnvml !== undefined ? { libnvmlPath: values.libnvml } : {}),
    ...(cudaLockTimeoutMs !== undefined ? { cudaLockTimeoutMs } : {}),
    ...(values['shared-store-root'] !== undefined ? { sharedStoreRoot: values['shared-store-root'] } : {}),
    ...(registry !== undefined ? { registry } : {}),
  });
  const handlers = engine.handlers;
  const plugin = createNriPlugin({
    name: identity.name,
    idx: identity.idx,
    handlers,
    logger,
    // Per-request service time at debug level: what bench:nri reads to separate the plugin's own cost from
    // the machine's noise.
    onConfigure: (info) => engine.setRuntimeVersion(info.version),
    onRequestServed: (served) => logger.debug('nri request served', { method: served.method, durationMs: Number(served.durationMs.toFixed(3)), code: served.code }),
    ...(launched ? { fd: identity.fd as number } : { socketPath: values.socket ?? '/var/run/nri/nri.sock' }),
  });
  const stop = (): void => void plugin.close();
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  logger.info('thaw NRI plugin starting', { mode: launched ? 'runtime-launched' : 'pre-launched', pid: process.pid });
  void plugin.start().catch(() => undefined); // failures surface through `stopped`
  const info = await plugin.stopped;
  await engine.close();
  logger.info('thaw NRI plugin stopped', { reason: info.reason, ...(info.error ? { error: info.error } : {}) });
  await new Promise<void>((resolve) => (stream ? stream.end(resolve) : resolve()));
  return info.reason === 'error' ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`thaw-nri: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    process.exit(1);
  },
);
