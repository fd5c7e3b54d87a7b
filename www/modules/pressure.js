// "Simulate memory pressure": really allocates and holds JS memory, in the JS heap (plain
// arrays of doubles, which `performance.memory.usedJSHeapSize` counts; ArrayBuffer contents
// live outside the heap and would not move it).

const CHUNK = 1 << 20; // doubles per array: 8 MiB each

export class Pressure {
  constructor() {
    this.arrays = [];
    this.bytes = 0;
  }

  /** Allocates `bytes` more (rounded up to 8-byte doubles), filled with distinct values. */
  add(bytes) {
    let left = Math.ceil(bytes / 8);
    while (left > 0) {
      const n = Math.min(CHUNK, left);
      const a = new Array(n);
      const seed = Math.random();
      for (let i = 0; i < n; i++) a[i] = seed + i * 1e-9; // non-constant: really committed
      this.arrays.push(a);
      this.bytes += n * 8;
      left -= n;
    }
    return this.bytes;
  }

  /** Drops everything held; the garbage collector frees it on its next cycle. */
  release() {
    this.arrays = [];
    this.bytes = 0;
  }

  /** A checksum over the held arrays, so the holding cannot be optimized away. */
  touch() {
    let s = 0;
    for (const a of this.arrays) s += a[a.length - 1];
    return s;
  }
}

/** `performance.memory` where the browser has it (Chromium), else null. */
export function heapReading() {
  const m = performance.memory;
  return m ? { used: m.usedJSHeapSize, total: m.totalJSHeapSize, limit: m.jsHeapSizeLimit } : null;
}
