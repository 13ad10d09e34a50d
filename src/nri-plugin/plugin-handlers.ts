/**
 * What a plugin author implements: the NRI handler interfaces, the context every handler receives, and the
 * subscription derived from them.
 *
 * - The subscription is derived from which handler methods exist (bit 1 << (event-1) per event); the plugin
 *   intersects it with the runtime's valid events (0x7FF up to containerd 2.1, 0x3FFF from 2.2) and never
 *   subscribes 0 (= "all" to the runtime).
 */
import type { Logger } from '../log.js';
import type { AdjustmentBuilder } from './adjustment.js';
import {
  NriEvent,
  type Container,
  type ContainerAdjustment,
  type ContainerEviction,
  type ContainerUpdate,
  type LinuxResources,
  type PodSandbox,
} from './nri-types.js';
import type { RuntimeInfo } from './runtime-version.js';

/** What every handler receives besides the event's objects. */
export interface NriHandlerContext {
  /** Fires when the handler's deadline passes (its answer is then ignored) or the plugin closes. */
  signal: AbortSignal;
  /** The handler's budget in ms (the request timeout minus the safety margin). */
  deadlineMs: number;
  /** The runtime that sent the event (from Configure). */
  runtime: RuntimeInfo;
  logger: Logger;
}

export interface CreateContainerResult {
  adjust?: ContainerAdjustment | AdjustmentBuilder;
  update?: ContainerUpdate[];
  evict?: ContainerEviction[];
}

export interface UpdateResult {
  update?: ContainerUpdate[];
  evict?: ContainerEviction[];
}


export type MaybePromise<T> = T | Promise<T>;

/**
 * The events a plugin handles: implement only what you need; the subscription is derived from the
 * methods present. Handlers must be fast (the runtime waits, default 2 s) and must not await
 * `plugin.updateContainers()` (the runtime holds its event lock: that would deadlock until the timeout).
 */
export interface NriHandlers {
  /** Once per connection, before any event. Throwing refuses the connection (the runtime drops the plugin). */
  configure?(config: string, runtimeName: string, runtimeVersion: string, ctx: NriHandlerContext): MaybePromise<void>;
  /** Once per connection with every existing CRI pod and container; may return updates for them. */
  synchronize?(pods: PodSandbox[], containers: Container[], ctx: NriHandlerContext): MaybePromise<ContainerUpdate[] | void>;
  runPodSandbox?(pod: PodSandbox, ctx: NriHandlerContext): MaybePromise<void>;
  stopPodSandbox?(pod: PodSandbox, ctx: NriHandlerContext): MaybePromise<void>;
  removePodSandbox?(pod: PodSandbox, ctx: NriHandlerContext): MaybePromise<void>;
  /**
   * Not an event: asked first of every CreateContainer, with the request's head only (pod: id, name, uid,
   * namespace, annotations; container: id, podSandboxId, name, annotations, args), decoded without the rest of
   * the spec (env, mounts, hooks, linux: most of the bytes). False: the container is none of this plugin's
   * business, the request is answered with no adjustment at once and createContainer is not called; true (or a
   * throw): the request is decoded whole and createContainer runs. Must be synchronous and cheap.
   */
  createContainerWanted?(pod: PodSandbox, container: Container): boolean;
  /** Returns the adjustment (a ContainerAdjustment, an AdjustmentBuilder, or {adjust, update, evict}). */
  createContainer?(
    pod: PodSandbox,
    container: Container,
    ctx: NriHandlerContext,
  ): MaybePromise<ContainerAdjustment | AdjustmentBuilder | CreateContainerResult | void>;
  postCreateContainer?(pod: PodSandbox, container: Container, ctx: NriHandlerContext): MaybePromise<void>;
  startContainer?(pod: PodSandbox, container: Container, ctx: NriHandlerContext): MaybePromise<void>;
  postStartContainer?(pod: PodSandbox, container: Container, ctx: NriHandlerContext): MaybePromise<void>;
  updateContainer?(
    pod: PodSandbox,
    container: Container,
    resources: LinuxResources | undefined,
    ctx: NriHandlerContext,
  ): MaybePromise<UpdateResult | ContainerUpdate[] | void>;
  postUpdateContainer?(pod: PodSandbox, container: Container, ctx: NriHandlerContext): MaybePromise<void>;
  stopContainer?(pod: PodSandbox, container: Container, ctx: NriHandlerContext): MaybePromise<ContainerUpdate[] | void>;
  removeContainer?(pod: PodSandbox, container: Container, ctx: NriHandlerContext): MaybePromise<void>;
}

export type EventHandlerName = Exclude<keyof NriHandlers, 'configure' | 'synchronize' | 'createContainerWanted'>;

/** Event number → the handler method that receives it. */
export const EVENT_HANDLER_NAMES: Readonly<Record<number, EventHandlerName>> = {
  [NriEvent.RUN_POD_SANDBOX]: 'runPodSandbox',
  [NriEvent.STOP_POD_SANDBOX]: 'stopPodSandbox',
  [NriEvent.REMOVE_POD_SANDBOX]: 'removePodSandbox',
  [NriEvent.CREATE_CONTAINER]: 'createContainer',
  [NriEvent.POST_CREATE_CONTAINER]: 'postCreateContainer',
  [NriEvent.START_CONTAINER]: 'startContainer',
  [NriEvent.POST_START_CONTAINER]: 'postStartContainer',
  [NriEvent.UPDATE_CONTAINER]: 'updateContainer',
  [NriEvent.POST_UPDATE_CONTAINER]: 'postUpdateContainer',
  [NriEvent.STOP_CONTAINER]: 'stopContainer',
  [NriEvent.REMOVE_CONTAINER]: 'removeContainer',
};

/** The mask bit of an event: 1 << (event - 1). */
export const eventBit = (event: number): number => 1 << (event - 1);

/** The subscription implied by the handler methods present (bit 1 << (event-1) per event). */
export function eventMaskOf(handlers: NriHandlers): number {
  let mask = 0;
  for (const [event, name] of Object.entries(EVENT_HANDLER_NAMES)) {
    if (typeof handlers[name] === 'function') mask |= eventBit(Number(event));
  }
  return mask;
}
