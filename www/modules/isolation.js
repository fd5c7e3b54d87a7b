// Threads on any static host. The CPU backend runs on several threads only in a cross-origin
// isolated page (COOP/COEP headers: js/API.md "Threads"). `./build.sh demo` serves them; a plain
// static host (GitHub Pages) cannot. There the page registers the package's
// coi-serviceworker.js (npm coi-serviceworker, MIT, copied beside the page by `./build.sh site`),
// which adds the two headers to every response of the site, and reloads once so that the page
// itself comes through it. Where that cannot work (no service workers, an insecure context, or
// the reload did not isolate the page) the page runs on one thread and says why. `?coi=0` opts
// out: no service worker (one registered by an earlier visit is unregistered), one thread unless
// the host sends the headers.

const SCRIPT = './coi-serviceworker.js';
/** Set for the one reload (per tab): never a second one, whatever happens. */
const RELOADED = 'flexquant-coi-reloaded';
/** How long the service worker may take to activate before the page goes on without it. */
const READY_MS = 10_000;
const NONE = 'this browser gives the page no service worker to isolate it with';
/** `?coi=0`: the page registers no service worker and unregisters the one a visit before did. */
const OFF = 'its service worker is turned off (?coi=0)';

/**
 * Resolves to `{ isolated: true }`, or `{ isolated: false, reason }` when the page runs without
 * isolation; never resolves when it is reloading the page (nothing should start before that).
 */
export async function crossOriginIsolation() {
  if (new URLSearchParams(location.search).get('coi') === '0') {
    const sw = navigator.serviceWorker;
    const isOurs = (w) => w && new URL(w.scriptURL).pathname.endsWith(SCRIPT.slice(1));
    const regs = sw ? await sw.getRegistrations().catch(() => []) : [];
    await Promise.all(regs.filter((r) => [r.active, r.waiting, r.installing].some(isOurs)).map((r) => r.unregister()));
    // A load the unregistered worker still controls: once more without it (its scripts and
    // workers would no longer get the headers this isolated page requires).
    if (sw && isOurs(sw.controller) && !sessionStorage.getItem(RELOADED)) {
      sessionStorage.setItem(RELOADED, '1');
      location.reload();
      return new Promise(() => {});
    }
    sessionStorage.removeItem(RELOADED);
    // Still isolated where the host sends the headers.
    return globalThis.crossOriginIsolated ? { isolated: true } : { isolated: false, reason: OFF };
  }
  if (globalThis.crossOriginIsolated) {
    sessionStorage.removeItem(RELOADED);
    return { isolated: true };
  }
  const sw = navigator.serviceWorker;
  if (!isSecureContext || !sw) {
    return { isolated: false, reason: NONE };
  }
  if (sessionStorage.getItem(RELOADED)) {
    return { isolated: false, reason: 'the page reloaded under its service worker and is still not isolated' };
  }
  try {
    // Resolves to nothing where service workers are turned off (Playwright's `block`).
    if (!(await sw.register(SCRIPT))) return { isolated: false, reason: NONE };
    const ready = await Promise.race([sw.ready, new Promise((r) => setTimeout(() => r(null), READY_MS))]);
    if (!ready) return { isolated: false, reason: `the service worker did not start within ${READY_MS / 1000} s` };
  } catch (e) {
    return { isolated: false, reason: `the service worker could not be registered (${e.message ?? e})` };
  }
  sessionStorage.setItem(RELOADED, '1');
  location.reload();
  return new Promise(() => {});
}
