/** The private node stack: provisioning (Debian containerd/runc/CRIU in /opt/thaw/stack) and the harness that runs it. */
export * from './errors.js';
export * from './paths.js';
export { provisionStack, isProvisioned, checkStack, FLAVOR_SPECS, PROVISION_FORMAT_VERSION } from './provision.js';
export type { ProvisionOptions, ProvisionResult, StackStamp, FlavorSpec } from './provision.js';
export { isPeerToolsProvisioned, peerToolsPaths, provisionPeerTools, PEER_TOOLS_SPEC } from './peer-tools.js';
export type { PeerTool, PeerToolsPaths } from './peer-tools.js';
export * from './containerd.js';
export * from './cri-client.js';
export { cleanupStaleStacks, destroyStackDir, STACK_MARKER_FILE } from './cleanup.js';
export type { CleanupReport } from './cleanup.js';
export { buildBusyboxRootfs, buildOciArchive, importImageInto, tempRootfsDir } from './images.js';
export type { ImportImageOptions, ImageConfigInput } from './images.js';
export { runCommand } from './exec.js';
export { type ImageTarget } from './images.js';
export { type RunningRegistry, startRegistry } from './registry.js';
export { type LogRecord, PACKAGE_ROOT, pluginDirsUnder, readJsonLog, startThawPluginProcess, type ThawPluginProcess, waitForLog } from './thaw-plugin-process.js';
export { provisionGoNriPlugin } from './go-nri-plugin.js';
