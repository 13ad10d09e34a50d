/**
 * The NRI plugin: what the rest of thaw uses to receive pod/container events from containerd and answer
 * them (adjustments, updates).
 *
 * Lifecycle (one `NriPlugin`):
 *
 *   idle ─start()→ connecting ─connected→ registering ─Configure answered→ configured ─Synchronize answered→ synchronized
 *        (any state) ─close()/AbortSignal/launched EOF→ closed
 *        (registering..synchronized) ─EOF, socket error (pre-launched)→ connecting (after a jittered back-off)
 *
 * - Pre-launched mode (`socketPath`): connect to the runtime's NRI socket; on EOF (containerd restart) or a
 *   failed connect, reconnect with exponential, jittered, capped back-off and register again.
 * - Runtime-launched mode (`fd`, normally 3 from NRI_PLUGIN_SOCKET): on EOF the plugin closes and `stopped`
 *   resolves with reason 'eof'; the launcher exits the process (containerd relaunches plugins at its start).
 * - RegisterPlugin goes out on conn 2 right after connecting while conn 1 is already served: containerd
 *   sends Configure *before* it answers RegisterPlugin, so conn 1 never waits on conn 2.
 * - The subscription is derived from which handler methods exist (plugin-handlers.ts), intersected with
 *   the runtime's valid events (0x7FF up to containerd 2.1, 0x3FFF from 2.2); it is never 0 (= "all" to the
 *   runtime).
 * - Conn 1 serves the Plugin service (plugin-service.ts); every handler runs under a deadline = the
 *   request's timeout minus a safety margin (plugin-guard.ts). A handler that overruns it or throws is
 *   logged loudly and answered with an empty, successful reply: containerd gets its answer in time and the
 *   pod proceeds without thaw (a pod never fails because of thaw). Only a handler that throws
 *   NriHandlerRejection makes the runtime fail the operation.
 * - This module owns the lifecycle above and the per-connection state (runtime, request timeout,
 *   subscription) that the Plugin service reports into.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import type { Logger } from '../log.js';
import { NriErrorCode, NriError } from './errors.js';
import { Mux } from './mux.js';
import { PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN } from './mux-framing.js';
import type { Container, ContainerEviction, ContainerUpdate, PodSandbox } from './nri-types.js';
import { eventMaskOf, type NriHandlers } from './plugin-handlers.js';
import { PluginService } from './plugin-service.js';
import type { RuntimeInfo } from './runtime-version.js';
import { TtrpcClient } from './ttrpc-client.js';
import { decodeMessage, encodeMessage, nriType } from './ttrpc-codec.js';
import { TtrpcServer, type TtrpcMethodHandler } from './ttrpc-server.js';
import { DEFAULT_NRI_SOCKET_PATH, MAX_TIMER_DELAY_MS } from '../defaults.js';

// The handler interfaces and the deadline margin live in their own modules; they are part of this one's API.
export {
  EVENT_HANDLER_NAMES,
  eventBit,
  eventMaskOf,
  type CreateContainerResult,
  type NriHandlerContext,
  type NriHandlers,
  type UpdateResult,
} from './plugin-handlers.js';
export { DEFAULT_HANDLER_SAFETY_MARGIN_MS } from './plugin-guard.js';

export const NRI_PLUGIN_SERVICE = 'nri.pkg.api.v1alpha1.Plugin';
export const NRI_RUNTIME_SERVICE = 'nri.pkg.api.v1alpha1.Runtime';
/** The runtime's default per-request timeout (plugin_request_timeout). */
export const DEFAULT_NRI_REQUEST_TIMEOUT_MS = 2000;
/** The runtime's default registration timeout (plugin_registration_timeout). */
export const DEFAULT_NRI_REGISTRATION_TIMEOUT_MS = 5000;
export const DEFAULT_RECONNECT = { initialDelayMs: 500, maxDelayMs: 30_000 } as const;

export type NriPluginState = 'idle' | 'connecting' | 'registering' | 'configured' | 'synchronized' | 'closed';

export interface NriPluginOptions {
  /** Plugin name ([a-zA-Z0-9_.+-]+). For a launched plugin the runtime uses the file name instead. */
  name: string;
  /** Two ASCII digits; plugins are called in ascending idx order. */
  idx: string;
  handlers: NriHandlers;
  logger: Logger;
  /** Pre-launched mode: the runtime's NRI socket (default /var/run/nri/nri.sock when fd is not given). */
  socketPath?: string;
  /** Runtime-launched mode: the inherited socketpair end (NRI_PLUGIN_SOCKET, normally 3). */
  fd?: number;
  /** Pre-launched mode only; false disables reconnecting (the plugin closes on the first disconnect). */
  reconnect?: { initialDelayMs: number; maxDelayMs: number } | false;
  /** Deadline for the RegisterPlugin reply (default 5000). */
  registrationTimeoutMs?: number;
  /** Taken off each request's timeout to get the handler's budget (default 250, at most a quarter). */
  handlerSafetyMarginMs?: number;
  /** Called after each successful Configure (i.e. on every (re)connection), with the runtime's identity. */
  onConfigure?: (info: RuntimeInfo & { config: string; events: number }) => void;
  /** Told of every request served on the plugin connection (method, ms, status code): metrics, benchmarks. */
  onRequestServed?: (served: { service: string; method: string; durationMs: number; code: number }) => void;
  /** Aborting it closes the plugin. */
  signal?: AbortSignal;
  /** Test seam: how a pre-launched plugin obtains its trunk (default: connect to socketPath). */
  connect?: (signal: AbortSignal) => Promise<Duplex>;
  /** Random source for back-off jitter (tests). */
  random?: () => number;
}

export interface NriStopInfo {
  /** 'closed' = close() or the AbortSignal; 'eof' = a launched plugin's trunk ended; 'error' = gave up. */
  reason: 'closed' | 'eof' | 'error';
  error?: NriError;
}

interface Session {
  mux: Mux;
  client: TtrpcClient;
  server: TtrpcServer;
  syncPods: PodSandbox[];
  syncContainers: Container[];
  configured: boolean;
}

const PLUGIN_NAME = /^[a-zA-Z0-9_.+-]+$/;

function invalidOption(message: string): NriError {
  return new NriError(NriErrorCode.NRI_INVALID_OPTIONS, message, { step: 'create NRI plugin' });
}

export class NriPlugin {
  /** The subscription derived from the handlers (before intersecting with the runtime's valid events). */
  readonly eventMask: number;
  /** Resolves (never rejects) once the plugin is closed for good. */
  readonly stopped: Promise<NriStopInfo>;
  private stateValue: NriPluginState = 'idle';
  private readonly listeners = new Set<(state: NriPluginState) => void>();
  private readonly logger: Logger;
  private readonly lifetime = new AbortController();
  private session: Session | undefined;
  private runtimeInfo: RuntimeInfo | undefined;
  private subscribed = 0;
  private requestTimeoutMs = DEFAULT_NRI_REQUEST_TIMEOUT_MS;
  private resolveStopped!: (info: NriStopInfo) => void;
  private loop: Promise<void> | undefined;
  private readonly services: ReadonlyMap<string, ReadonlyMap<string, TtrpcMethodHandler>>;

  constructor(private readonly options: NriPluginOptions) {
    if (!PLUGIN_NAME.test(options.name ?? '')) throw invalidOption(`name must match ${PLUGIN_NAME.source}, got ${JSON.stringify(options.name)}`);
    if (!/^[0-9]{2}$/.test(options.idx ?? '')) throw invalidOption(`idx must be exactly two digits, got ${JSON.stringify(options.idx)}`);
    if (options.fd !== undefined && options.socketPath !== undefined) throw invalidOption('give either socketPath or fd, not both');
    if (options.fd !== undefined && (!Number.isInteger(options.fd) || options.fd < 0)) throw invalidOption(`fd must be a non-negative integer, got ${options.fd}`);
    if (options.reconnect && (options.reconnect.initialDelayMs <= 0 || options.reconnect.maxDelayMs < options.reconnect.initialDelayMs)) {
      throw invalidOption('reconnect needs 0 < initialDelayMs <= maxDelayMs');
    }
    this.eventMask = eventMaskOf(options.handlers ?? {});
    if (this.eventMask === 0) {
      throw new NriError(NriErrorCode.NRI_NO_HANDLERS, 'the handlers implement no NRI event (runPodSandbox, createContainer, ...)', {
        step: 'create NRI plugin',
        evidence: { methods: Object.keys(options.handlers ?? {}) },
      });
    }
    this.logger = options.logger.child({ component: 'nri-plugin', plugin: `${options.idx}-${options.name}` });
    this.stopped = new Promise((resolve) => {
      this.resolveStopped = resolve;
    });
    this.services = new Map([[NRI_PLUGIN_SERVICE, this.pluginService().methods()]]);
    if (options.signal) {
      if (options.signal.aborted) queueMicrotask(() => void this.close());
      else options.signal.addEventListener('abort', () => void this.close(), { once: true });
    }
  }

  get state(): NriPluginState {
    return this.stateValue;
  }

  /** The runtime of the current (or last) connection, known after Configure. */
  get runtime(): RuntimeInfo | undefined {
    return this.runtimeInfo;
  }

  /** The events subscribed on the current connection (0 before Configure). */
  get subscribedEvents(): number {
    return this.subscribed;
  }

  /** Registers a state listener; returns its remover. */
  onStateChange(listener: (state: NriPluginState) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Resolves when the plugin enters `state` (at once if it is in it); rejects on timeout, abort or close. */
  waitForState(state: NriPluginState, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    if (this.stateValue === state) return Promise.resolve();
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (err?: Error): void => {
        remove();
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        if (err) reject(err);
        else resolve();
      };
      const onAbort = (): void => done(new NriError(NriErrorCode.NRI_CLOSED, `aborted while waiting for state ${state}`, { step: 'wait for NRI state' }));
      const remove = this.onStateChange((s) => {
        if (s === state) done();
        else if (s === 'closed') done(new NriError(NriErrorCode.NRI_CLOSED, `closed while waiting for state ${state}`, { step: 'wait for NRI state' }));
      });
      if (opts.timeoutMs !== undefined) {
        timer = setTimeout(
          () => done(new NriError(NriErrorCode.NRI_CLOSED, `state ${state} not reached within ${opts.timeoutMs} ms (now ${this.stateValue})`, { step: 'wait for NRI state' })),
          Math.min(opts.timeoutMs, MAX_TIMER_DELAY_MS),
        );
      }
      opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /**
   * Starts connecting (idempotent). Resolves once the first Configure has been answered; rejects with
   * NRI_CLOSED if the plugin closes first (with reconnect on, connection failures are retried, not fatal).
   */
  start(): Promise<void> {
    if (this.stateValue === 'closed') {
      return Promise.reject(new NriError(NriErrorCode.NRI_CLOSED, 'the plugin is closed', { step: 'start NRI plugin' }));
    }
    const configured = new Promise<void>((resolve, reject) => {
      if (this.stateValue === 'configured' || this.stateValue === 'synchronized') return resolve();
      const remove = this.onStateChange((s) => {
        if (s === 'configured') {
          remove();
          resolve();
        } else if (s === 'closed') {
          remove();
          void this.stopped.then((info) =>
            reject(new NriError(NriErrorCode.NRI_CLOSED, `closed before it was configured (${info.reason})`, { step: 'start NRI plugin', cause: info.error })),
          );
        }
      });
    });
    if (!this.loop) this.loop = this.run();
    return configured;
  }

  /** Closes the connection and stops reconnecting; pending calls reject with TTRPC_CLOSED. Idempotent. */
  async close(): Promise<void> {
    this.finish({ reason: 'closed' });
    await this.loop;
  }

  /**
   * Sends unsolicited container updates/evictions (Runtime.UpdateContainers); resolves with the updates the
   * runtime failed to apply. Never call this from inside an event handler (deadlock until the timeout):
   * return updates from the handler instead.
   */
  async updateContainers(
    update: ContainerUpdate[],
    evict: ContainerEviction[] = [],
    opts: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<ContainerUpdate[]> {
    const session = this.session;
    if (!session || !session.configured) {
      throw new NriError(NriErrorCode.NRI_CLOSED, `not connected to the runtime (state ${this.stateValue})`, { step: 'update containers' });
    }
    const payload = encodeMessage(nriType('UpdateContainersRequest'), { update, evict });
    const reply = await session.client.call(NRI_RUNTIME_SERVICE, 'UpdateContainers', payload, {
      timeoutMs: opts.timeoutMs ?? this.requestTimeoutMs,
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    return decodeMessage<{ failed?: ContainerUpdate[] }>(nriType('UpdateContainersResponse'), reply).failed ?? [];
  }

  // ----------------------------------------------------------------------------------------------------
  // Connection loop

  private setState(state: NriPluginState): void {
    if (this.stateValue === state || this.stateValue === 'closed') return;
    this.stateValue = state;
    this.logger.debug('nri plugin state', { state });
    for (const l of [...this.listeners]) {
      try {
        l(state);
      } catch (err) {
        this.logger.error('nri plugin: state listener threw', { error: String(err) });
      }
    }
  }

  private finish(info: NriStopInfo): void {
    if (this.stateValue === 'closed') return;
    if (info.reason === 'closed') this.logger.info('nri plugin closing');
    else this.logger.warn('nri plugin stopped', { reason: info.reason, error: info.error?.message });
    this.lifetime.abort();
    this.session?.mux.close();
    this.setState('closed');
    this.resolveStopped(info);
  }

  private get launched(): boolean {
    return this.options.fd !== undefined;
  }

  private async run(): Promise<void> {
    const reconnect = this.launched || this.options.reconnect === false ? undefined : (this.options.reconnect ?? DEFAULT_RECONNECT);
    let attempt = 0;
    while (!this.lifetime.signal.aborted) {
      this.setState('connecting');
      let socket: Duplex;
      try {
        socket = await this.openTrunk();
      } catch (err) {
        if (this.lifetime.signal.aborted) break;
        const error = err instanceof NriError ? err : new NriError(NriErrorCode.NRI_CONNECT_FAILED, String(err), { step: 'connect to NRI' });
        if (!reconnect) {
          this.finish({ reason: 'error', error });
          break;
        }
        const delayMs = this.backoffMs(attempt++, reconnect);
        this.logger.warn('nri plugin: cannot connect, retrying', { error: error.message, delayMs, attempt });
        await this.sleep(delayMs);
        continue;
      }
      const outcome = await this.runSession(socket);
      if (this.lifetime.signal.aborted) break;
      if (outcome.configured) attempt = 0;
      if (this.launched) {
        this.finish({ reason: 'eof', ...(outcome.error ? { error: outcome.error } : {}) });
        break;
      }
      if (!reconnect) {
        this.finish({ reason: 'error', error: outcome.error ?? new NriError(NriErrorCode.NRI_CLOSED, 'connection lost', { step: 'NRI connection' }) });
        break;
      }
      const delayMs = this.backoffMs(attempt++, reconnect);
      this.logger.warn('nri plugin: connection to the runtime lost, reconnecting', { error: outcome.error?.message, delayMs });
      await this.sleep(delayMs);
    }
  }

  /** Exponential back-off with jitter in [50%, 100%] of the capped delay. */
  private backoffMs(attempt: number, r: { initialDelayMs: number; maxDelayMs: number }): number {
    const capped = Math.min(r.maxDelayMs, r.initialDelayMs * 2 ** Math.min(attempt, 30));
    const random = this.options.random ?? Math.random;
    return Math.max(1, Math.round(capped * (0.5 + 0.5 * random())));
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const signal = this.lifetime.signal;
      if (signal.aborted) return resolve();
      const timer = setTimeout(done, Math.min(ms, MAX_TIMER_DELAY_MS));
      function done(): void {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        resolve();
      }
      signal.addEventListener('abort', done, { once: true });
    });
  }

  private async openTrunk(): Promise<Duplex> {
    if (this.options.fd !== undefined) {
      return new net.Socket({ fd: this.options.fd, readable: true, writable: true });
    }
    if (this.options.connect) return this.options.connect(this.lifetime.signal);
    const path = this.options.socketPath ?? DEFAULT_NRI_SOCKET_PATH;
    return new Promise<Duplex>((resolve, reject) => {
      const socket = net.createConnection({ path });
      const onAbort = (): void => {
        socket.destroy();
        reject(new NriError(NriErrorCode.NRI_CLOSED, 'closed while connecting', { step: 'connect to NRI' }));
      };
      this.lifetime.signal.addEventListener('abort', onAbort, { once: true });
      socket.once('connect', () => {
        this.lifetime.signal.removeEventListener('abort', onAbort);
        socket.removeAllListeners('error');
        resolve(socket);
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        this.lifetime.signal.removeEventListener('abort', onAbort);
        socket.destroy();
        reject(
          new NriError(NriErrorCode.NRI_CONNECT_FAILED, `connect ${path}: ${err.message}`, {
            step: 'connect to NRI',
            cause: err,
            evidence: { socketPath: path, errno: err.code },
          }),
        );
      });
    });
  }

  private async runSession(socket: Duplex): Promise<{ configured: boolean; error?: NriError }> {
    const mux = new Mux(socket, { logger: this.logger });
    let server: TtrpcServer;
    let client: TtrpcClient;
    const conn1 = mux.open(PLUGIN_SERVICE_CONN, {
      onData: (b) => server.receive(b),
      onClose: (e) => server.close(e),
    });
    const conn2 = mux.open(RUNTIME_SERVICE_CONN, {
      onData: (b) => client.receive(b),
      onClose: (e) => client.close(e),
    });
    server = new TtrpcServer(conn1, {
      logger: this.logger,
      services: this.services,
      onFatal: (e) => mux.fail(e),
      ...(this.options.onRequestServed ? { onServed: this.options.onRequestServed } : {}),
    });
    client = new TtrpcClient(conn2, { logger: this.logger, onFatal: (e) => mux.fail(e) });
    const session: Session = { mux, client, server, syncPods: [], syncContainers: [], configured: false };
    this.session = session;
    this.subscribed = 0;
    this.setState('registering');
    if (this.lifetime.signal.aborted) mux.close();

    const registrationTimeoutMs = this.options.registrationTimeoutMs ?? DEFAULT_NRI_REGISTRATION_TIMEOUT_MS;
    const request = encodeMessage(nriType('RegisterPluginRequest'), { pluginName: this.options.name, pluginIdx: this.options.idx });
    let registrationError: NriError | undefined;
    client.call(NRI_RUNTIME_SERVICE, 'RegisterPlugin', request, { timeoutMs: registrationTimeoutMs }).then(
      () => this.logger.info('nri plugin registered', { events: this.eventMask }),
      (err: unknown) => {
        if (mux.isClosed) return;
        registrationError = new NriError(NriErrorCode.NRI_REGISTRATION_FAILED, (err as Error).message, {
          step: 'register with NRI',
          cause: err,
        });
        this.logger.error('nri plugin: registration failed, closing the connection', { error: registrationError.message });
        mux.close();
      },
    );
    const info = await mux.closed;
    if (this.session === session) this.session = undefined;
    return { configured: session.configured, ...(registrationError ?? info.error ? { error: registrationError ?? info.error } : {}) };
  }

  // ----------------------------------------------------------------------------------------------------
  // Plugin service (conn 1): plugin-service.ts serves it; the state it reports lands here.

  private pluginService(): PluginService {
    // Options are read when used (as everywhere in this class), not copied here.
    const options = this.options;
    return new PluginService({
      get handlers() {
        return options.handlers;
      },
      get handlerSafetyMarginMs() {
        return options.handlerSafetyMarginMs;
      },
      logger: this.logger,
      eventMask: this.eventMask,
      runtime: () => this.runtimeInfo,
      requestTimeoutMs: () => this.requestTimeoutMs,
      setRuntime: (runtime, requestTimeoutMs) => {
        this.runtimeInfo = runtime;
        if (requestTimeoutMs && requestTimeoutMs > 0) this.requestTimeoutMs = requestTimeoutMs;
      },
      session: () => this.session,
      configured: (info) => this.onConfigured(info),
      synchronized: () => this.setState('synchronized'),
    });
  }

  private onConfigured(info: RuntimeInfo & { config: string; events: number }): void {
    const { config, events, ...runtime } = info;
    this.subscribed = events;
    const session = this.session;
    if (session) session.configured = true;
    this.logger.info('nri plugin configured', {
      runtimeName: runtime.name,
      runtimeVersion: runtime.version,
      nriVersion: runtime.nriVersion,
      events: `0x${events.toString(16)}`,
      requestTimeoutMs: this.requestTimeoutMs,
    });
    this.setState('configured');
    try {
      this.options.onConfigure?.({ ...runtime, config, events });
    } catch (err) {
      this.logger.error('nri plugin: onConfigure threw', { error: String(err) });
    }
  }

}

/** Creates (but does not start) a plugin; call `start()`. Throws NRI_INVALID_OPTIONS / NRI_NO_HANDLERS. */
export function createNriPlugin(options: NriPluginOptions): NriPlugin {
  return new NriPlugin(options);
}

/** The three variables a runtime gives a plugin it launched (nri-protocol.md §1.3). */
export interface NriLaunchEnv {
  name: string;
  idx: string;
  fd: number;
}

/** Reads NRI_PLUGIN_NAME / NRI_PLUGIN_IDX / NRI_PLUGIN_SOCKET; throws NRI_LAUNCH_ENV_MISSING naming what is missing. */
export function readLaunchEnv(env: NodeJS.ProcessEnv = process.env): NriLaunchEnv {
  const missing = ['NRI_PLUGIN_NAME', 'NRI_PLUGIN_IDX', 'NRI_PLUGIN_SOCKET'].filter((k) => !env[k]);
  const fd = Number(env['NRI_PLUGIN_SOCKET']);
  if (missing.length > 0 || !Number.isInteger(fd) || fd < 0) {
    throw new NriError(NriErrorCode.NRI_LAUNCH_ENV_MISSING, `not launched by an NRI runtime: ${missing.length ? `missing ${missing.join(', ')}` : `bad NRI_PLUGIN_SOCKET ${env['NRI_PLUGIN_SOCKET']}`}`, {
      step: 'read NRI launch environment',
      evidence: { missing },
    });
  }
  return { name: env['NRI_PLUGIN_NAME'] as string, idx: env['NRI_PLUGIN_IDX'] as string, fd };
}
