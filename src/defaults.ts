/**
 * thaw's defaults, each defined once (the agent's configuration, src/agent/config.ts, starts from these; the
 * flows and clients fall back to them when a caller names none). Imports nothing: every layer may use it.
 */

// --- host paths of a stock node ---

/** The local checkpoint store (one directory per checkpoint, 0700 root). */
export const DEFAULT_STORE_ROOT = '/var/lib/thaw/checkpoints';
/** Per-container CRIU work directories of the restore flow (`<root>/<container id>`, removed at poststop). */
export const DEFAULT_RESTORE_WORK_ROOT = '/run/thaw/restore';
/** Per-container control directories (mounted at /snapshot-control in the container). */
export const DEFAULT_CONTROL_ROOT = '/run/thaw/control';
/** The agent's control API socket (root-only). */
export const DEFAULT_API_SOCKET = '/run/thaw/agent.sock';
/** containerd's NRI socket. */
export const DEFAULT_NRI_SOCKET_PATH = '/var/run/nri/nri.sock';
/** containerd's gRPC socket: thaw asks it where a checkpointed container's rootfs snapshot lies. */
export const DEFAULT_CONTAINERD_SOCKET = '/run/containerd/containerd.sock';
/** containerd's root directory (its `root` setting): the overlayfs snapshotter's snapshots lie under it. */
export const DEFAULT_CONTAINERD_ROOT = '/var/lib/containerd';
/** The containerd namespace CRI (the kubelet's) containers live in. */
export const DEFAULT_CONTAINERD_NAMESPACE = 'k8s.io';
/** The toolkit prefix (CRIU, the GNU tar and gzip CRIU runs for tmpfs contents, busybox; under `<prefix>/bin`). */
export const DEFAULT_TOOLKIT_DIR = '/opt/thaw/stack/1.7';
/** The host's nsenter (util-linux), run as root to enter a container's namespaces: never one from a rootfs. */
export const DEFAULT_NSENTER_PATH = '/usr/bin/nsenter';
/** The host's unshare (util-linux): gives CRIU a private copy of the host's mount namespace (criu/client.ts). */
export const DEFAULT_UNSHARE_PATH = '/usr/bin/unshare';
/** Where /metrics listens (loopback). */
export const DEFAULT_METRICS_LISTEN = '127.0.0.1:9464';

// --- time limits ---

/**
 * How long the restore flow lets CRIU run for a pod waiting in its placeholder before it falls back to a
 * cold start. A deadline of the pod's restore, not of CRIU: the flow passes it to every CRIU restore it runs.
 */
export const DEFAULT_POD_CRIU_RESTORE_TIMEOUT_MS = 120_000;
/**
 * The CRIU client's own limit on one restore RPC when its caller names none (tools, tests): a ceiling that
 * stops a hung swrk, not a deadline anyone waits for. The restore flow always passes its pod deadline.
 */
export const DEFAULT_CRIU_RPC_RESTORE_TIMEOUT_MS = 10 * 60_000;
/** The CRIU client's limit on one dump RPC when its caller names none (a worker of many GiB dumps in minutes). */
export const DEFAULT_CRIU_RPC_DUMP_TIMEOUT_MS = 10 * 60_000;
/**
 * How long an aborted dump waits for CRIU's next notification, which thaw refuses so that CRIU undoes the dump and
 * lets the worker run (criu/swrk.ts), before it kills CRIU. Killing at once could land while CRIU runs an injected
 * syscall in the worker, which then dies of SIGTRAP. Past this the dump is killed as before: about the time a
 * worker of a few GiB takes to dump.
 */
export const DEFAULT_CRIU_DUMP_ABORT_GRACE_MS = 10_000;
/** sha256 of a multi-GiB checkpoint on a busy node; past this the pod cold-starts rather than wait. */
export const DEFAULT_VERIFY_TIMEOUT_MS = 300_000;
/**
 * A restored worker's time to connect to weights.sock, map the handed-over weights and answer (it polls every
 * 10 ms and maps in milliseconds; the margin is for a loaded node). Past it the pod cold-starts.
 */
export const DEFAULT_WEIGHTS_HANDOVER_TIMEOUT_MS = 30_000;
/** The weights service's digest stamps (one JSON file of the agent's, under paths.workRoot). */
export const WEIGHTS_DIGESTS_FILE = 'weights-digests.json';
/**
 * How long thaw-pause waits for a word from the agent before it falls back to the original command by
 * itself (native/thaw-pause.c, THAW_PAUSE_DEADLINE_MS): the agent gone for good must not leave a pod in its
 * placeholder. The agent repeats "a restore is under way" (SIGWINCH) every third of it while it restores, so
 * a slow restore is not cut short. Well under what a pod is expected to take to start (a startup probe's
 * default budget is 30 s of failures after the first; image pulls take longer), configurable as
 * `restore.pauseDeadlineMs`.
 */
export const DEFAULT_THAW_PAUSE_DEADLINE_MS = 20_000;
/**
 * How long a restore waits, from the container's start, for PID 1 to run thaw-pause: the start is told by the
 * poststart hook, which runc runs beside PID 1's exec, so the exec may still be under way (microseconds to
 * milliseconds; this bounds a runtime that never completes it).
 */
export const PLACEHOLDER_EXEC_WAIT_MS = 5_000;
/**
 * What the createRuntime hook keeps free of its runtime timeout (the OCI hook `timeout` the agent sets,
 * which runc enforces by killing the hook: the container then fails to start): Node.js's start, writing
 * the hook record, and undoing the overlay (one MOUNT_TIMEOUT_MS). The hook's own work (waiting for a
 * pull, applying the rootfs diff) gives up before `timeout - margin` and the pod starts cold.
 */
export const HOOK_TIMEOUT_MARGIN_MS = 10_000;
/**
 * How long past its budget the native createRuntime hook (native/thaw-hook.c) waits for the agent's answer (its
 * --wait-ms is timeout - margin + this): the agent's work ends by the budget, so this covers its records and the
 * overlay's removal, and is half the margin so that the hook still gives up before runc would kill it.
 */
export const HOOK_ANSWER_GRACE_MS = HOOK_TIMEOUT_MARGIN_MS / 2;
/**
 * The native hook's socket is the API socket's path with this in place of its `.sock` (or after it): in the same
 * root-only directory, and one per agent (the API socket is claimed by one live agent at a time).
 */
export const HOOK_SOCKET_SUFFIX = '-hook.sock';
/** The native hook's file name, beside thaw-pause (native/build/): absent there, restores use the Node.js hook. */
export const NATIVE_HOOK_NAME = 'thaw-hook';
/**
 * How long the poststart hook (`thaw-hook --started`) waits for the agent to take a container's start: runc
 * runs poststart hooks inside `runc start`, so this bounds what a managed pod's StartContainer can wait on an
 * agent that accepted the connection and does not answer. The agent answers at once (it hands the start on and
 * does the work later); a start not taken is left to the flows' own deadlines (thaw-pause falls back by itself).
 */
export const START_HOOK_WAIT_MS = 2_000;
/** runc's timeout for the poststart hook, in seconds: above START_HOOK_WAIT_MS, so that the hook ends itself, exit 0. */
export const START_HOOK_TIMEOUT_SECONDS = 5;
/**
 * How often the agent asks containerd whether a managed container it learnt back at Synchronize, created and not
 * started, and without thaw's poststart hook (an agent of another setup made it), has started: nothing else would
 * tell it (no PostStartContainer subscription).
 */
export const START_POLL_INTERVAL_MS = 100;
/**
 * Parallel readers of a restore's weights (agent config `weights.readers`), each with one chunk in flight: enough to
 * keep NVMe queues and several page-cache copy threads busy.
 */
export const WEIGHTS_READERS_DEFAULT = 8;
/**
 * When a restore reads its weights (agent config `weights.order`). `checkpoint-first`: once the checkpoint's read
 * into the page cache ended (done, failed or stopped; at once when it is cached already). CRIU and then the CUDA
 * restore wait for the checkpoint's bytes and the weights are handed over only after both, so on one disk the
 * weights read beside the checkpoint only delay what is needed first. `together`: at CreateContainer, beside it
 * (weights on another disk than the store).
 */
export const WEIGHTS_ORDERS = ['checkpoint-first', 'together'] as const;
export type WeightsOrder = (typeof WEIGHTS_ORDERS)[number];
export const WEIGHTS_ORDER_DEFAULT: WeightsOrder = 'checkpoint-first';
/** The memory filler's file name, beside thaw-pause (native/build/): absent there, CRIU fills restored memory itself. */
export const MEMORY_FILL_NAME = 'thaw-fill';
/**
 * thaw-fill's threads when `restore.fillThreads` is 0: one per core up to this. Each places a 1 MiB stretch at a
 * time (a page-cache read and a UFFDIO_COPY); past about eight the fresh-page allocation of the one mm is the limit.
 */
export const DEFAULT_MEMORY_FILL_MAX_THREADS = 8;
/**
 * How long thaw-fill may take from its start to the last page (its --timeout-ms): as long as CRIU's own restore
 * may (a fill is a restore's page reads, from disk when the cache is cold); past it the pod cold-starts.
 */
export const DEFAULT_MEMORY_FILL_TIMEOUT_MS = 120_000;
/** The lazy pages' compressor's file name, beside thaw-pause (native/build/): absent there, pages stay plain. */
export const PAGES_PACK_NAME = 'thaw-pack';
/**
 * `checkpoint.compressPages`: `zstd` moves a checkpoint's lazy pages into zstd frames (compressed-pages.ts; such a
 * checkpoint restores only through thaw-fill), `off` keeps them as CRIU wrote them.
 */
export const PAGES_COMPRESSIONS = ['zstd', 'off'] as const;
export type PagesCompression = (typeof PAGES_COMPRESSIONS)[number];
export const PAGES_COMPRESSION_DEFAULT: PagesCompression = 'zstd';
/** zstd's fastest level: decompression speed barely depends on the level, and the checkpoint's CPU time does. */
export const DEFAULT_PAGES_COMPRESSION_LEVEL = 1;
/**
 * A `thaw.dev/snapshot` container's image digest, asked of containerd inside NRI CreateContainer (2 s in all): a
 * local socket answers in milliseconds; past this the pod cold-starts (AGENT_SNAPSHOT_KEY_UNKNOWN).
 */
export const DEFAULT_SNAPSHOT_IMAGE_LOOKUP_TIMEOUT_MS = 500;
/**
 * Restores of one `thaw.dev/snapshot` checkpoint that fell back in a row (each pod cold-started) before the next pod
 * of the workload takes a new checkpoint in its place: a checkpoint that fails for a reason its key does not cover
 * (a damaged file, a CRIU that cannot restore it) would otherwise send every pod to a cold start forever.
 */
export const DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES = 3;
/** cuda-checkpoint's lock of one process (it waits for the process's in-flight CUDA work). */
export const DEFAULT_CUDA_LOCK_TIMEOUT_MS = 10_000;

/**
 * The longest delay setTimeout honours (2^31 − 1 ms, about 24.8 days): a longer one fires at once (Node
 * warns and uses 1 ms). Every timer built from a caller's timeout is clamped to it.
 */
export const MAX_TIMER_DELAY_MS = 2_147_483_647;

// --- store bounds (agent config `store.*`; per-namespace quotas also in `tenancy.namespaces.<ns>.quotaBytes`) ---

/** All checkpoints of the local store together, in declared bytes; 0: no total quota (free space still bounds). */
export const DEFAULT_STORE_QUOTA_BYTES = 0;
/** A namespace's checkpoints, when the tenancy policy names no quota for it; 0: none of its own. */
export const DEFAULT_NAMESPACE_QUOTA_BYTES = 0;
/**
 * What the store's filesystem keeps free: a checkpoint or pull that would leave less is refused (after the least
 * recently used checkpoints are collected), so that thaw never fills the node's disk.
 */
export const DEFAULT_STORE_MIN_FREE_BYTES = 1024 ** 3;

// --- global bounds on concurrent work (agent config `limits.*`) ---

/**
 * Checkpoint files hashed at once in the whole agent (publish, verify, copy; every checkpoint and restore
 * together): sha256 is CPU-bound, and a node's cores serve its pods first.
 */
export const DEFAULT_MAX_CONCURRENT_HASHING = 4;
/** CRIU processes (dumps and restores) at once in the whole agent: each freezes or rebuilds a worker's memory. */
export const DEFAULT_MAX_CONCURRENT_CRIU = 2;
