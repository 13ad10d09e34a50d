/**
 * Every container the agent has seen through NRI (Synchronize and CreateContainer, minus RemoveContainer), so
 * that the control API can find the one an operator names: by id (or a unique prefix of at least MIN_ID_PREFIX
 * characters), or by pod namespace/name and container name. Where its process is, is not kept here: the API asks
 * containerd when it needs it (container-task.ts).
 */
import type { Container, PodSandbox } from '../nri-plugin/index.js';
import { AgentError, AgentErrorCode } from './errors.js';

export const MIN_ID_PREFIX = 6;
/** containerd's CRI plugin records the image of a container in this spec annotation. */
export const CRI_IMAGE_NAME_ANNOTATION = 'io.kubernetes.cri.image-name';

export interface SeenContainer {
  id: string;
  name: string;
  podId: string;
  podName: string;
  podNamespace: string;
  podUid: string;
  imageRef?: string;
  /** The spec's process args as NRI gave them (recorded in a checkpoint's manifest, manifest.ts). */
  args?: string[];
}

export type ContainerRef = { containerId: string } | { pod: { namespace: string; name: string; uid?: string }; containerName?: string };

export class ContainerRegistry {
  private readonly byId = new Map<string, SeenContainer>();

  /** Records (or refreshes) a container. */
  seen(pod: PodSandbox, c: Container): void {
    if (!c.id) return;
    const prev = this.byId.get(c.id);
    const image = c.annotations?.[CRI_IMAGE_NAME_ANNOTATION];
    this.byId.set(c.id, {
      id: c.id,
      name: c.name ?? prev?.name ?? '',
      podId: pod.id ?? c.podSandboxId ?? prev?.podId ?? '',
      podName: pod.name ?? prev?.podName ?? '',
      podNamespace: pod.namespace ?? prev?.podNamespace ?? '',
      podUid: pod.uid ?? prev?.podUid ?? '',
      ...(image ?? prev?.imageRef ? { imageRef: (image ?? prev?.imageRef) as string } : {}),
      ...(c.args !== undefined && c.args.length > 0 ? { args: [...c.args] } : prev?.args !== undefined ? { args: prev.args } : {}),
    });
  }

  removed(id: string): void {
    this.byId.delete(id);
  }

  has(id: string): boolean {
    return this.byId.has(id);
  }

  get size(): number {
    return this.byId.size;
  }

  /** The one container `ref` names; AGENT_CONTAINER_NOT_FOUND or AGENT_AMBIGUOUS_TARGET otherwise. */
  find(ref: ContainerRef): SeenContainer {
    const step = 'find the container';
    if ('containerId' in ref) {
      const id = ref.containerId;
      const exact = this.byId.get(id);
      if (exact) return exact;
      const matches = id.length >= MIN_ID_PREFIX ? [...this.byId.values()].filter((c) => c.id.startsWith(id)) : [];
      if (matches.length === 1) return matches[0]!;
      if (matches.length > 1) {
        throw new AgentError(AgentErrorCode.AMBIGUOUS_TARGET, `container id prefix ${id} matches ${matches.length} containers`, { step, evidence: { candidates: matches.map((c) => c.id) } });
      }
      throw new AgentError(AgentErrorCode.CONTAINER_NOT_FOUND, `no container ${id} on this node${id.length < MIN_ID_PREFIX ? ` (an id prefix needs at least ${MIN_ID_PREFIX} characters)` : ''}`, { step, evidence: { containerId: id } });
    }
    const { pod, containerName } = ref;
    const inPod = [...this.byId.values()].filter((c) => c.podNamespace === pod.namespace && c.podName === pod.name && (!pod.uid || c.podUid === pod.uid));
    const podText = `${pod.namespace}/${pod.name}`;
    if (inPod.length === 0) throw new AgentError(AgentErrorCode.CONTAINER_NOT_FOUND, `no pod ${podText} on this node`, { step, evidence: { pod: podText } });
    const matches = containerName ? inPod.filter((c) => c.name === containerName) : inPod;
    if (matches.length === 1) return matches[0]!;
    if (matches.length === 0) {
      throw new AgentError(AgentErrorCode.CONTAINER_NOT_FOUND, `pod ${podText} has no container ${containerName} (it has ${inPod.map((c) => c.name).join(', ')})`, { step, evidence: { pod: podText, containers: inPod.map((c) => c.name) } });
    }
    throw new AgentError(AgentErrorCode.AMBIGUOUS_TARGET, `pod ${podText} has ${matches.length} containers (${matches.map((c) => c.name).join(', ')}): name one with --container`, { step, evidence: { candidates: matches.map((c) => c.name) } });
  }
}
