/**
 * A real OCI registry (Debian's docker-registry, provisioned by provisionRegistry) on a loopback port, for the
 * registry store's tests and bench:registry: its own config and storage directory under
 * `/tmp/thaw-registry-*`, optional htpasswd (Basic) or token (Bearer) auth and TLS. stop() ends it and removes
 * the directory; kill() ends it abruptly (SIGKILL) to test a registry that dies mid-transfer.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { StackError, StackErrorCode } from './errors.js';
import { sleep, tail } from './exec.js';
import { isRegistryProvisioned, registryPaths } from './registry-provision.js';
import { DEFAULT_STACK_ROOT } from './paths.js';

export interface RegistryAuthHtpasswd {
  kind: 'htpasswd';
  /** Path of an htpasswd file with bcrypt entries. */
  file: string;
}

export interface RegistryAuthToken {
  kind: 'token';
  /** The token server's URL (the client is sent there by the Bearer challenge). */
  realm: string;
  service: string;
  issuer: string;
  /** PEM certificate(s) whose keys sign the tokens. */
  rootCertBundle: string;
}

export interface RegistryOptions {
  stackRoot?: string;
  auth?: RegistryAuthHtpasswd | RegistryAuthToken;
  /** PEM files of the server certificate and key: the registry speaks https. */
  tls?: { certFile: string; keyFile: string; ca: string };
  /** Start within this long (default 20 s). */
  startTimeoutMs?: number;
  /** Use this storage directory (to restart a registry on the same data); default a fresh one. */
  storageDir?: string;
  port?: number;
}

export interface RunningRegistry {
  /** `127.0.0.1:<port>`, the registry part of references. */
  host: string;
  port: number;
  /** `http://127.0.0.1:<port>` or https. */
  url: string;
  dir: string;
  storageDir: string;
  /** Where the blob with this digest's bytes lie in the storage (for tests that damage a blob). */
  blobDataPath(digest: string): string;
  process: ChildProcess;
  /** The registry's stderr so far (its log). */
  log(): string;
  stop(): Promise<void>;
  /** SIGKILL, keeping the directory (a later start may reuse storageDir). */
  kill(): Promise<void>;
}

export async function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

function configYaml(o: { port: number; storageDir: string; auth?: RegistryOptions['auth']; tls?: RegistryOptions['tls'] }): string {
  const q = (s: string): string => JSON.stringify(s); // JSON strings are YAML strings
  const lines = [
    'version: 0.1',
    'log:',
    '  level: warn',
    '  accesslog:',
    '    disabled: true',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${q(o.storageDir)}`,
    '  delete:',
    '    enabled: true',
    '  maintenance:',
    '    uploadpurging:',
    '      enabled: false',
    'http:',
    `  addr: ${q(`127.0.0.1:${o.port}`)}`,
    `  secret: ${q(`thaw-test-${process.pid}-${o.port}`)}`,
  ];
  if (o.tls) lines.push('  tls:', `    certificate: ${q(o.tls.certFile)}`, `    key: ${q(o.tls.keyFile)}`);
  if (o.auth?.kind === 'htpasswd') lines.push('auth:', '  htpasswd:', '    realm: thaw-test', `    path: ${q(o.auth.file)}`);
  if (o.auth?.kind === 'token') {
    lines.push('auth:', '  token:', `    realm: ${q(o.auth.realm)}`, `    service: ${q(o.auth.service)}`, `    issuer: ${q(o.auth.issuer)}`, `    rootcertbundle: ${q(o.auth.rootCertBundle)}`);
  }
  return `${lines.join('\n')}\n`;
}

async function probe(url: string, ca: string | undefined): Promise<number | undefined> {
  return new Promise((resolve) => {
    const mod = url.startsWith('https:') ? https : http;
    const req = mod.get(`${url}/v2/`, { ...(ca ? { ca } : {}), timeout: 1000 }, (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('error', () => resolve(undefined));
    req.on('timeout', () => req.destroy());
  });
}

/** Starts docker-registry on a free loopback port and waits until /v2/ answers. */
export async function startRegistry(o: RegistryOptions = {}): Promise<RunningRegistry> {
  const paths = registryPaths(o.stackRoot ?? DEFAULT_STACK_ROOT);
  if (!(await isRegistryProvisioned(paths.root))) {
    throw new StackError(StackErrorCode.NOT_PROVISIONED, `the registry is not provisioned under ${paths.prefix} (run scripts/setup.sh)`, {
      step: 'start registry',
      evidence: { prefix: paths.prefix },
    });
  }
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-registry-'));
  const storageDir = o.storageDir ?? path.join(dir, 'storage');
  const port = o.port ?? (await freeLoopbackPort());
  const configFile = path.join(dir, 'config.yml');
  await writeFile(configFile, configYaml({ port, storageDir, ...(o.auth ? { auth: o.auth } : {}), ...(o.tls ? { tls: o.tls } : {}) }), { mode: 0o600 });
  const child = spawn(paths.binary, ['serve', configFile], { stdio: ['ignore', 'ignore', 'pipe'], env: { PATH: '/usr/bin:/bin' } });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr = tail(stderr + d.toString('utf8'), 20_000);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const url = `${o.tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  const deadline = Date.now() + (o.startTimeoutMs ?? 20_000);
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      await rm(dir, { recursive: true, force: true });
      throw new StackError(StackErrorCode.REGISTRY_START_FAILED, `docker-registry exited at start (${child.exitCode ?? child.signalCode})`, { step: 'start registry', evidence: { stderr: tail(stderr) } });
    }
    const status = await probe(url, o.tls?.ca);
    if (status === 200 || status === 401) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      await exited;
      await rm(dir, { recursive: true, force: true });
      throw new StackError(StackErrorCode.REGISTRY_START_FAILED, `docker-registry did not answer on ${url} in time`, { step: 'start registry', evidence: { stderr: tail(stderr) } });
    }
    await sleep(50);
  }
  const end = async (sig: NodeJS.Signals): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill(sig);
      await exited;
    }
  };
  return {
    host: `127.0.0.1:${port}`,
    port,
    url,
    dir,
    storageDir,
    blobDataPath: (digest) => {
      const hex = digest.replace(/^sha256:/, '');
      return path.join(storageDir, 'docker/registry/v2/blobs/sha256', hex.slice(0, 2), hex, 'data');
    },
    process: child,
    log: () => stderr,
    stop: async () => {
      await end('SIGTERM');
      await rm(dir, { recursive: true, force: true });
    },
    kill: () => end('SIGKILL'),
  };
}
