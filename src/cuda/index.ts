/** thaw's CUDA layer: libcuda (checkpoint API) and NVML through koffi. See each module's comment. */
export * from './errors.js';
export * from './libcuda.js';
export * from './checkpoint-api.js';
export * from './nvml.js';
export * from './gpu-facts.js';
export * from './vmm.js';
