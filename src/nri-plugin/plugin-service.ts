/**
 * The Plugin service a plugin serves on conn 1: decodes each request, calls the matching handler under its
 * deadline (plugin-guard.ts) and encodes the answer.
 *
 * - Configure records the runtime's identity and request timeout before the configure handler runs, then
 *   subscribes to the handled events the runtime knows (never 0: a plugin with no common event is refused).
 * - Synchronize chunks (`more`) are buffered on the connection and handed to the handler once, complete.
 * - StateChange and the v0.12 dedicated RPCs reach the same handlers: pod events get (pod), container
 *   events get (pod, container). Methods not registered (UpdatePodSandbox, ValidateContainerAdjustment, ...)
 *   are answered Unimplemented, which v0.12 runtimes treat as "fall back".
 * - A CreateContainer result that does not encode is logged and answered with no adjustment.
 */
import type { Logger } from '../log.js';
import { AdjustmentBuilder } from './adjustment.js';
import { GrpcCode, NriErrorCode, NriError, TtrpcStatusError } from './errors.js';
import {
  NriEvent,
  type ConfigureRequest,
  type Container,
  type ContainerAdjustment,
  type ContainerUpdate,
  type CreateContainerResponse,
  type PodContainerRequest,
  type PodSandbox,
  type StateChangeEvent,
  type SynchronizeRequest,
  type UpdateContainerRequest,
} from './nri-types.js';
import { guarded } from './plugin-guard.js';
import { EVENT_HANDLER_NAMES, type CreateContainerResult, type MaybePromise, type NriHandlerContext, type NriHandlers, type UpdateResult } from './plugin-handlers.js';
import { validEventsFor, type RuntimeInfo } from './runtime-version.js';
import { decodeMessage, encodeMessage, nriType } from './ttrpc-codec.js';
import type { TtrpcCall, TtrpcMethodHandler } from './ttrpc-server.js';

/** The per-connection state the service reads and writes. */
export interface PluginServiceSession {
  syncPods: PodSandbox[];
  syncContainers: Container[];
}

/** What the service needs of the plugin that owns it (the lifecycle lives there). */
export interface PluginServiceHost {
  readonly handlers: NriHandlers;
  readonly logger: Logger;
  /** The subscription derived from the handlers. */
  readonly eventMask: number;
  readonly handlerSafetyMarginMs: number | undefined;
  /** The runtime from Configure; undefined before the first one. */
  runtime(): RuntimeInfo | undefined;
  /** The runtime's per-request timeout (its default until Configure carries one). */
  requestTimeoutMs(): number;
  /** Configure arrived (before its handler runs): record the runtime, and its request timeout when positive. */
  setRuntime(runtime: RuntimeInfo, requestTimeoutMs: number | undefined): void;
  /** The current connection, if any. */
  session(): PluginServiceSession | undefined;
  /** Configure is answered with `events`: the connection is configured. */
  configured(info: RuntimeInfo & { config: string; events: number }): void;
  /** The last Synchronize chunk is answered. */
  synchronized(): void;
}

/** A CreateContainerResponse with no adjustment: the answer for a container a plugin does not want. */
const EMPTY_CREATE_RESPONSE = new Uint8Array(0);

export class PluginService {
  constructor(private readonly host: PluginServiceHost) {}

  /** The Plugin service's methods, by name. */
  methods(): Map<string, TtrpcMethodHandler> {
    const m = new Map<string, TtrpcMethodHandler>();
    const empty = Buffer.alloc(0);
    m.set('Configure', (call) => this.onConfigure(call));
    m.set('Synchronize', (call) => this.onSynchronize(call));
    m.set('Shutdown', () => {
      this.host.logger.info('nri plugin: runtime sent Shutdown');
      return empty;
    });
    m.set('CreateContainer', (call) => this.onCreateContainer(call));
    m.set('UpdateContainer', (call) => this.onUpdateContainer(call));
    m.set('StopContainer', (call) => this.onStopContainer(call));
    m.set('StateChange', async (call) => {
      const ev = decodeMessage<StateChangeEvent>(nriType('StateChangeEvent'), call.payload);
      await this.dispatchStateEvent(ev.event ?? 0, ev.pod ?? {}, ev.container, call);
      return empty;
    });
    // v0.12 dedicated RPCs → the same handlers (their responses are all empty).
    const dedicated: Array<[string, number, string]> = [
      ['RunPodSandbox', NriEvent.RUN_POD_SANDBOX, 'RunPodSandboxRequest'],
      ['StopPodSandbox', NriEvent.STOP_POD_SANDBOX, 'StopPodSandboxRequest'],
      ['RemovePodSandbox', NriEvent.REMOVE_POD_SANDBOX, 'RemovePodSandboxRequest'],
      ['PostCreateContainer', NriEvent.POST_CREATE_CONTAINER, 'PostCreateContainerRequest'],
      ['StartContainer', NriEvent.START_CONTAINER, 'StartContainerRequest'],
      ['PostStartContainer', NriEvent.POST_START_CONTAINER, 'PostStartContainerRequest'],
      ['PostUpdateContainer', NriEvent.POST_UPDATE_CONTAINER, 'PostUpdateContainerRequest'],
      ['RemoveContainer', NriEvent.REMOVE_CONTAINER, 'RemoveContainerRequest'],
    ];
    for (const [method, event, requestType] of dedicated) {
      m.set(method, async (call) => {
        const req = decodeMessage<PodContainerRequest>(nriType(requestType), call.payload);
        await this.dispatchStateEvent(event, req.pod ?? {}, req.container, call);
        return empty;
      });
    }
    // UpdatePodSandbox, PostUpdatePodSandbox, ValidateContainerAdjustment and anything else: not
    // registered, so the server answers Unimplemented (12), which v0.12 runtimes treat as "fall back".
    return m;
  }

  private guarded<T>(what: string, call: TtrpcCall, fn: (ctx: NriHandlerContext) => MaybePromise<T>, fallback: T, rethrow = false): Promise<T> {
    const env = {
      logger: this.host.logger,
      requestTimeoutMs: this.host.requestTimeoutMs(),
      handlerSafetyMarginMs: this.host.handlerSafetyMarginMs,
      runtime: this.host.runtime(),
    };
    return guarded(env, what, call, fn, fallback, rethrow);
  }

  private async onConfigure(call: TtrpcCall): Promise<Uint8Array> {
    const req = decodeMessage<ConfigureRequest>(nriType('ConfigureRequest'), call.payload);
    const runtime: RuntimeInfo = {
      name: req.runtimeName ?? '',
      version: req.runtimeVersion ?? '',
      ...(req.NRIVersion ? { nriVersion: req.NRIVersion } : {}),
    };
    this.host.setRuntime(runtime, req.requestTimeout);
    const config = req.config ?? '';
    const configure = this.host.handlers.configure;
    if (configure) {
      await this.guarded('Configure', call, (ctx) => configure.call(this.host.handlers, config, runtime.name, runtime.version, ctx), undefined, true);
    }
    const valid = validEventsFor(runtime);
    const events = this.host.eventMask & valid;
    if (events !== this.host.eventMask) {
      this.host.logger.warn('nri plugin: the runtime does not know some handled events; not subscribing to them', {
        handled: this.host.eventMask,
        valid,
        dropped: this.host.eventMask & ~valid,
      });
    }
    if (events === 0) {
      const err = new NriError(NriErrorCode.NRI_NO_COMMON_EVENTS, `none of the handled events (0x${this.host.eventMask.toString(16)}) is valid for ${runtime.name} ${runtime.version}`, {
        step: 'configure NRI plugin',
      });
      this.host.logger.error(err.message);
      throw new TtrpcStatusError(GrpcCode.INVALID_ARGUMENT, err.message, { step: 'configure NRI plugin', cause: err });
    }
    this.host.configured({ ...runtime, config, events });
    return encodeMessage(nriType('ConfigureResponse'), { events });
  }

  private async onSynchronize(call: TtrpcCall): Promise<Uint8Array> {
    const req = decodeMessage<SynchronizeRequest>(nriType('SynchronizeRequest'), call.payload);
    const session = this.host.session();
    const pods = [...(session?.syncPods ?? []), ...(req.pods ?? [])];
    const containers = [...(session?.syncContainers ?? []), ...(req.containers ?? [])];
    if (req.more) {
      if (session) {
        session.syncPods = pods;
        session.syncContainers = containers;
      }
      this.host.logger.debug('nri plugin: Synchronize chunk (more follow)', { pods: pods.length, containers: containers.length });
      return encodeMessage(nriType('SynchronizeResponse'), { more: true });
    }
    if (session) {
      session.syncPods = [];
      session.syncContainers = [];
    }
    const synchronize = this.host.handlers.synchronize;
    let update: ContainerUpdate[] = [];
    if (synchronize) {
      update = (await this.guarded('Synchronize', call, (ctx) => synchronize.call(this.host.handlers, pods, containers, ctx), undefined)) ?? [];
    }
    this.host.logger.info('nri plugin synchronized', { pods: pods.length, containers: containers.length, updates: update.length });
    this.host.synchronized();
    return encodeMessage(nriType('SynchronizeResponse'), { update });
  }

  private async onCreateContainer(call: TtrpcCall): Promise<Uint8Array> {
    const wanted = this.host.handlers.createContainerWanted;
    if (wanted !== undefined) {
      const head = decodeMessage<PodContainerRequest>(nriType('CreateContainerRequestHead'), call.payload);
      let want = true;
      try {
        want = wanted.call(this.host.handlers, head.pod ?? {}, head.container ?? {}) !== false;
      } catch (err) {
        this.host.logger.error('nri plugin: createContainerWanted threw; handling the request in full', { error: (err as Error).message, containerId: head.container?.id });
      }
      if (!want) return EMPTY_CREATE_RESPONSE;
    }
    const req = decodeMessage<PodContainerRequest>(nriType('CreateContainerRequest'), call.payload);
    const handler = this.host.handlers.createContainer;
    const response: CreateContainerResponse = {};
    if (handler) {
      const pod = req.pod ?? {};
      const container = req.container ?? {};
      const result = await this.guarded('CreateContainer', call, (ctx) => handler.call(this.host.handlers, pod, container, ctx), undefined);
      Object.assign(response, this.normalizeCreateResult(result, container));
    }
    try {
      return encodeMessage(nriType('CreateContainerResponse'), response);
    } catch (err) {
      // A malformed adjustment must not fail the pod: log it and answer with no adjustment.
      this.host.logger.error('nri plugin: CreateContainer result does not encode; answering with an empty adjustment', {
        error: (err as Error).message,
        containerId: req.container?.id,
      });
      return EMPTY_CREATE_RESPONSE;
    }
  }

  private normalizeCreateResult(
    result: ContainerAdjustment | AdjustmentBuilder | CreateContainerResult | void | undefined,
    container: Container,
  ): CreateContainerResponse {
    if (!result) return {};
    const toAdjustment = (a: ContainerAdjustment | AdjustmentBuilder): ContainerAdjustment => {
      if (!(a instanceof AdjustmentBuilder)) return a;
      const built = a.build(this.host.runtime());
      for (const note of built.notes) this.host.logger.warn(`nri plugin: ${note}`, { containerId: container.id });
      return built.adjustment;
    };
    if (result instanceof AdjustmentBuilder) return { adjust: toAdjustment(result) };
    const r = result as CreateContainerResult & ContainerAdjustment;
    if ('adjust' in r || 'update' in r || 'evict' in r) {
      const out: CreateContainerResponse = {};
      if (r.adjust) out.adjust = toAdjustment(r.adjust);
      if (r.update) out.update = r.update;
      if (r.evict) out.evict = r.evict;
      return out;
    }
    return { adjust: r };
  }

  private async onUpdateContainer(call: TtrpcCall): Promise<Uint8Array> {
    const req = decodeMessage<UpdateContainerRequest>(nriType('UpdateContainerRequest'), call.payload);
    const handler = this.host.handlers.updateContainer;
    let out: UpdateResult = {};
    if (handler) {
      const result = await this.guarded(
        'UpdateContainer',
        call,
        (ctx) => handler.call(this.host.handlers, req.pod ?? {}, req.container ?? {}, req.linuxResources, ctx),
        undefined,
      );
      out = Array.isArray(result) ? { update: result } : (result ?? {});
    }
    return encodeMessage(nriType('UpdateContainerResponse'), out);
  }

  private async onStopContainer(call: TtrpcCall): Promise<Uint8Array> {
    const req = decodeMessage<PodContainerRequest>(nriType('StopContainerRequest'), call.payload);
    const handler = this.host.handlers.stopContainer;
    let update: ContainerUpdate[] = [];
    if (handler) {
      update = (await this.guarded('StopContainer', call, (ctx) => handler.call(this.host.handlers, req.pod ?? {}, req.container ?? {}, ctx), undefined)) ?? [];
    }
    return encodeMessage(nriType('StopContainerResponse'), { update });
  }

  /** StateChange and the v0.12 dedicated RPCs: pod events get (pod), container events get (pod, container). */
  private async dispatchStateEvent(event: number, pod: PodSandbox, container: Container | undefined, call: TtrpcCall): Promise<void> {
    const name = EVENT_HANDLER_NAMES[event];
    if (!name || name === 'createContainer' || name === 'updateContainer' || name === 'stopContainer') {
      this.host.logger.warn('nri plugin: ignoring a state change for an event StateChange does not carry', { event });
      return;
    }
    const handler = this.host.handlers[name] as ((...args: unknown[]) => MaybePromise<void>) | undefined;
    if (!handler) {
      this.host.logger.debug('nri plugin: no handler for event', { event, handler: name });
      return;
    }
    const isPodEvent = event === NriEvent.RUN_POD_SANDBOX || event === NriEvent.STOP_POD_SANDBOX || event === NriEvent.REMOVE_POD_SANDBOX;
    await this.guarded(name, call, (ctx) =>
      isPodEvent ? handler.call(this.host.handlers, pod, ctx) : handler.call(this.host.handlers, pod, container ?? {}, ctx),
    undefined);
  }
}
