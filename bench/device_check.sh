#!/usr/bin/env bash
# The GPU check: on a CUDA machine with torch, triton, nvcc, ninja and pybind11 already installed (no
# network), in one go and within 9 minutes: build fastlm for sm_90, tune the Triton launch configurations
# (python -m bench.tune), run every kernel's GPU tests (pytest -m gpu) while a second process fills the
# compile caches of the benchmark, then benchmark every op at its headline shapes against PyTorch and the
# peers and pick triton or cuda per op (fastlm/dispatch.json). Leaves 4 files in OUT: summary.md (environment,
# step times, test counts, tuning and speedup tables), tuning.json, dispatch.json and device_check.tar.gz
# (every log, JSON and plot).
#
#   bash bench/device_check.sh OUT            on the GPU machine
#   bash bench/device_check.sh --dry-run OUT  the same steps on the CPU: the interpreter, the emulator, quick
#                                              shapes, results kept out of the committed tables (CI runs it)
#
# Peers that the machine lacks (liger-kernel, cut-cross-entropy) are installed from wheels found in .whl/
# at the repository root, when present. Each step has its own time limit; a failed step is recorded in the
# summary and the check goes on, so that one call brings back everything that could be measured.
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bench/device_check.sh [--dry-run] OUT_DIR" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd)   # absolute before the cd below
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FASTLM_EMU=0

if [ $dry_run = 1 ]; then
  # the interpreter and the emulator; tables written to the work folder, never to the committed ones
  export TRITON_INTERPRET=1 FASTLM_TUNING="$work/tuning.json"
  limits=(build=300 tune=120 tests=240 bench=240 summary=30)
  tune_args=(--dry-run --out "$work/tuning.json" --budget-s 90 --jobs 2)
  test_args=(-n 2 tests/ops/test_norms.py -k "(triton or cuda_emu) and float16")
  bench_args=(--quick --ops norms,attention,cross_entropy)
  dispatch_file="$work/dispatch.json"
else
  export FASTLM_CUDA=1 FASTLM_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16}
  limits=(build=140 tune=90 tests=150 bench=125 summary=15)   # with wheels (15): at most 535 s
  tune_args=(--budget-s 78)
  test_args=(-n 12 -m gpu tests)
  bench_args=(--headline --ops norms,attention,cross_entropy,models --budget-s 95 --rep-ms 50)
  dispatch_file=fastlm/dispatch.json
fi
limit() { local pair; for pair in "${limits[@]}"; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done; }

status=0
echo -e "step\tstatus\tseconds" > "$work/steps.tsv"
# step NAME LIMIT_S COMMAND...: run COMMAND with a time limit, log to $work/NAME.log, record status and time
step() {
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS rc
  echo "== $name (limit ${seconds}s)"
  timeout -s INT -k 15 "$seconds" "$@" > "$work/$name.log" 2>&1
  rc=$?
  local verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="timed out"; elif [ $rc -ne 0 ]; then verdict="failed ($rc)"; fi
  [ "$verdict" = ok ] || status=1
  echo -e "$name\t$verdict\t$((SECONDS - start))" >> "$work/steps.tsv"
  echo "   $verdict in $((SECONDS - start))s"
  tail -n 4 "$work/$name.log"
}

{
  if [ $dry_run = 1 ]; then echo "dry run on $(uname -n): the CPU, Triton's interpreter"; else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; fi
  $python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda)"
  $python -c "import triton; print('triton', triton.__version__)"
  $python -c "import transformers; print('transformers', transformers.__version__)"
  command -v nvcc > /dev/null && nvcc --version | tail -n 2
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
} > "$work/environment.txt" 2>&1
cat "$work/environment.txt"

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  step wheels 15 $python -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The build: the extension is optional here (a failed compile still installs the package, whose Triton
# kernels then run alone; the summary says the cuda backend is missing and why).
if [ $dry_run = 1 ] && $python -c "import fastlm._C" 2> /dev/null; then
  echo "== build: reusing the existing build (dry run)"
  echo -e "build\treused\t0" >> "$work/steps.tsv"
else
  step build "$(limit build)" env FASTLM_REQUIRE_EXTENSION=0 \
    $python -m pip install --no-build-isolation --no-deps --no-index -e .
fi
$python -m fastlm info > "$work/info.txt" 2>&1 || status=1
cat "$work/info.txt"

step tune "$(limit tune)" $python -m bench.tune "${tune_args[@]}"
[ $dry_run = 1 ] || cp kernels/tuning.json "$work/tuning.json" 2> /dev/null

# GPU tests while a second process compiles what the benchmark will time (torch.compile, FlexAttention,
# Triton): both only load the GPU, neither is timed.
timeout -s INT -k 15 "$(limit tests)" $python -m bench "${bench_args[@]}" --warm-only > "$work/bench-warm.log" 2>&1 &
warm=$!
step tests "$(limit tests)" $python -m pytest -v -p no:cacheprovider --junitxml="$work/pytest.xml" "${test_args[@]}"
wait $warm || echo "   (cache warm-up: exit status $?, see bench-warm.log)"

step bench "$(limit bench)" $python -m bench "${bench_args[@]}" --out "$work" --update-dispatch \
  --dispatch-file "$dispatch_file"
[ -f "$dispatch_file" ] && cp "$dispatch_file" "$work/dispatch.json" 2> /dev/null

step summary "$(limit summary)" $python -m bench.device_summary "$work" "$work/summary.md"
cp "$work/summary.md" "$out/summary.md" 2> /dev/null || status=1
cp "$work/tuning.json" "$out/tuning.json" 2> /dev/null
cp "$work/dispatch.json" "$out/dispatch.json" 2> /dev/null
tar -czf "$out/device_check.tar.gz" -C "$work" --exclude=site .
files=$(find "$out" -type f | wc -l)
echo "== $files files in $out"
[ "$files" -le 8 ] || { echo "more than 8 files in $out: only 8 come back from the GPU machine"; status=1; }
cat "$work/summary.md" 2> /dev/null | head -n 80
exit $status
