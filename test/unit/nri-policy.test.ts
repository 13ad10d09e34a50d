import { describe, expect, it } from 'vitest';
import {
  checkCheckpointName,
  decide,
  DEFAULT_ANNOTATION_PREFIX,
  validateAnnotationPrefix,
  type PolicyDecision,
} from '../../src/nri-plugin/policy.js';

const options = { annotationPrefix: DEFAULT_ANNOTATION_PREFIX };
const run = (annotations: Record<string, string>, containerName = 'worker'): PolicyDecision =>
  decide({ podAnnotations: annotations, containerName }, options);

describe('adjustment policy', () => {
  it('leaves a pod without thaw annotations untouched, whatever else it carries', () => {
    expect(run({})).toEqual({ kind: 'untouched' });
    expect(run({ 'example.com/checkpoint': 'x', 'kubernetes.io/config.seen': 'now' })).toEqual({ kind: 'untouched' });
  });

  it('recognises a checkpoint source with its default and explicit after-checkpoint behaviour', () => {
    expect(run({ 'thaw.dev/checkpoint': 'llm-a' })).toEqual({
      kind: 'checkpoint-source',
      checkpointName: 'llm-a',
      onCheckpoint: 'continue',
    });
    expect(run({ 'thaw.dev/checkpoint': 'llm-a', 'thaw.dev/on-checkpoint': 'exit' })).toMatchObject({
      onCheckpoint: 'exit',
    });
  });

  it('recognises a restore target', () => {
    expect(run({ 'thaw.dev/restore': 'llm-a.v2' })).toEqual({ kind: 'restore-target', checkpointName: 'llm-a.v2' });
    // Another namespace's checkpoint (the agent's policy decides whether this pod may have it); not a reference.
    expect(run({ 'thaw.dev/restore': 'platform/base-llm' })).toEqual({ kind: 'restore-target', checkpointName: 'platform/base-llm' });
    expect(run({ 'thaw.dev/restore': 'localhost/qwen' })).toMatchObject({ kind: 'restore-target', reference: { registry: 'localhost', repository: 'qwen' } });
  });

  it('acts only on the container the pod names', () => {
    const annotations = { 'thaw.dev/checkpoint': 'x', 'thaw.dev/container': 'worker' };
    expect(run(annotations, 'worker').kind).toBe('checkpoint-source');
    expect(run(annotations, 'sidecar')).toEqual({ kind: 'other-container', targetContainer: 'worker' });
  });

  const rejected: Array<[string, Record<string, string>, RegExp]> = [
    ['a typo under the prefix', { 'thaw.dev/chekpoint': 'x' }, /unknown annotation thaw\.dev\/chekpoint/],
    ['both roles at once', { 'thaw.dev/checkpoint': 'a', 'thaw.dev/restore': 'a' }, /both set/],
    ['a modifier without a role', { 'thaw.dev/container': 'worker' }, /none of thaw\.dev\/checkpoint, thaw\.dev\/restore, thaw\.dev\/snapshot is/],
    ['a bad after-checkpoint value', { 'thaw.dev/checkpoint': 'a', 'thaw.dev/on-checkpoint': 'pause' }, /"continue" or "exit"/],
    ['after-checkpoint on a restore target', { 'thaw.dev/restore': 'a', 'thaw.dev/on-checkpoint': 'exit' }, /checkpoint sources only/],
    // A value with a '/' is read as a registry reference, never as a path: these name no registry host.
    ['a path-escaping restore name', { 'thaw.dev/restore': '../../etc' }, /is not a registry reference: registry "\.\." is not a host/],
    ['an absolute restore name', { 'thaw.dev/restore': '/var/lib/thaw' }, /namespace "" is not a Kubernetes namespace name/],
    ['a qualified restore name of a reserved name', { 'thaw.dev/restore': 'team-a/oci-x' }, /reserved for checkpoints pulled from a registry/],
    ['a qualified restore name with a bad namespace', { 'thaw.dev/restore': 'Team_A/llm' }, /namespace "Team_A" is not a Kubernetes namespace name/],
    ['a qualified checkpoint name (a source names its checkpoint within its own namespace)', { 'thaw.dev/checkpoint': 'team-b/llm' }, /contains '\/'/],
    ['a reference with a path-escaping repository', { 'thaw.dev/restore': 'registry:5000/team/../x:v1' }, /repository component "\.\." must be/],
    ['a reference with a bad digest', { 'thaw.dev/restore': 'registry:5000/team/qwen@sha256:abc' }, /digest "sha256:abc" must be/],
    ['a dot-dot name', { 'thaw.dev/checkpoint': 'a..b' }, /contains '\.\.'/],
    ['a NUL byte', { 'thaw.dev/checkpoint': 'a\0b' }, /NUL/],
    ['an empty name', { 'thaw.dev/checkpoint': '' }, /empty/],
    ['upper case', { 'thaw.dev/checkpoint': 'Model' }, /lower-case/],
    ['an over-long name', { 'thaw.dev/checkpoint': 'a'.repeat(129) }, /at most 128/],
    ['a bad container name', { 'thaw.dev/checkpoint': 'a', 'thaw.dev/container': 'Bad_Name' }, /not a valid container name/],
  ];
  it.each(rejected)('rejects %s with a reason naming the problem', (_what, annotations, reason) => {
    const decision = run(annotations);
    expect(decision.kind).toBe('rejected');
    if (decision.kind === 'rejected') {
      expect(decision.reason).toMatch(reason);
      expect(decision.annotation.startsWith('thaw.dev/')).toBe(true);
    }
  });

  it('reads a restore value with a registry in it as a reference to pull', () => {
    expect(run({ 'thaw.dev/restore': 'registry:5000/team/qwen:v1' })).toEqual({
      kind: 'restore-target',
      checkpointName: 'registry:5000/team/qwen:v1',
      reference: { registry: 'registry:5000', repository: 'team/qwen', tag: 'v1' },
    });
    const pinned = `localhost/qwen@sha256:${'a'.repeat(64)}`;
    expect(run({ 'thaw.dev/restore': pinned })).toMatchObject({ kind: 'restore-target', reference: { registry: 'localhost', repository: 'qwen', digest: `sha256:${'a'.repeat(64)}` } });
  });

  it('uses a configurable prefix and ignores the default one then', () => {
    const custom = { annotationPrefix: 'ckpt.example.com/' };
    expect(decide({ podAnnotations: { 'thaw.dev/checkpoint': 'a' }, containerName: 'w' }, custom)).toEqual({
      kind: 'untouched',
    });
    expect(decide({ podAnnotations: { 'ckpt.example.com/restore': 'a' }, containerName: 'w' }, custom).kind).toBe(
      'restore-target',
    );
  });

  it('validates prefixes and names at configuration time', () => {
    expect(validateAnnotationPrefix('thaw.dev/')).toBeUndefined();
    expect(validateAnnotationPrefix('thaw.dev')).toMatch(/followed by '\/'/);
    expect(validateAnnotationPrefix('Thaw/')).toMatch(/DNS subdomain/);
    expect(checkCheckpointName('llm-7b_v1.2')).toBeUndefined();
  });
});
