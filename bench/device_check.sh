#!/usr/bin/env bash
# GPU check (docs/architecture.md, "Tests, CI and benchmarks"): on a CUDA machine with torch, triton, nvcc, ninja and pybind11 already
# installed (no network), build fastlm for sm_90, run the GPU tests, then the GPU benchmarks, all
# within ~9 minutes. Everything it produces (logs, JSON, PNG) goes to the folder given as $1.
#   bash bench/device_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bench/device_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 FASTLM_CUDA=1 FASTLM_CUDA_ARCHS=90 FASTLM_REQUIRE_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16}
python=${PYTHON:-python3}
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} > "$out/environment.txt" 2>&1

echo "== build (sm_90)"
if ! timeout 300 $python -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1; then
  echo "build failed; see $out/build.log"; tail -n 40 "$out/build.log"; exit 1
fi
$python -m fastlm info | tee "$out/info.txt"

echo "== pytest -m gpu"
timeout 180 $python -m pytest -q -m gpu -p no:cacheprovider tests > "$out/pytest-gpu.log" 2>&1 || status=1
tail -n 15 "$out/pytest-gpu.log"

echo "== benchmarks"
timeout 240 $python -m bench --out "$out" > "$out/bench.log" 2>&1 || status=1
tail -n 60 "$out/bench.log"
exit $status
