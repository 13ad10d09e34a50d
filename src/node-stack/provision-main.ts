/**
 * CLI entry of stack provisioning, run by scripts/setup.sh:
 *   node dist/src/node-stack/provision-main.js --flavor 1.7|2.1 [--root DIR] [--force]
 *   node dist/src/node-stack/provision-main.js --registry [--root DIR] [--force]   (the OCI registry of the tests)
 *   node dist/src/node-stack/provision-main.js --peer-tools [--root DIR] [--force] (cosign, oras, skopeo, kustomize, kubectl, notation)
 *   node dist/src/node-stack/provision-main.js --go-nri-plugin [--root DIR] [--force]   (bench:nri's Go anchor plugin)
 *   node dist/src/node-stack/provision-main.js --native-deps [--root DIR] [--force]     (zstd for native/, static)
 * Prints one JSON line with the result; on failure one stderr line with the error code and message,
 * then the error's JSON, and exits 1.
 */
import { createJsonLogger, parseLogLevel } from '../log.js';
import { isThawError } from '../errors.js';
import { parseFlavor, DEFAULT_STACK_ROOT } from './paths.js';
import { provisionPeerTools } from './peer-tools.js';
import { provisionStack } from './provision.js';
import { provisionRegistry } from './registry-provision.js';
import { provisionGoNriPlugin } from './go-nri-plugin.js';
import { provisionNativeDeps } from './native-deps.js';

async function main(argv: string[]): Promise<number> {
  let flavorArg: string | undefined;
  let registry = false;
  let peerTools = false;
  let goNriPlugin = false;
  let nativeDeps = false;
  let root = DEFAULT_STACK_ROOT;
  let force = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--flavor') flavorArg = argv[++i];
    else if (a === '--root') root = argv[++i] ?? root;
    else if (a === '--force') force = true;
    else if (a === '--registry') registry = true;
    else if (a === '--peer-tools') peerTools = true;
    else if (a === '--go-nri-plugin') goNriPlugin = true;
    else if (a === '--native-deps') nativeDeps = true;
    else {
      process.stderr.write(`provision: unknown argument ${a}\nusage: provision-main --flavor 1.7|2.1 | --registry | --peer-tools | --go-nri-plugin | --native-deps [--root DIR] [--force]\n`);
      return 2;
    }
  }
  const logger = createJsonLogger({ level: parseLogLevel(process.env.THAW_LOG_LEVEL) });
  const controller = new AbortController();
  const onSignal = (): void => controller.abort(new Error('interrupted'));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    if (goNriPlugin) {
      const r = await provisionGoNriPlugin({ root, force, logger, signal: controller.signal });
      process.stdout.write(`${JSON.stringify({ component: 'go-nri-plugin', binary: r.binary, built: r.built, goVersion: r.stamp.goVersion, warnings: r.stamp.warnings })}\n`);
      return 0;
    }
    if (nativeDeps) {
      const r = await provisionNativeDeps({ root, force, logger, signal: controller.signal });
      process.stdout.write(`${JSON.stringify({ component: 'native-deps', prefix: r.paths.prefix, built: r.built, versions: r.stamp.versions, warnings: r.stamp.warnings })}\n`);
      return 0;
    }
    if (registry) {
      const r = await provisionRegistry({ root, force, logger, signal: controller.signal });
      process.stdout.write(`${JSON.stringify({ component: 'registry', prefix: r.paths.prefix, built: r.built, version: r.stamp.version, warnings: r.stamp.warnings })}\n`);
      return 0;
    }
    if (peerTools) {
      const r = await provisionPeerTools({ root, force, logger, signal: controller.signal });
      process.stdout.write(`${JSON.stringify({ component: 'peer-tools', prefix: r.paths.prefix, built: r.built, versions: r.stamp.versions, warnings: r.stamp.warnings })}\n`);
      return 0;
    }
    const flavor = parseFlavor(flavorArg ?? process.env.THAW_CONTAINERD);
    const r = await provisionStack({ flavor, root, force, logger, signal: controller.signal });
    process.stdout.write(`${JSON.stringify({
      flavor, prefix: r.paths.prefix, built: r.built, durationMs: r.durationMs,
      versions: r.stamp.versions, warnings: r.stamp.warnings,
    })}\n`);
    return 0;
  } catch (err) {
    if (isThawError(err)) {
      process.stderr.write(`provision: ${err.code}: ${err.message}\n${JSON.stringify(err.toJSON(), null, 2)}\n`);
    } else {
      process.stderr.write(`provision: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    }
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
