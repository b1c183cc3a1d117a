#!/usr/bin/env bash
# The GPU machine's one command: build the package there (its own Python 3.12 toolchain, no
# network), run the GPU tests, and leave logs under $OUT. Run from this machine with
#   bash scripts/carry_cutlass.sh            # once: CUTLASS headers into .carry/ (git-ignored)
# then the device tool: run(command="bash scripts/gpu_check.sh", carry=[".carry"])
# Extra pytest arguments may follow, e.g. `bash scripts/gpu_check.sh -k tma`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashformer-out}
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember failure, print a summary line
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1
[ -f .carry/cutlass/include/cute/tensor.hpp ] || { echo "missing .carry/cutlass: run scripts/carry_cutlass.sh here and carry .carry" | tee "$OUT/summary.txt"; exit 2; }

step build python3 -m pip install --no-build-isolation --no-deps -v . \
  -Ccmake.define.CUTLASS_DIR="$PWD/.carry/cutlass" || { tail -n 60 "$OUT/build.log"; exit 1; }
cuobjdump --dump-resource-usage build/libflashformer_kernels.a >"$OUT/resources.txt" 2>&1 || true
cuobjdump --dump-sass build/libflashformer_kernels.a >"$OUT/sass.txt" 2>&1 || true
echo "TMA loads in SASS: $(grep -c UTMALDG "$OUT/sass.txt")" | tee -a "$OUT/summary.txt"

step ctest ctest --test-dir build --output-on-failure
step pytest python3 -m pytest -m gpu -v -p no:cacheprovider "$@"
step sanitize compute-sanitizer --tool memcheck --error-exitcode 1 build/cpp/tests/test_gpu
exit $status
