/**
 * An in-process "runtime side" of NRI for tests, built from our own transport: it listens on a unix
 * socket, and per connection runs a ttrpc client on conn 1 (calling the plugin) and a ttrpc server on
 * conn 2 (serving Runtime.RegisterPlugin / UpdateContainers) — the roles containerd plays.
 *
 * Like containerd's adaptation, it sends Configure (and then Synchronize) from *inside* its RegisterPlugin
 * handling and answers RegisterPlugin only after Configure was answered: a plugin that blocks conn 1 on the
 * RegisterPlugin reply deadlocks here (and times out), as it would against containerd.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { createCollectingLogger, type CollectingLogger } from '../../src/log.js';
import { Mux } from '../../src/nri-plugin/mux.js';
import { PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN } from '../../src/nri-plugin/mux-framing.js';
import { TtrpcClient } from '../../src/nri-plugin/ttrpc-client.js';
import { decodeMessage, encodeMessage, nriType } from '../../src/nri-plugin/ttrpc-codec.js';
import { TtrpcServer, type TtrpcMethodHandler } from '../../src/nri-plugin/ttrpc-server.js';
import type { Container, PodSandbox } from '../../src/nri-plugin/nri-types.js';

export const PLUGIN_SERVICE = 'nri.pkg.api.v1alpha1.Plugin';

export interface FakeRuntimeOptions {
  runtimeName?: string;
  runtimeVersion?: string;
  requestTimeoutMs?: number;
  /** Synchronize content; `chunks` > 1 splits pods/containers over several `more=true` requests. */
  sync?: { pods: PodSandbox[]; containers: Container[]; chunks?: number } | false;
  /** Extra Runtime-service methods (e.g. a never-answering UpdateContainers). */
  runtimeMethods?: Record<string, TtrpcMethodHandler>;
}

export class FakeRuntimeConn {
  readonly client: TtrpcClient;
  readonly server: TtrpcServer;
  readonly mux: Mux;
  registered: { pluginName?: string; pluginIdx?: string } | undefined;
  configureEvents: number | undefined;
  configureAnsweredBeforeRegisterReply = false;
  syncReplies: Array<{ more?: boolean; update?: unknown[] }> = [];
  readonly handshake: Promise<void>;
  private resolveHandshake!: () => void;
  private rejectHandshake!: (e: Error) => void;

  constructor(socket: net.Socket, private readonly opts: FakeRuntimeOptions, readonly logger: CollectingLogger) {
    this.handshake = new Promise((res, rej) => {
      this.resolveHandshake = res;
      this.rejectHandshake = rej;
    });
    this.handshake.catch(() => undefined);
    this.mux = new Mux(socket, { logger });
    const c1 = this.mux.open(PLUGIN_SERVICE_CONN, { onData: (b) => this.client.receive(b), onClose: (e) => this.client.close(e) });
    const c2 = this.mux.open(RUNTIME_SERVICE_CONN, { onData: (b) => this.server.receive(b), onClose: (e) => this.server.close(e) });
    this.client = new TtrpcClient(c1, { logger });
    const methods = new Map<string, TtrpcMethodHandler>([
      ['RegisterPlugin', (call) => this.onRegister(call.payload)],
      ...Object.entries(opts.runtimeMethods ?? {}),
    ]);
    this.server = new TtrpcServer(c2, { logger, services: new Map([['nri.pkg.api.v1alpha1.Runtime', methods]]) });
  }

  private async onRegister(payload: Buffer): Promise<Uint8Array> {
    this.registered = decodeMessage(nriType('RegisterPluginRequest'), payload);
    const configured = this.configure();
    // Answer RegisterPlugin only once Configure was answered (or after 1.5 s): proves conn 1 is not
    // blocked on the RegisterPlugin reply.
    await Promise.race([configured.catch(() => undefined), new Promise((r) => setTimeout(r, 1500))]);
    this.configureAnsweredBeforeRegisterReply = this.configureEvents !== undefined;
    configured.then(() => this.synchronize()).then(() => this.resolveHandshake(), (e: Error) => this.rejectHandshake(e));
    return Buffer.alloc(0);
  }

  private async configure(): Promise<void> {
    const payload = encodeMessage(nriType('ConfigureRequest'), {
      config: '',
      runtimeName: this.opts.runtimeName ?? 'containerd',
      runtimeVersion: this.opts.runtimeVersion ?? 'v1.7.24',
      ...(this.opts.requestTimeoutMs ? { requestTimeout: this.opts.requestTimeoutMs, registrationTimeout: 5000 } : {}),
    });
    const reply = await this.client.call(PLUGIN_SERVICE, 'Configure', payload, { timeoutMs: this.opts.requestTimeoutMs ?? 2000 });
    this.configureEvents = decodeMessage<{ events?: number }>(nriType('ConfigureResponse'), reply).events ?? 0;
  }

  private async synchronize(): Promise<void> {
    if (this.opts.sync === false) return;
    const sync = this.opts.sync ?? { pods: [], containers: [] };
    const chunks = Math.max(1, sync.chunks ?? 1);
    for (let i = 0; i < chunks; i++) {
      const part = <T>(xs: T[]): T[] => xs.filter((_, j) => j % chunks === i);
      const payload = encodeMessage(nriType('SynchronizeRequest'), {
        pods: part(sync.pods),
        containers: part(sync.containers),
        more: i < chunks - 1,
      });
      const reply = await this.client.call(PLUGIN_SERVICE, 'Synchronize', payload, { timeoutMs: this.opts.requestTimeoutMs ?? 2000 });
      this.syncReplies.push(decodeMessage(nriType('SynchronizeResponse'), reply));
    }
  }

  /** Calls a Plugin method with an encoded request and decodes the reply as `replyType`. */
  async call<T>(method: string, requestType: string, request: object, replyType: string, timeoutMs = 2000): Promise<T> {
    const reply = await this.client.call(PLUGIN_SERVICE, method, encodeMessage(nriType(requestType), request), { timeoutMs });
    return decodeMessage<T>(nriType(replyType), reply);
  }

  disconnect(): void {
    this.mux.close();
  }
}

export class FakeRuntime {
  readonly connections: FakeRuntimeConn[] = [];
  readonly logger = createCollectingLogger({ side: 'runtime' });
  private waiters: Array<(c: FakeRuntimeConn) => void> = [];

  private constructor(
    readonly dir: string,
    readonly socketPath: string,
    private readonly server: net.Server,
    private readonly opts: FakeRuntimeOptions,
  ) {
    server.on('connection', (socket) => {
      const conn = new FakeRuntimeConn(socket, this.opts, this.logger);
      this.connections.push(conn);
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f(conn);
    });
  }

  /** Listens on a short /tmp path (unix socket paths must stay under 108 bytes). */
  static async listen(opts: FakeRuntimeOptions = {}): Promise<FakeRuntime> {
    const dir = mkdtempSync('/tmp/nri-');
    const socketPath = join(dir, 's');
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    return new FakeRuntime(dir, socketPath, server, opts);
  }

  /** The n-th connection (0-based), waiting for it if needed. */
  connection(n: number, timeoutMs = 5000): Promise<FakeRuntimeConn> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`connection ${n} did not arrive within ${timeoutMs} ms`)), timeoutMs);
      const check = (): void => {
        const c = this.connections[n];
        if (c) {
          clearTimeout(timer);
          resolve(c);
        } else this.waiters.push(check);
      };
      check();
    });
  }

  async close(): Promise<void> {
    for (const c of this.connections) c.disconnect();
    await new Promise<void>((r) => this.server.close(() => r()));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
