/**
 * Test helpers around a real docker-registry on loopback (src/node-stack/registry.ts): a CA and a server
 * certificate made with the openssl CLI, an htpasswd file (bcrypt), and a tiny token server that signs
 * RS256 JWTs the registry's token auth accepts (x5c header holding the self-signed signing certificate,
 * which is also the registry's rootcertbundle).
 */
import { execFile } from 'node:child_process';
import { createSign, randomUUID } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import bcrypt from 'bcryptjs';

const execFileP = promisify(execFile);

export async function openssl(args: string[], cwd: string): Promise<void> {
  await execFileP('openssl', args, { cwd, timeout: 60_000 });
}

/** A CA and a server certificate for 127.0.0.1 signed by it; paths under `dir`. */
export async function makeTlsFiles(dir: string): Promise<{ caFile: string; ca: string; certFile: string; keyFile: string }> {
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=thaw test CA'], dir);
  await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1'], dir);
  await writeFile(join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  await openssl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'server.pem', '-days', '2', '-extfile', 'san.ext'], dir);
  return { caFile: join(dir, 'ca.pem'), ca: await readFile(join(dir, 'ca.pem'), 'utf8'), certFile: join(dir, 'server.pem'), keyFile: join(dir, 'server.key') };
}

export async function writeHtpasswd(file: string, users: Record<string, string>): Promise<void> {
  const lines = Object.entries(users).map(([u, p]) => `${u}:${bcrypt.hashSync(p, 5)}`);
  await writeFile(file, `${lines.join('\n')}\n`, { mode: 0o600 });
}

export interface TokenServer {
  realm: string;
  service: string;
  issuer: string;
  certFile: string;
  /** Requests the server answered, with the scope and whether the credentials were right. */
  /** Every request: its scope, whether it was granted, whether it carried an Authorization header at all. */
  requests: Array<{ scope: string | null; granted: boolean; sentCredentials: boolean }>;
  close(): Promise<void>;
}

const b64url = (data: Buffer | string): string => Buffer.from(data).toString('base64url');

/**
 * A token server: GET /token?service=&scope= with Basic credentials `user:password` answers a JWT granting
 * the requested actions; anything else 401.
 */
export async function startTokenServer(dir: string, user: string, password: string): Promise<TokenServer> {
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'token.key', '-out', 'token.pem', '-days', '2', '-subj', '/CN=thaw test token issuer'], dir);
  const key = await readFile(join(dir, 'token.key'), 'utf8');
  const certPem = await readFile(join(dir, 'token.pem'), 'utf8');
  const certDer = Buffer.from(certPem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
  const service = 'thaw-test-registry';
  const issuer = 'thaw-test-issuer';
  const requests: TokenServer['requests'] = [];
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const scope = url.searchParams.get('scope');
    const expected = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
    const granted = req.headers.authorization === expected && url.pathname === '/token';
    requests.push({ scope, granted, sentCredentials: req.headers.authorization !== undefined });
    if (!granted) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":"bad credentials"}');
      return;
    }
    const access = scope
      ? [{ type: scope.split(':')[0], name: scope.split(':').slice(1, -1).join(':'), actions: (scope.split(':').pop() ?? '').split(',') }]
      : [];
    const now = Math.floor(Date.now() / 1000);
    const header = { alg: 'RS256', typ: 'JWT', x5c: [certDer.toString('base64')] };
    const claims = { iss: issuer, sub: user, aud: service, exp: now + 300, nbf: now - 10, iat: now, jti: randomUUID(), access };
    const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    const signature = createSign('RSA-SHA256').update(signingInput).sign(key);
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: `${signingInput}.${b64url(signature)}`, expires_in: 300 }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    service,
    issuer,
    certFile: join(dir, 'token.pem'),
    requests,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/**
 * A TCP proxy in front of the registry that breaks the first `breaks` connections carrying a body larger
 * than `afterBytes` (in either direction) once that many bytes passed: a transfer broken in the middle.
 */
export async function startBreakingProxy(
  target: { host: string; port: number },
  o: { afterBytes: number; breaks: number; onBytes?: (totalBytes: number) => void },
): Promise<{ host: string; broken: () => number; close: () => Promise<void> }> {
  let total = 0;
  let broken = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    sockets.add(client);
    sockets.add(upstream);
    let passed = 0;
    const count = (n: number): boolean => {
      passed += n;
      total += n;
      o.onBytes?.(total);
      if (broken < o.breaks && passed > o.afterBytes) {
        broken++;
        client.destroy();
        upstream.destroy();
        return false;
      }
      return true;
    };
    client.on('data', (d: Buffer) => {
      if (count(d.length)) upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => {
      if (count(d.length)) client.write(d);
    });
    const end = (): void => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('close', end);
    upstream.on('close', end);
    client.on('error', end);
    upstream.on('error', end);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    host: `127.0.0.1:${port}`,
    broken: () => broken,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/**
 * A TCP proxy in front of the registry that trickles: on each connection the first `freeBytes` of the
 * registry's answers pass at once (manifests, config blobs), then `dripBytes` every `everyMs` — a registry that
 * keeps a transfer alive without ever finishing it. `release()` lets everything through from then on.
 */
export async function startTricklingProxy(
  target: { host: string; port: number },
  o: { freeBytes: number; dripBytes: number; everyMs: number },
): Promise<{ host: string; release: () => void; connections: () => number; close: () => Promise<void> }> {
  let released = false;
  const pending = new Set<() => void>();
  const sockets = new Set<net.Socket>();
  let open = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    sockets.add(client);
    sockets.add(upstream);
    open++;
    let passed = 0;
    let queue = Buffer.alloc(0);
    const flush = (): void => {
      if (queue.length === 0) return;
      const n = released ? queue.length : Math.min(queue.length, o.dripBytes);
      client.write(queue.subarray(0, n));
      queue = queue.subarray(n);
    };
    const timer = setInterval(flush, o.everyMs);
    pending.add(flush);
    client.on('data', (d: Buffer) => upstream.write(d));
    upstream.on('data', (d: Buffer) => {
      // In order: nothing passes while older bytes wait in the queue.
      if (queue.length === 0 && (released || passed + d.length <= o.freeBytes)) {
        passed += d.length;
        client.write(d);
        return;
      }
      queue = Buffer.concat([queue, d]);
    });
    const end = (): void => {
      clearInterval(timer);
      pending.delete(flush);
      if (sockets.delete(client)) open--;
      sockets.delete(upstream);
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('close', end);
      s.on('error', end);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    host: `127.0.0.1:${port}`,
    release: () => {
      released = true;
      for (const f of pending) f();
    },
    connections: () => open,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
