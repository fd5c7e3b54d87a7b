// Small formatting and DOM helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);

const UNITS = ['B', 'KB', 'MB', 'GB'];

/** Bytes in decimal units (as download sizes are usually shown), 3 significant digits. */
export function formatBytes(n) {
  if (n == null || !Number.isFinite(n)) return '–';
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1000 && i < UNITS.length - 1) { v /= 1000; i++; }
  const s = v >= 100 || i === 0 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  return `${n < 0 ? '-' : ''}${s} ${UNITS[i]}`;
}

export function formatSeconds(s) {
  if (s == null || !Number.isFinite(s)) return '–';
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}

export function formatClock(date) {
  return date.toLocaleTimeString([], { hour12: false });
}

/** Creates an element with attributes/properties and children (strings become text). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('data-') || k.startsWith('aria-') || k === 'role') e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
export function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) e.setAttribute(k, String(v));
  if (text != null) e.textContent = text;
  return e;
}

/** A readable message from anything thrown (FlexQuantError has `code` and `message`). */
export function errorText(e) {
  if (e == null) return 'unknown error';
  if (typeof e === 'string') return e;
  const msg = e.message || String(e);
  return e.code && !msg.includes(e.code) ? `${msg} (${e.code})` : msg;
}
