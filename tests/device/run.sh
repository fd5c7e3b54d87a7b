#!/usr/bin/env bash
# Runs on a lent GPU machine (the `device` tool), from the repository root, with `.gl/` and
# `.dev/` carried (tests/device/prepare.sh makes them): the native GPU benchmark on the demo
# model's shapes with random weights (`bench gpu --gpu-synthetic`: speed does not depend on
# the values, and the model is too large to carry), then the GPU tests with the adapter
# required. The report lands in $OUT/bench/gpu.json; merge its adapter into
# target/bench/gpu.json here (a run keeps the other adapters of the file it writes).
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && export VK_DRIVER_FILES="$icd"
# The tests were built here with paths under /work/main; the plots want a font.
mkdir -p /work /usr/share/fonts/truetype/dejavu target/release
[ -e /work/main ] || ln -s "$PWD" /work/main
cp .dev/DejaVuSans.ttf /usr/share/fonts/truetype/dejavu/
cp .dev/flexquant target/release/
out=${OUT:-target/device}
mkdir -p "$out/bench"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
timeout 240 ./.dev/flexquant bench gpu --gpu-synthetic --model x --text x --out-dir "$out/bench" \
  --gpu-decode-tokens 64 --gpu-prefill-tokens 64 2>&1 | tail -40
echo "bench exit: ${PIPESTATUS[0]}"
FLEXQUANT_REQUIRE_GPU=1 timeout 150 ./.dev/native gpu_ walk:: --test-threads 8 2>&1 | tail -15
