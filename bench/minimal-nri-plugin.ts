/**
 * A do-nothing NRI plugin with the same event subscriptions as thaw's with its native hook (RunPodSandbox,
 * StopPodSandbox, RemovePodSandbox, CreateContainer, StopContainer, RemoveContainer, Synchronize: no
 * PostStartContainer, src/agent/thaw-nri.ts), for bench:nri: what containerd's NRI costs by itself, so that thaw's
 * own share can be told apart. Usage: node dist/bench/minimal-nri-plugin.js <nri socket> <log file> [create-only]
 * (`create-only`: subscribe to CreateContainer alone — the least any NRI plugin can cost).
 */
import { createWriteStream } from 'node:fs';
import { createJsonLogger } from '../src/log.js';
import { createNriPlugin } from '../src/nri-plugin/index.js';

const [socketPath, logFile, mode] = process.argv.slice(2);
if (!socketPath || !logFile) {
  process.stderr.write('usage: minimal-nri-plugin <nri socket> <log file>\n');
  process.exit(2);
}
const stream = createWriteStream(logFile, { flags: 'a' });
const logger = createJsonLogger({ level: 'info', write: (line) => void stream.write(line) });
const plugin = createNriPlugin({
  name: 'minimal',
  idx: '50',
  logger,
  socketPath,
  handlers:
    mode === 'create-only'
      ? { createContainer: () => undefined }
      : {
          synchronize: () => undefined,
          runPodSandbox: () => undefined,
          stopPodSandbox: () => undefined,
          removePodSandbox: () => undefined,
          createContainer: () => undefined,
          stopContainer: () => undefined,
          removeContainer: () => undefined,
        },
});
process.on('SIGTERM', () => void plugin.close());
void plugin.start().catch(() => undefined);
await plugin.stopped;
stream.end();
