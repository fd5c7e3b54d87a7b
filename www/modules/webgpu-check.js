// Tells, before loading anything, whether this browser can run the model, and says why not
// in words a user can act on.

/** Resolves to { ok: true, adapter: {description, fallback, ...} } or { ok: false, title, detail }. */
export async function checkWebGPU() {
  if (!window.isSecureContext) {
    return {
      ok: false,
      title: 'This page needs a secure context',
      detail: 'WebGPU is only available over https:// or on http://localhost / 127.0.0.1. Open the page through such an address.',
    };
  }
  if (!('gpu' in navigator)) {
    return {
      ok: false,
      title: 'WebGPU is not available in this browser',
      detail: 'The model runs on WebGPU. Use a current Chrome or Edge (113 or later), Safari 26, or Firefox 141 or later on Windows; on Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu.',
    };
  }
  let adapter = null;
  try {
    adapter = await navigator.gpu.requestAdapter();
  } catch (e) {
    return { ok: false, title: 'WebGPU failed to start', detail: String(e && e.message || e) };
  }
  if (!adapter) {
    return {
      ok: false,
      title: 'No WebGPU adapter',
      detail: 'The browser has WebGPU but found no usable graphics adapter (it may be blocklisted, or hardware acceleration is turned off in the browser settings).',
    };
  }
  const info = adapter.info || {};
  const lim = adapter.limits;
  // What the engine's kernels need at the least: storage buffers for a layer's weights and
  // 256-invocation workgroups (see DESIGN.md's toolchain facts).
  const needs = [
    ['maxComputeInvocationsPerWorkgroup', 256],
    ['maxStorageBuffersPerShaderStage', 8],
    ['maxStorageBufferBindingSize', 64 << 20],
  ];
  const short = needs.filter(([k, v]) => (lim[k] ?? 0) < v);
  if (short.length) {
    return {
      ok: false,
      title: 'This graphics adapter is too limited for the model',
      detail: short.map(([k, v]) => `${k} is ${lim[k]}, the model needs ${v}`).join('; ') + '.',
    };
  }
  const fallback = Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter);
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') || 'unknown adapter';
  return { ok: true, adapter: { name, fallback, f16: adapter.features.has('shader-f16') } };
}
