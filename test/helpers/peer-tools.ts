/**
 * Running the peer tools (cosign, oras, skopeo, kustomize, kubectl, notation) that scripts/setup.sh provisions
 * under /opt/thaw/stack/peer-tools (src/node-stack/peer-tools.ts). A test that needs them fails when they are
 * absent (STACK_NOT_PROVISIONED), it never skips.
 *
 * Every run gets its own HOME and DOCKER_CONFIG (the tools keep credentials and caches there, never in the
 * machine's), and proxies that point at a closed loopback port for everything but loopback: a tool that tried
 * to reach the network (a transparency log, a TUF root) fails at once instead of hanging or passing by luck.
 */
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { StackError, StackErrorCode } from '../../src/node-stack/errors.js';
import { isPeerToolsProvisioned, peerToolsPaths, type PeerTool } from '../../src/node-stack/peer-tools.js';

const execFileP = promisify(execFile);

/** Where nothing listens: the discard port on loopback. */
const NOWHERE = 'http://127.0.0.1:9';

export interface PeerToolRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** Path of a provisioned tool; throws STACK_NOT_PROVISIONED when setup has not provisioned them. */
export async function peerTool(tool: PeerTool): Promise<string> {
  if (!(await isPeerToolsProvisioned())) {
    const { prefix } = peerToolsPaths();
    throw new StackError(StackErrorCode.NOT_PROVISIONED, `the peer tools are not provisioned under ${prefix} (run scripts/setup.sh)`, {
      step: 'find peer tool', evidence: { tool, prefix },
    });
  }
  return peerToolsPaths().tools[tool];
}

/**
 * Runs a tool with `home` as its HOME (created if missing). Resolves with the exit code and output: a non-zero
 * exit is a result, not an exception, so a test can assert a refusal.
 */
export async function runPeerTool(tool: PeerTool, args: string[], o: { home: string; cwd?: string; env?: Record<string, string>; timeoutMs?: number }): Promise<PeerToolRun> {
  const file = await peerTool(tool);
  await mkdir(o.home, { recursive: true, mode: 0o700 });
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    HOME: o.home,
    DOCKER_CONFIG: join(o.home, '.docker'),
    HTTPS_PROXY: NOWHERE,
    HTTP_PROXY: NOWHERE,
    NO_PROXY: '127.0.0.1,localhost',
    ...o.env,
  };
  try {
    const r = await execFileP(file, args, { cwd: o.cwd, env, timeout: o.timeoutMs ?? 120_000, maxBuffer: 64 * 1024 * 1024 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message?: string };
    if (typeof e.code !== 'number') throw err; // could not run at all (ENOENT, timeout): not a tool's answer
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** runPeerTool that throws (with the tool's stderr) on a non-zero exit. */
export async function peerToolOk(tool: PeerTool, args: string[], o: Parameters<typeof runPeerTool>[2]): Promise<PeerToolRun> {
  const r = await runPeerTool(tool, args, o);
  if (r.code !== 0) throw new Error(`${tool} ${args.join(' ')} exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r;
}
