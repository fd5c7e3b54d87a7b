// Where the page meets the npm package: the engine runs in a Web Worker through the package's
// own proxy (`flexquant/worker`); the static methods that need no engine (checkSupport,
// inspect, cached, deleteCached) come from its main entry (`flexquant`). The package sits
// beside the page in the static site (`./flexquant/`, written by `./build.sh site`); every URL
// is relative, so the site works under any sub-path.

const PACKAGE = new URL('../flexquant/', import.meta.url);

/** Where the ensemble is: `?model=URL` (relative to the page) or `./ensemble/manifest.json`. */
export function manifestUrl() {
  const q = new URLSearchParams(location.search).get('model');
  return new URL(q || './ensemble/manifest.json', location.href).href;
}

/** Imports one of the package's entry files. Throws with a clear message when it is missing. */
async function importPackage(file) {
  const url = new URL(file, PACKAGE);
  try {
    return await import(url.href);
  } catch (e) {
    const err = new Error(`The flexquant package is missing beside this page (${url.pathname}): build the site with ./build.sh site DIR. (${e.message})`);
    err.code = 'package-missing';
    throw err;
  }
}

/** The package's `Engine` class, for its static methods (no model is loaded on this thread). */
export async function engineClass() {
  return (await importPackage('index.js')).Engine;
}

/** Starts the engine in a worker. */
export async function createEngine(url, options) {
  return (await importPackage('worker.js')).CreateWorkerEngine(url, options);
}
