// The declaration checker (dts-check.mjs) on hand-made values, so a test that relies on it can
// fail; and the lists that are written twice, once in Rust and once in js/index.d.ts (error
// codes, event types, engine options, chat request fields), compared both ways. The real
// objects the browser returns are compared by npm_import.mjs.

import { it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { loadDeclarations, check } from './dts-check.mjs';

const root = new URL('../../', import.meta.url);
const read = (p) => readFileSync(new URL(p, root), 'utf8');
const decls = loadDeclarations(['js/index.d.ts', 'js/worker.d.ts'].map((p) => new URL(p, root).pathname));

const cacheReport = () => ({ url: 'u', cacheName: 'flexquant', manifestCached: true, files: 3, cachedFiles: 3,
  totalBytes: 10, cachedBytes: 10, completeSteps: [0, 1], storage: { quotaBytes: 100, usageBytes: 10, persisted: false } });

it('the checker accepts a value that agrees with its type', () => {
  assert.deepEqual(check(decls, 'CacheReport', cacheReport()), []);
  assert.deepEqual(check(decls, 'CacheReport', { ...cacheReport(), cacheName: null }), []);
  // Optional fields may be absent.
  assert.deepEqual(check(decls, 'EngineEvent', { type: 'progress', phase: 'upload', step: 0, totalBytes: 5 }), []);
});

it('the checker names the type and the field of each disagreement, both ways', () => {
  const { files, ...lacking } = cacheReport();
  void files;
  assert.deepEqual(check(decls, 'CacheReport', { ...lacking, extra: 1 }), [
    'CacheReport.files: declared but not returned',
    'CacheReport.extra: returned (number 1) but not declared',
  ]);
  assert.deepEqual(check(decls, 'CacheReport', { ...cacheReport(), files: '3' }),
    ['CacheReport.files: declared number, returned string "3"']);
  // Nested object literals and arrays.
  const chunk = { id: 'a', object: 'chat.completion.chunk', created: 1, model: 'm',
    choices: [{ index: 0, delta: { content: 'x', tokens: 1 }, finish_reason: null }] };
  assert.deepEqual(check(decls, 'ChatCompletionChunk', chunk),
    ['ChatCompletionChunk.choices[].delta.tokens: returned (number 1) but not declared']);
  // Unions of events: the member with the matching `type`, by its own name.
  const swap = { type: 'swap', from: 0, to: 1, module: 'l0.q', modules: [], ms: 1, reason: 'budget',
    footprintBytes: 1, tokenIndex: null };
  assert.deepEqual(check(decls, 'EngineEvent', swap), ['SwapEvent.bits: declared but not returned']);
  assert.match(check(decls, 'EngineEvent', { type: 'nope' })[0], /^EngineEvent\.type: returned "nope", declared "progress" \| /);
  // A literal union (FinishReason) and a class with its Error base (FlexQuantError).
  assert.deepEqual(check(decls, 'FinishReason', 'eos'), ['FinishReason: declared "stop" | "length" | "abort" | "tool_calls", returned string "eos"']);
  assert.deepEqual(check(decls, 'FlexQuantError', { name: 'FlexQuantError', code: 'http', message: 'm', status: 404 }), []);
  assert.deepEqual(check(decls, 'FlexQuantError', { name: 'FlexQuantError', code: 'oops', message: 'm' }).length, 1);
});

/** The string literals of a union type alias (or of one field of each member of an object union). */
function literals(name, field) {
  const out = [];
  const walk = (s) => {
    if (s.kind === 'ref') return walk(decls[s.name]);
    if (s.kind === 'union') return s.options.forEach(walk);
    if (field && s.kind === 'object') return walk(s.fields[field].shape);
    if (s.kind === 'literal') out.push(s.value);
  };
  walk(decls[name]);
  return out.sort();
}
const fields = (name) => Object.keys(decls[name].fields).sort();
const camel = (s) => s.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
/** `pub field:` names of a Rust struct. */
function rustFields(file, struct) {
  const src = read(file);
  const body = src.slice(src.indexOf(`pub struct ${struct} {`)).split('\n}')[0];
  return [...body.matchAll(/^\s*pub (\w+):/gm)].map((m) => m[1]);
}
const uniq = (xs) => [...new Set(xs)].sort();

it('ErrorCode lists every code the runtime raises (src/web/error.rs, js/*.js), and no other', () => {
  const rust = [...read('src/web/error.rs').matchAll(/Code::\w+ => "([a-z-]+)"/g)].map((m) => m[1]);
  const js = readdirSync(new URL('js/', root)).filter((f) => f.endsWith('.js'))
    .flatMap((f) => [...read(`js/${f}`).matchAll(/new FlexQuantError\('([a-z-]+)'/g)].map((m) => m[1]));
  assert.deepEqual(literals('ErrorCode'), uniq([...rust, ...js]));
});

it('EngineEvent has a member for every event type emitted (src/web/*.rs, js/*.js), and no other', () => {
  const rs = readdirSync(new URL('src/web/', root)).filter((f) => f.endsWith('.rs'))
    .flatMap((f) => [...read(`src/web/${f}`).matchAll(/"type": "([a-z-]+)"/g)].map((m) => m[1]));
  const js = readdirSync(new URL('js/', root)).filter((f) => f.endsWith('.js'))
    .flatMap((f) => [...read(`js/${f}`).matchAll(/(?:event = |onEvent\?\.\()\{ type: '([a-z-]+)'/g)].map((m) => m[1]));
  assert.deepEqual(literals('EngineEvent', 'type'), uniq([...rs, ...js]));
});

it('EngineOptions declares every option the engine reads (src/web/api.rs and the JS wrapper)', () => {
  const rust = rustFields('src/web/api.rs', 'EngineOptions').map(camel);
  assert.deepEqual(fields('EngineOptions'), uniq([...rust, 'heapPollMs', 'wasmUrl']));
});

it('ChatRequest declares every field the runtime accepts (runtime/request.rs KNOWN), and no other', () => {
  const src = read('src/runtime/request.rs');
  const known = src.slice(src.indexOf('pub const KNOWN:')).split('];')[0];
  const names = [...known.matchAll(/"(\w+)"/g)].map((m) => m[1]);
  // `signal` is the JS wrapper's (it never reaches the engine).
  assert.deepEqual(fields('ChatRequest'), uniq([...names, 'signal']));
});

it('CompletionRequest declares every field a text completion accepts (runtime/request.rs KNOWN_TEXT), and no other', () => {
  const src = read('src/runtime/request.rs');
  const known = src.slice(src.indexOf('pub const KNOWN_TEXT')).split('];')[0];
  const names = [...known.matchAll(/"(\w+)"/g)].map((m) => m[1]);
  assert.deepEqual(fields('CompletionRequest'), uniq([...names, 'signal']));
});

/** The text of the API.md section under the heading that starts with `title`. */
function section(title) {
  const md = read('js/API.md');
  const start = md.split('\n').findIndex((l) => /^#+ /.test(l) && l.replace(/^#+ /, '').startsWith(title));
  assert.ok(start >= 0, `js/API.md has no section "${title}"`);
  const lines = md.split('\n');
  const level = lines[start].match(/^#+/)[0].length;
  const end = lines.findIndex((l, i) => i > start && /^#+ /.test(l) && l.match(/^#+/)[0].length <= level);
  return lines.slice(start, end < 0 ? undefined : end).join('\n');
}
/** Names in backticks in the first cell of each table row of `text`. */
const rowNames = (text) => text.split('\n').filter((l) => l.startsWith('| `'))
  .flatMap((l) => [...l.split('|')[1].matchAll(/`([^`]+)`/g)].map((m) => m[1]));
const undocumented = (names, documented) => names.filter((n) => !documented.includes(n));

it('js/API.md documents every option, policy key, stats field, request field and error code', () => {
  const options = rowNames(section('Options'));
  assert.deepEqual(undocumented([...fields('EngineOptions'), 'autoRelease'], options), [], 'options');
  assert.deepEqual(undocumented(fields('Policy'), options), [], 'policy keys');
  assert.deepEqual(undocumented(fields('Stats'), rowNames(section('`stats()` fields'))), [], 'stats fields');
  assert.deepEqual(undocumented(fields('ChatRequest'), rowNames(section('Chat'))), [], 'request fields');
  assert.deepEqual(undocumented(literals('ErrorCode'), rowNames(section('Errors'))), [], 'error codes');
  // Each row has an example (a last cell that is not empty).
  for (const t of ['Options', '`stats()` fields', 'Errors']) {
    for (const row of section(t).split('\n').filter((l) => l.startsWith('| `'))) {
      assert.ok(row.split('|').at(-2).trim(), `API.md ${t}: no example in ${row}`);
    }
  }
});

it('js/API.md shows an example of every event type and of checkSupport()', () => {
  const events = section('Events');
  for (const type of literals('EngineEvent', 'type')) {
    assert.match(events, new RegExp(`^### .*\`${type}\``, 'm'), `no heading for the ${type} event`);
    assert.ok(events.includes(`{ type: '${type}'`), `no example of the ${type} event`);
  }
  const backends = section('Backends');
  for (const f of [...fields('Support'), ...fields('GpuOffer'), ...Object.keys(decls.GpuOffer.fields.limits.shape.fields)]) {
    assert.match(backends, new RegExp(`\\b${f}: `), `checkSupport() example lacks ${f}`);
  }
});
