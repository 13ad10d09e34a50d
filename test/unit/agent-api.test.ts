import * as grpc from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { statusOf } from '../../src/agent/api-server.js';
import { ContainerRegistry } from '../../src/agent/containers.js';
import { AgentError, AgentErrorCode } from '../../src/agent/errors.js';
import { StoreError, StoreErrorCode } from '../../src/store/errors.js';

const ID_A = `aaaa11${'0'.repeat(58)}`;
const ID_B = `aaaa22${'0'.repeat(58)}`;
const ID_C = `cccc33${'0'.repeat(58)}`;

function registry(): ContainerRegistry {
  const r = new ContainerRegistry();
  const pod = { id: 'p1', name: 'web', namespace: 'prod', uid: 'u1' };
  r.seen(pod, { id: ID_A, name: 'worker', podSandboxId: 'p1', annotations: { 'io.kubernetes.cri.image-name': 'img:1' } });
  r.seen(pod, { id: ID_B, name: 'sidecar', podSandboxId: 'p1' });
  r.seen({ id: 'p2', name: 'solo', namespace: 'prod', uid: 'u2' }, { id: ID_C, name: 'main', podSandboxId: 'p2' });
  return r;
}

function thrown(fn: () => unknown): AgentError {
  try {
    fn();
  } catch (err) {
    return err as AgentError;
  }
  throw new Error('expected a throw');
}

describe('the container registry behind the control API', () => {
  it('finds a container by id, by unique id prefix, or by pod and container name', () => {
    const r = registry();
    expect(r.find({ containerId: ID_A })).toMatchObject({ id: ID_A, name: 'worker', podName: 'web', podNamespace: 'prod', imageRef: 'img:1' });
    expect(r.find({ containerId: 'cccc33' })).toMatchObject({ id: ID_C, podName: 'solo' });
    expect(r.find({ pod: { namespace: 'prod', name: 'solo' } }).id).toBe(ID_C);
    expect(r.find({ pod: { namespace: 'prod', name: 'web' }, containerName: 'sidecar' })).toMatchObject({ id: ID_B, name: 'sidecar' });
  });

  it('keeps what it knew when a later event carries less (the pod from Create, the image from Create)', () => {
    const r = registry();
    r.seen({}, { id: ID_A, podSandboxId: 'p1' });
    expect(r.find({ containerId: ID_A })).toMatchObject({ name: 'worker', podName: 'web', imageRef: 'img:1' });
    expect(r.find({ containerId: ID_A })).not.toHaveProperty('pid');
    r.removed(ID_A);
    expect(r.size).toBe(2);
  });

  it.each([
    [{ containerId: 'aaaa' }, AgentErrorCode.CONTAINER_NOT_FOUND, /an id prefix needs at least 6 characters/],
    [{ containerId: 'aaaa1' }, AgentErrorCode.CONTAINER_NOT_FOUND, /no container aaaa1 on this node/],
    [{ containerId: 'zzzzzzz' }, AgentErrorCode.CONTAINER_NOT_FOUND, /no container zzzzzzz/],
    [{ pod: { namespace: 'prod', name: 'web' } }, AgentErrorCode.AMBIGUOUS_TARGET, /pod prod\/web has 2 containers \(worker, sidecar\): name one with --container/],
    [{ pod: { namespace: 'prod', name: 'web' }, containerName: 'db' }, AgentErrorCode.CONTAINER_NOT_FOUND, /pod prod\/web has no container db \(it has worker, sidecar\)/],
    [{ pod: { namespace: 'dev', name: 'web' } }, AgentErrorCode.CONTAINER_NOT_FOUND, /no pod dev\/web on this node/],
    [{ pod: { namespace: 'prod', name: 'solo', uid: 'other' } }, AgentErrorCode.CONTAINER_NOT_FOUND, /no pod prod\/solo/],
  ])('refuses %j with %s', (ref, code, message) => {
    const err = thrown(() => registry().find(ref));
    expect(err.code).toBe(code);
    expect(err.message).toMatch(message);
  });

  it('refuses an id prefix that matches two containers', () => {
    const r = registry();
    r.seen({ id: 'p3', name: 'x', namespace: 'ns', uid: 'u3' }, { id: `aaaa11${'1'.repeat(58)}`, name: 'x', podSandboxId: 'p3' });
    const err = thrown(() => r.find({ containerId: 'aaaa11' }));
    expect([err.code, err.evidence['candidates']]).toEqual([AgentErrorCode.AMBIGUOUS_TARGET, [ID_A, `aaaa11${'1'.repeat(58)}`]]);
  });
});

describe("the control API's error statuses", () => {
  it.each([
    [new StoreError(StoreErrorCode.NOT_FOUND, 'x', { step: 's' }), grpc.status.NOT_FOUND],
    [new AgentError(AgentErrorCode.CONTAINER_NOT_FOUND, 'x', { step: 's' }), grpc.status.NOT_FOUND],
    [new StoreError(StoreErrorCode.IN_USE, 'x', { step: 's' }), grpc.status.FAILED_PRECONDITION],
    [new AgentError(AgentErrorCode.CONTAINER_NOT_RUNNING, 'x', { step: 's' }), grpc.status.FAILED_PRECONDITION],
    [new StoreError(StoreErrorCode.INVALID_NAME, 'x', { step: 's' }), grpc.status.INVALID_ARGUMENT],
    [new AgentError(AgentErrorCode.BAD_REQUEST, 'x', { step: 's' }), grpc.status.INVALID_ARGUMENT],
    [new StoreError(StoreErrorCode.EXISTS, 'x', { step: 's' }), grpc.status.ALREADY_EXISTS],
    [new AgentError(AgentErrorCode.STOPPING, 'x', { step: 's' }), grpc.status.UNAVAILABLE],
    [new StoreError(StoreErrorCode.DIGEST_MISMATCH, 'x', { step: 's' }), grpc.status.INTERNAL],
    [new Error('a bug'), grpc.status.INTERNAL],
  ])('%s → status %s, with thaw-code', (err, code) => {
    const s = statusOf(err);
    expect(s.code).toBe(code);
    expect(s.details).toBe(err.message);
    expect(s.metadata.get('thaw-code')).toEqual([(err as { code?: string }).code ?? 'INTERNAL']);
  });
});
