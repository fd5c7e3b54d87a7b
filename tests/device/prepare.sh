#!/usr/bin/env bash
# Prepares, on this machine, what a lent GPU machine (the `device` tool's `run`) needs to run
# the WGSL engine's benchmark and GPU tests there: the Vulkan loader (that machine has the
# NVIDIA driver's ICD but no libvulkan), stripped release binaries and a font for the plots.
# All in `.gl/` and `.dev/`, which git is told to ignore here; carry both. Then, in one
# `run` call (see tests/device/run.sh):
#   run(command: "bash tests/device/run.sh", carry: [".gl", ".dev"], timeout_s: 420)
set -euo pipefail
cd "$(dirname "$0")/../.."
for d in /.gl/ /.dev/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
if ! compgen -G ".gl/libvulkan1_*.deb" > /dev/null; then
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  # shellcheck disable=SC2086
  apt-get $o update -qq
  # shellcheck disable=SC2086
  (cd .gl && apt-get $o download libvulkan1)
fi
cargo build --release
# The native test binary (the GPU parity, session and walk tests).
test_bin=$(cargo test --release --test native --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "native":
        print(m["executable"])')
mkdir -p .dev
strip -o .dev/flexquant target/release/flexquant
strip -o .dev/native "$test_bin"
cp /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf .dev/
du -sh .gl .dev
