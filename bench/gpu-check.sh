#!/usr/bin/env bash
# The GPU check, run once from the repository root on a machine with an
# NVIDIA GPU: the CUDA backend's agreement tests against the CPU reference,
# then agg_bench's GPU tables and, when PyTorch is importable, the same rules
# in PyTorch (bench/gpu_torch.py). Everything is also written to ${OUT:-gpu-out}/.
#
# Binaries: gpu-bin/gpu and gpu-bin/agg_bench when present (made elsewhere by
# bench/gpu-prepare.sh: nothing CUDA is needed to build them), else built here
# with cargo. GPU_PARAMS (default 8000000) and GPU_UPDATES (64) size the
# benchmark; 25000000 is the reference size.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PARAMS="${GPU_PARAMS:-8000000}"
UPDATES="${GPU_UPDATES:-64}"
BIN="${GPU_BIN:-gpu-bin}"
status=0

{ nvidia-smi || echo "nvidia-smi: not found"; } 2>&1 | tee "$OUT/nvidia-smi.txt"

# NVRTC (and the driver, if not in the loader's path) from a CUDA install or
# from the nvidia wheels of an installed PyTorch.
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, os; [print(os.path.join(p, x, "lib")) for p in nvidia.__path__ for x in os.listdir(p)]' 2>/dev/null); do
  if [ -d "$d" ] && ls "$d"/libnvrtc.so* >/dev/null 2>&1; then extra="$extra:$d"; fi
done
export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/env.txt"

if [ -x "$BIN/gpu" ] && [ -x "$BIN/agg_bench" ]; then
  GPU_TEST="$BIN/gpu"
  BENCH="$BIN/agg_bench"
  echo "using prebuilt $GPU_TEST and $BENCH"
else
  # A fresh target directory: building only fleet-aggregation is the least work.
  start=$(date +%s)
  GPU_TEST=$(cargo test --release -p fleet-aggregation --features cuda --test gpu --no-run 2>&1 \
    | tee "$OUT/build.txt" | sed -n 's/.*Executable tests\/gpu.rs (\(.*\))/\1/p')
  cargo build --release -p fleet-aggregation --features cuda --example agg_bench 2>&1 | tee -a "$OUT/build.txt"
  BENCH="${CARGO_TARGET_DIR:-target}/release/examples/agg_bench"
  echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.txt"
  if [ -z "$GPU_TEST" ] || [ ! -x "$BENCH" ]; then
    echo "build failed, see $OUT/build.txt"
    exit 1
  fi
fi

start=$(date +%s)
"$GPU_TEST" --nocapture --test-threads=1 2>&1 | tee "$OUT/gpu-test.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "agreement tests took $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu-test.txt"

start=$(date +%s)
"$BENCH" --gpu-only --gpu-params "$PARAMS" --gpu-updates "$UPDATES" 2>&1 | tee "$OUT/agg_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "agg_bench took $(( $(date +%s) - start )) s" | tee -a "$OUT/agg_bench.txt"

if python3 -c "import torch" 2>/dev/null; then
  python3 bench/gpu_torch.py --params "$PARAMS" --updates "$UPDATES" 2>&1 | tee "$OUT/torch.txt"
else
  echo "PyTorch not importable: torch comparison skipped" | tee "$OUT/torch.txt"
fi
exit $status
