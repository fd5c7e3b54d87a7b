// Checks real objects against the package's declarations (js/*.d.ts), read with the TypeScript
// compiler API: every interface, type alias and class becomes a shape, and a value is compared
// with it both ways. A required field the value lacks is "declared but not returned"; a field
// the value has that the type does not declare is "returned but not declared"; optional fields
// may be absent. Messages name the type and the field path (`Stats.heapRatio`,
// `ChatCompletionChunk.choices[].delta.role`). Used by npm_import.mjs on what the browser
// returned; dts-check.test.mjs checks the checker.

import { readFileSync } from 'node:fs';
import ts from 'typescript';

/** Shapes of every named declaration in `files`: { name: shape }. */
export function loadDeclarations(files) {
  const nodes = new Map();
  for (const file of files) {
    const src = ts.createSourceFile(file, readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true);
    for (const st of src.statements) {
      if ((ts.isInterfaceDeclaration(st) || ts.isTypeAliasDeclaration(st) || ts.isClassDeclaration(st)) && st.name) {
        (nodes.get(st.name.text) ?? nodes.set(st.name.text, []).get(st.name.text)).push(st);
      }
    }
  }
  const decls = {};
  const building = new Set();
  const named = (name) => {
    if (decls[name]) return decls[name];
    if (!nodes.has(name)) return { kind: 'any', why: `unknown type ${name}` };
    if (building.has(name)) return { kind: 'ref', name };
    building.add(name);
    // Declaration merging: an interface and a class of one name are one object type.
    const parts = nodes.get(name).map((n) => (ts.isTypeAliasDeclaration(n) ? shapeOf(n.type) : members(n)));
    building.delete(name);
    decls[name] = parts.length === 1 ? parts[0] : mergeObjects(parts);
    return decls[name];
  };
  const members = (n) => {
    const fields = {};
    for (const h of n.heritageClauses ?? []) {
      for (const t of h.types) {
        const base = t.expression.getText();
        if (base === 'Error') fields.message = { optional: false, shape: { kind: 'string' } };
        else Object.assign(fields, named(base).fields ?? {});
      }
    }
    for (const m of n.members) {
      const static_ = m.modifiers?.some((x) => x.kind === ts.SyntaxKind.StaticKeyword);
      if (static_ || !(ts.isPropertySignature(m) || ts.isPropertyDeclaration(m)) || !m.type) continue;
      fields[m.name.getText()] = { optional: Boolean(m.questionToken), shape: shapeOf(m.type) };
    }
    return { kind: 'object', fields };
  };
  const shapeOf = (t) => {
    switch (t.kind) {
      case ts.SyntaxKind.NumberKeyword: return { kind: 'number' };
      case ts.SyntaxKind.StringKeyword: return { kind: 'string' };
      case ts.SyntaxKind.BooleanKeyword: return { kind: 'boolean' };
      case ts.SyntaxKind.NullKeyword: return { kind: 'literal', value: null };
      case ts.SyntaxKind.UnknownKeyword: case ts.SyntaxKind.AnyKeyword: return { kind: 'any' };
      default: break;
    }
    if (ts.isParenthesizedTypeNode(t)) return shapeOf(t.type);
    if (ts.isLiteralTypeNode(t)) {
      const l = t.literal;
      if (l.kind === ts.SyntaxKind.NullKeyword) return { kind: 'literal', value: null };
      if (ts.isStringLiteral(l)) return { kind: 'literal', value: l.text };
      if (ts.isNumericLiteral(l)) return { kind: 'literal', value: Number(l.text) };
      if (l.kind === ts.SyntaxKind.TrueKeyword || l.kind === ts.SyntaxKind.FalseKeyword) {
        return { kind: 'literal', value: l.kind === ts.SyntaxKind.TrueKeyword };
      }
    }
    if (ts.isArrayTypeNode(t)) return { kind: 'array', element: shapeOf(t.elementType) };
    if (ts.isUnionTypeNode(t)) return { kind: 'union', options: t.types.map(shapeOf) };
    if (ts.isTypeLiteralNode(t)) return members(t);
    if (ts.isTypeReferenceNode(t)) {
      const name = t.typeName.getText();
      if (name === 'Record') return { kind: 'record', value: shapeOf(t.typeArguments[1]) };
      if (name === 'Array') return { kind: 'array', element: shapeOf(t.typeArguments[0]) };
      return { kind: 'ref', name };
    }
    // Functions, intersections, tuples: nothing an engine returns is checked against them.
    return { kind: 'any', why: ts.SyntaxKind[t.kind] };
  };
  for (const name of nodes.keys()) named(name);
  return decls;
}

function mergeObjects(parts) {
  const fields = {};
  for (const p of parts) Object.assign(fields, p.fields ?? {});
  return { kind: 'object', fields };
}

const describe = (v) => (v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v === 'object' ? 'an object' : `${typeof v} ${JSON.stringify(v)}`);

/**
 * The mismatches between `value` and the declared type `name`: a list of messages, empty when
 * they agree. A union of object types is matched by its literal `type` (or `object`) field.
 */
export function check(decls, name, value) {
  const problems = [];
  compare(decls, { kind: 'ref', name }, value, name, problems);
  return problems;
}

function compare(decls, shape, v, path, out) {
  switch (shape.kind) {
    case 'any': return;
    case 'ref': return compare(decls, decls[shape.name] ?? { kind: 'any' }, v, path, out);
    case 'number': case 'string': case 'boolean':
      if (typeof v !== shape.kind) out.push(`${path}: declared ${shape.kind}, returned ${describe(v)}`);
      return;
    case 'literal':
      if (v !== shape.value) out.push(`${path}: declared ${JSON.stringify(shape.value)}, returned ${describe(v)}`);
      return;
    case 'array':
      if (!Array.isArray(v)) { out.push(`${path}: declared an array, returned ${describe(v)}`); return; }
      v.forEach((x) => compare(decls, shape.element, x, `${path}[]`, out));
      return;
    case 'record':
      if (v === null || typeof v !== 'object') { out.push(`${path}: declared a record, returned ${describe(v)}`); return; }
      for (const [k, x] of Object.entries(v)) compare(decls, shape.value, x, `${path}.${k}`, out);
      return;
    case 'union': return compareUnion(decls, shape, v, path, out);
    case 'object': return compareObject(decls, shape, v, path, out);
    default: throw new Error(`unknown shape ${shape.kind}`);
  }
}

function compareObject(decls, shape, v, path, out) {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    out.push(`${path}: declared an object, returned ${describe(v)}`);
    return;
  }
  for (const [k, f] of Object.entries(shape.fields)) {
    if (!(k in v) || v[k] === undefined) {
      if (!f.optional) out.push(`${path}.${k}: declared but not returned`);
    } else {
      compare(decls, f.shape, v[k], `${path}.${k}`, out);
    }
  }
  for (const k of Object.keys(v)) {
    if (!(k in shape.fields)) out.push(`${path}.${k}: returned (${describe(v[k])}) but not declared`);
  }
}

const resolve = (decls, s) => (s.kind === 'ref' ? resolve(decls, decls[s.name] ?? { kind: 'any' }) : s);

function compareUnion(decls, shape, v, path, out) {
  const options = shape.options.map((o) => ({ o, r: resolve(decls, o) }));
  // Discriminated object unions (events, chunks): the member whose literal tag matches.
  for (const tag of ['type', 'object']) {
    const tagged = options.filter(({ r }) => r.kind === 'object' && r.fields[tag]?.shape.kind === 'literal');
    if (tagged.length && v && typeof v === 'object' && tag in v) {
      const hit = tagged.find(({ r }) => r.fields[tag].shape.value === v[tag]);
      if (!hit) {
        const names = tagged.map(({ r }) => JSON.stringify(r.fields[tag].shape.value)).join(' | ');
        out.push(`${path}.${tag}: returned ${JSON.stringify(v[tag])}, declared ${names}`);
        return;
      }
      const label = hit.o.kind === 'ref' ? hit.o.name : path;
      compare(decls, hit.o, v, label === path ? path : label, out);
      return;
    }
  }
  if (options.every(({ r }) => r.kind === 'literal')) {
    if (!options.some(({ r }) => r.value === v)) {
      out.push(`${path}: declared ${options.map(({ r }) => JSON.stringify(r.value)).join(' | ')}, returned ${describe(v)}`);
    }
    return;
  }
  // Otherwise the first option that fits; if none does, the closest one's complaints.
  let best = null;
  for (const { o } of options) {
    const p = [];
    compare(decls, o, v, path, p);
    if (!p.length) return;
    if (!best || p.length < best.length) best = p;
  }
  out.push(...best);
}
