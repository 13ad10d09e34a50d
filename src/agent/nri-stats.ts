import type { PolicyDecision } from '../nri-plugin/index.js';

/** Counters of what the handlers decided, by outcome and cause, for logs, tests and /metrics. */
export class ThawNriStats {
  readonly decisions = new Map<PolicyDecision['kind'], number>();
  readonly rejectionsByAnnotation = new Map<string, number>();
  readonly fallbacksByCause = new Map<string, number>();
  /** Restore targets left cold at CreateContainer (never adjusted, so no restore event follows), by cause. */
  readonly restoreFallbacksAtCreate = new Map<string, number>();
  /** Restore targets the tenancy policy refused (cause RESTORE_NOT_ALLOWED, _SIGNATURE, _NO_ROOM), by `namespace cause`. */
  readonly tenancyRefusals = new Map<string, number>();

  countDecision(kind: PolicyDecision['kind']): void {
    this.decisions.set(kind, (this.decisions.get(kind) ?? 0) + 1);
  }
  countRejection(annotation: string): void {
    this.rejectionsByAnnotation.set(annotation, (this.rejectionsByAnnotation.get(annotation) ?? 0) + 1);
  }
  countFallback(cause: string): void {
    this.fallbacksByCause.set(cause, (this.fallbacksByCause.get(cause) ?? 0) + 1);
  }
  countTenancyRefusal(namespace: string, cause: string): void {
    const key = `${namespace} ${cause}`;
    this.tenancyRefusals.set(key, (this.tenancyRefusals.get(key) ?? 0) + 1);
  }
  countRestoreFallbackAtCreate(cause: string): void {
    this.countFallback(cause);
    this.restoreFallbacksAtCreate.set(cause, (this.restoreFallbacksAtCreate.get(cause) ?? 0) + 1);
  }
}
