#!/usr/bin/env python3
"""Checks tests/FAULTS.md against the tests it names: every row of every table must name at
least one test, and every test it names must exist (a renamed or deleted test fails this, so
the matrix cannot quietly rot). Prints {"faults_total", "faults_tested", "missing"} as JSON;
exits 1 when a row has no test or a named test does not exist.

Names understood (see the header of FAULTS.md): native::AREA::NAME (wildcards `*` allowed),
web::NAME and web::faults::NAME, (lib) unit tests PATH::NAME, `e2e: TITLE` (a Playwright test
title, prefix), `npm: KEY` (a result key the npm import test asserts on), fuzz target `X`.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T = ROOT / "tests"


def text(paths):
    return "\n".join(p.read_text() for p in paths)


SOURCES = {
    "native": lambda area: text([T / "native" / f"{area}.rs"]) if (T / "native" / f"{area}.rs").exists() else "",
    "web": text([T / "web.rs", *sorted((T / "web").glob("*.rs"))]),
    "lib": text(sorted((ROOT / "src").rglob("*.rs"))),
    "e2e": text(sorted((T / "e2e").glob("*.test.mjs"))),
    "npm": text([T / "e2e" / "npm_import.mjs", T / "web" / "npm-page.html",
                 T / "e2e" / "threads.mjs", T / "web" / "threads-page.html"]),
    "fuzz": text([ROOT / "src" / "fuzz" / "targets.rs"]),
}


def has_fn(src, name):
    pat = re.escape(name).replace(r"\*", r"\w*")
    return re.search(rf"\bfn {pat}\b", src) is not None


def refs(cell):
    """(kind, name) for every test named in a test cell."""
    out = []
    for m in re.finditer(r"native::(\w+)::([\w*]+)", cell):
        out.append(("native", m.group(1), m.group(2)))
    for m in re.finditer(r"(?<![\w:])web::(?:faults::)?(\w+)", cell):
        out.append(("web", None, m.group(1)))
    for m in re.finditer(r"`?([\w:]+)::(\w+)`? \(lib\)", cell):
        out.append(("lib", None, m.group(2)))
    for m in re.finditer(r"e2e: ([^,;|(]+)", cell):
        out.append(("e2e", None, m.group(1).strip()))
    for m in re.finditer(r"npm: `?(\w+)", cell):
        out.append(("npm", None, m.group(1)))
    for m in re.finditer(r"fuzz targets? ((?:`\w+`(?:, | and )?)+)", cell):
        for t in re.findall(r"`(\w+)`", m.group(1)):
            out.append(("fuzz", None, t))
    return out


def exists(kind, area, name):
    if kind == "native":
        return has_fn(SOURCES["native"](area), name)
    if kind in ("web", "lib"):
        return has_fn(SOURCES[kind], name) or (kind == "lib" and f"mod {name}" in SOURCES["lib"])
    if kind == "e2e":
        return re.search(r"it\(\s*'" + re.escape(name), SOURCES["e2e"]) is not None
    if kind == "npm":
        return re.search(rf"\b{re.escape(name)}\b", SOURCES["npm"]) is not None
    if kind == "fuzz":
        return f'"{name}"' in SOURCES["fuzz"]
    return False


def main():
    rows, tested, missing = 0, 0, []
    for line in (T / "FAULTS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("fault", "") or set(cells[0]) <= {"-"}:
            continue
        rows += 1
        named = refs(cells[-1])
        gone = [f"{k}{'::' + a if a else ''}::{n}" for k, a, n in named if not exists(k, a, n)]
        if named and not gone and "**none**" not in cells[-1]:
            tested += 1
        else:
            missing.append({"fault": cells[0], "unknown_tests": gone, "no_test": not named})
    print(json.dumps({"faults_total": rows, "faults_tested": tested, "missing": missing}, indent=1))
    return 0 if tested == rows else 1


if __name__ == "__main__":
    sys.exit(main())
