/**
 * Where a container's process is, asked of containerd when it is needed (the control API's checkpoint of a
 * running container), not remembered from NRI: the plugin subscribes to no event that says a container started
 * when the native hook tells it for the containers thaw manages (thaw-nri.ts), and containerd's answer is the
 * runtime's own at the moment of the request.
 */
import { status as grpcStatus } from '@grpc/grpc-js';
import { containerdCall, type ContainerdEndpoint } from '../restore-engine/index.js';
import { AgentError, AgentErrorCode } from './errors.js';

interface TaskProcess {
  pid: number;
  status: string;
}

/**
 * The host pid of container `containerId`'s init, which must be running (or paused: CRIU's freeze is its own).
 * Errors: AGENT_CONTAINER_NOT_RUNNING (no task, or one not running), AGENT_RUNTIME_QUERY_FAILED (containerd did
 * not answer, or answered without a pid).
 */
export async function runningTaskPid(containerId: string, endpoint: ContainerdEndpoint): Promise<number> {
  const step = 'ask containerd for the container\'s process';
  const evidence = { containerId, socket: endpoint.socket };
  let process: TaskProcess | null | undefined;
  try {
    ({ process } = await containerdCall<{ container_id: string; exec_id: string }, { process?: TaskProcess | null }>(endpoint, 'Tasks', 'Get', { container_id: containerId, exec_id: '' }));
  } catch (err) {
    if ((err as { code?: number }).code === grpcStatus.NOT_FOUND) {
      throw new AgentError(AgentErrorCode.CONTAINER_NOT_RUNNING, `container ${containerId} has no task (it has not started, or it has ended)`, { step, evidence });
    }
    throw new AgentError(AgentErrorCode.RUNTIME_QUERY_FAILED, `containerd (${endpoint.socket}) did not answer Tasks/Get for ${containerId}: ${(err as Error).message}`, { step, cause: err, evidence });
  }
  if (!process || (process.status !== 'RUNNING' && process.status !== 'PAUSED')) {
    throw new AgentError(AgentErrorCode.CONTAINER_NOT_RUNNING, `container ${containerId} is not running (task status ${process?.status ?? 'none'})`, { step, evidence: { ...evidence, status: process?.status } });
  }
  if (!Number.isSafeInteger(process.pid) || process.pid <= 0) {
    throw new AgentError(AgentErrorCode.RUNTIME_QUERY_FAILED, `containerd names no pid for the running task of ${containerId}`, { step, evidence: { ...evidence, pid: process.pid } });
  }
  return process.pid;
}
