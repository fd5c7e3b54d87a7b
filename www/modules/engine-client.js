// Where the page meets the npm package: the engine runs in a Web Worker through the package's
// own proxy (`flexquant/worker`). The package sits beside the page in the static site
// (`./flexquant/`, written by `./build.sh site`); every URL is relative, so the site works under
// any sub-path.

const PACKAGE = new URL('../flexquant/worker.js', import.meta.url);

/** Where the ensemble is: `?model=URL` (relative to the page) or `./ensemble/manifest.json`. */
export function manifestUrl() {
  const q = new URLSearchParams(location.search).get('model');
  return new URL(q || './ensemble/manifest.json', location.href).href;
}

/** Loads the package and starts the engine in a worker. Throws with a clear message. */
export async function createEngine(url, options) {
  let mod;
  try {
    mod = await import(PACKAGE.href);
  } catch (e) {
    const err = new Error(`The flexquant package is missing beside this page (${PACKAGE.pathname}): build the site with ./build.sh site DIR. (${e.message})`);
    err.code = 'package-missing';
    throw err;
  }
  return mod.CreateWorkerEngine(url, options);
}
