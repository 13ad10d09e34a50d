/**
 * The checkpoint store's public API (design.md, Store): the local store (local-store.ts and its parts), the
 * manifest, copies between stores, and the OCI registry store. Other layers import the store from here.
 */
export * from './local-store.js';
export { StoreError, StoreErrorCode } from './errors.js';
export * from './manifest.js';
export { copyCheckpoint, type CopyOptions } from './copy.js';
export * from './oci/index.js';
export { FILE_CACHE_DIR_NAME } from './oci/file-cache.js';
export { type FetchOptions } from './oci/pull.js';
