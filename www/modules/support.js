// What `Engine.checkSupport()` found, in words a user can act on. The engine decides (its
// `auto` backend choice); the page only explains it. Without a usable WebGPU the model runs on
// the CPU backend, so only a page that insists on WebGPU (`?backend=webgpu`) cannot run.

/** What the CPU backend gets here: several threads only on a cross-origin isolated page. */
function onCpu(s) {
  const t = s.threads;
  const threads = t?.available ? `on ${t.autoThreads} threads` : `on one thread${t ? ` (${t.reason})` : ''}`;
  return `The model runs on the CPU backend (wasm SIMD) instead, ${threads}: slower, but it works.`;
}

/**
 * `{ title, detail }` explaining why WebGPU does not run the model here, or null when it does.
 * `s`: the object `Engine.checkSupport()` resolves to.
 */
export function supportNote(s) {
  const cpu = s.backend === 'cpu' ? ` ${onCpu(s)}` : '';
  if (!s.secureContext) {
    return {
      title: 'This page needs a secure context',
      detail: `WebGPU and the browser cache are only available over https:// or on http://localhost / 127.0.0.1. Open the page through such an address.${cpu}`,
    };
  }
  if (!s.webgpu) {
    return {
      title: 'WebGPU is not available in this browser',
      detail: `Use a current Chrome or Edge (113 or later), Safari 26, or Firefox 141 or later on Windows; on Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu.${cpu}`,
    };
  }
  if (!s.gpu) {
    return {
      title: 'No WebGPU adapter',
      detail: `The browser has WebGPU but found no usable graphics adapter (it may be blocklisted, or hardware acceleration is turned off in the browser settings).${cpu}`,
    };
  }
  if (s.backend === 'cpu') {
    return { title: 'The WebGPU adapter is a CPU emulation', detail: `The adapter (${s.adapter}) is not a GPU.${cpu}` };
  }
  return null;
}

/** One line on what the browser offers: the adapter and its features, or the note's title. */
export function supportLine(s) {
  const note = supportNote(s);
  if (note) return `${note.title}. ${note.detail}`;
  const g = s.gpu;
  const feats = [g.f16 ? 'f16' : 'no f16', g.subgroups ? 'subgroups' : 'no subgroups'].join(', ');
  return `WebGPU on ${s.adapter} (${feats}).`;
}
