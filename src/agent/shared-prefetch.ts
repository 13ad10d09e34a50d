/**
 * One page-cache prefetch per checkpoint, shared by everyone who wants it read soon.
 *
 * A restore reads its checkpoint as early as thaw knows of it: at RunPodSandbox for a pod that names a local
 * checkpoint (kubelet then pulls images and creates the container, often hundreds of ms later), and again at
 * CreateContainer. Several pods of one Deployment scaled up at once name the same checkpoint; one reader
 * per checkpoint keeps them from competing for the disk. Each interested party is a holder; the prefetch
 * stops when its last holder lets go (the pod was removed, the restore ended) or when it is done.
 */

/** Reads a checkpoint into the page cache (LocalStore.prefetch); rejects when aborted. */
export type PrefetchCheckpoint = (name: string, signal: AbortSignal) => Promise<unknown>;

interface Running {
  abort: AbortController;
  holders: Set<string>;
  done: Promise<void>;
}

export class SharedPrefetch {
  private readonly running = new Map<string, Running>();

  constructor(
    private readonly prefetch: PrefetchCheckpoint,
    /** A prefetch that failed for another reason than being stopped (it is a hint: the restore goes on). */
    private readonly onFailure: (name: string, err: unknown) => void,
  ) {}

  /**
   * Starts reading `name` unless that runs already; `holder` keeps it going until release(holder). Resolves when
   * the read ends: done, failed (reported to onFailure) or stopped; never rejects.
   */
  hold(name: string, holder: string): Promise<void> {
    const current = this.running.get(name);
    if (current !== undefined) {
      current.holders.add(holder);
      return current.done;
    }
    const abort = new AbortController();
    const entry: Running = { abort, holders: new Set([holder]), done: Promise.resolve() };
    entry.done = this.prefetch(name, abort.signal).then(
      () => undefined,
      (err: unknown) => {
        if (!abort.signal.aborted) this.onFailure(name, err);
      },
    ).finally(() => {
      if (this.running.get(name) === entry) this.running.delete(name);
    });
    this.running.set(name, entry);
    return entry.done;
  }

  /** `holder` needs no prefetch any more; one that nobody holds is stopped. */
  release(holder: string): void {
    for (const [name, entry] of this.running) {
      if (!entry.holders.delete(holder) || entry.holders.size > 0) continue;
      entry.abort.abort(new Error('no restore waits for this checkpoint any more'));
      this.running.delete(name);
    }
  }

  /** Checkpoints being read now, with their holders (tests, status). */
  inFlight(): Array<{ name: string; holders: string[] }> {
    return [...this.running].map(([name, e]) => ({ name, holders: [...e.holders] }));
  }

  /** Stops every prefetch and waits for them to end. */
  async close(): Promise<void> {
    const entries = [...this.running.values()];
    this.running.clear();
    for (const e of entries) e.abort.abort(new Error('agent stopping'));
    await Promise.allSettled(entries.map((e) => e.done));
  }
}

/**
 * Holds back the prefetch's reads while something more urgent reads from the disk: a read queued behind the
 * prefetch's waits for megabytes ahead of it. hold() returns the release; wait() resolves when nothing holds.
 */
export class PrefetchGate {
  private holders = 0;
  private waiters: Array<() => void> = [];

  hold(): () => void {
    this.holders += 1;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.holders -= 1;
      if (this.holders === 0) for (const w of this.waiters.splice(0)) w();
    };
  }

  wait(): Promise<void> {
    return this.holders === 0 ? Promise.resolve() : new Promise((resolve) => this.waiters.push(resolve));
  }
}
