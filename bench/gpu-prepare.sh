#!/usr/bin/env bash
# Builds the GPU check's binaries into gpu-bin/ on any x86_64 Linux machine
# (cudarc opens libcuda and NVRTC at run time; nothing CUDA is needed here),
# so that bench/gpu-check.sh on the GPU machine needs no Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
test=$(cargo test --release --workspace --features fleet-aggregation/cuda --test gpu --no-run 2>&1 \
  | sed -n 's/.*Executable tests\/gpu.rs (\(.*\))/\1/p')
cargo build --release --workspace --features fleet-aggregation/cuda --example agg_bench
mkdir -p gpu-bin
cp "$test" gpu-bin/gpu
cp "$target/release/examples/agg_bench" gpu-bin/agg_bench
strip gpu-bin/gpu gpu-bin/agg_bench
ls -l gpu-bin
