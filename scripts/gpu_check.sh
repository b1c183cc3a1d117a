#!/usr/bin/env bash
# The GPU machine's one command: build the package there (its own Python 3.12 toolchain, no
# network), run the GPU tests and compute-sanitizer, and leave logs under $OUT. From this machine:
#   bash scripts/carry_cutlass.sh            # once: CUTLASS headers into .carry/ (git-ignored)
# then the device tool: run(command="bash scripts/gpu_check.sh", carry=[".carry"])
# Stages (default: build ctest pytest sanitize): bash scripts/gpu_check.sh build pytest
# PYTEST_ARGS adds pytest arguments, e.g. PYTEST_ARGS="-k tiny".
# The build holds both builds of the megakernel (FLASHFORMER_INSTRUMENTED=ON): the GPU tests run the
# shipped kernel, and the instrumented one where they need timing variants, the trace or test hooks.
# Performance stages: profile (benchmarks/profile_step.py: timing variants and the step trace;
# PROFILE_ARGS adds arguments) and ncu (one 8-layer step of the largest default bench shape, or
# NCU_MODEL, under Nsight Compute, exported as CSV; NCU_CASES, default 1x128; NCU_ARGS adds
# profile_step.py arguments, e.g. "--quantization fp8 --kv-cache-dtype fp8"; ncubase: the same for
# every .carry/base*.tar, into ncu.tgz's folder of each name, head's being head/). gencmp: generate's
# device timeline per step (benchmarks/profile_generate.py: the step's kernel, the sampler's, the gaps;
# GEN_ARGS) for every .carry/base*.tar and this tree, alternating, COMPARE_ROUNDS rounds. compare: the same
# profile for other commits, alternating with this tree's, in one lease (git archive --prefix=base/
# COMMIT > .carry/base.tar here first, or several .carry/base*.tar; COMPARE_ROUNDS, default 2; the
# bases need this profile_step.py's API). benchcmp: `flashformer bench` (each commit's own) of every
# .carry/base*.tar and of this tree, alternating, COMPARE_ROUNDS rounds (BENCH_ARGS, default
# "--batch 1,8 --peers none"; several sets of flags separated by ';' run one after another on the
# same builds), then a table of engine ms per row (and generate's ms per token). dumpcmp: benchmarks/dump_logits.py
# under every .carry/base*.tar and this tree, each base's logits compared with this tree's value for value (DUMP_ARGS:
# sets of dump flags separated by ';', default one bf16 and one FP8 set; each dump under a 150 s timeout, so a
# step that never ends is reported, not waited for). bench: this tree's bench of
# record into $OUT/h200 (BENCH_ARGS, default "--batch 1,8 --peers fast"; FLASHFORMER_COMMIT names it).
# Bases are built once per machine, into /tmp/ff-bases/ (keyed by the tarball's contents and
# BASE_INSTRUMENTED, default ON: compare and ncubase need the instrumented kernels, benchcmp does not).
# A call made within ~30 s of the last one finds the machine warm, with /tmp and the installed head
# still there, so a later call can skip `build` and reuse the bases. Stage prebuild starts the bases'
# builds in the background and goes on (e.g. `build prebuild pytest`: the bases build while the
# tests run); a later stage that needs them waits for them.
# Logs go to $OUT/logs.tgz (logs-1.tgz ... for later runs in the same call; the device tool returns
# at most 8 files), the summary to
# $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashformer-out}
LOGS=$(mktemp -d) NCU=$(mktemp -d)
mkdir -p "$OUT"
# (a second run in the same call keeps the first one's logs: logs-1.tgz, ...)
logs_tgz=$OUT/logs.tgz n=0
while [ -e "$logs_tgz" ]; do logs_tgz=$OUT/logs-$((++n)).tgz; done
trap 'tar czf "$logs_tgz" -C "$LOGS" .; [ -z "$(ls "$NCU")" ] || tar czf "$OUT/ncu.tgz" -C "$NCU" .' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PYTHONUNBUFFERED=1
stages=${*:-build ctest pytest sanitize}
status=0
step() {  # step NAME CMD...: run, log to $LOGS/NAME.log, remember failure, print a summary line
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$LOGS/$name.log")" | tee -a "$OUT/summary.txt"
  return $rc
}
has() { [[ " $stages " == *" $1 "* ]]; }

declare -A site  # base name -> its install (build_bases)
bases_built=  # (not ${#site[@]}: bash < 5.2 calls an empty associative array unbound under set -u)
base_dir() {  # base_dir TARBALL: where it is built on this machine
  echo "/tmp/ff-bases/$(sha1sum "$1" | cut -c1-16)-${BASE_INSTRUMENTED:-ON}"
}
build_base() {  # build_base TARBALL DIR: extract and install it into DIR/site; DIR/done or DIR/failed after
  mkdir -p "$2" && tar xf "$1" -C "$2" &&
    python3 -m pip install --no-build-isolation --no-deps --target "$2/site" "$2/base" \
      -Ccmake.define.CUTLASS_DIR="$PWD/.carry/cutlass" -Ccmake.define.FLASHFORMER_INSTRUMENTED="${BASE_INSTRUMENTED:-ON}" &&
    touch "$2/done" || { touch "$2/failed"; return 1; }
}
base_tars=()
find_bases() {  # find_bases STAGE: the .carry/base*.tar files into base_tars, or exit naming the stage
  base_tars=(.carry/base*.tar)
  [ -f "${base_tars[0]}" ] || { echo "$1: missing .carry/base.tar" | tee -a "$OUT/summary.txt"; exit 2; }
}
build_bases() {  # every .carry/base*.tar (git archive --prefix=base/ COMMIT), built once per machine
  [ -z "$bases_built" ] || return 0
  bases_built=1
  local tarball name dir
  find_bases "$1"
  for tarball in "${base_tars[@]}"; do
    name=$(basename "$tarball" .tar) dir=$(base_dir "$tarball")
    if [ -f "$dir/building" ] && [ ! -f "$dir/done" ] && [ ! -f "$dir/failed" ]; then
      step "wait-$name" bash -c "while [ ! -f '$dir/done' ] && [ ! -f '$dir/failed' ]; do sleep 2; done; [ -f '$dir/done' ] && echo built"
    elif [ -f "$dir/done" ]; then
      echo "build-$name: built earlier on this machine ($dir)" | tee -a "$OUT/summary.txt"
    else
      rm -rf "$dir"
      step "build-$name" build_base "$tarball" "$dir"
    fi
    [ -f "$dir/done" ] || { tail -n 40 "$dir/build.log" 2>/dev/null; exit 1; }
    site[$name]=$dir/site
  done
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$LOGS/gpu.txt" 2>&1
[ -f .carry/cutlass/include/cute/tensor.hpp ] || { echo "missing .carry/cutlass: run scripts/carry_cutlass.sh here and carry .carry" | tee "$OUT/summary.txt"; exit 2; }

if has build; then
  # From scratch: a warm machine keeps build/ between calls, and file times copied from another
  # machine can make an incremental build miss an edit.
  rm -rf build
  step build python3 -m pip install --no-build-isolation --no-deps -v . \
    -Ccmake.define.CUTLASS_DIR="$PWD/.carry/cutlass" -Ccmake.define.FLASHFORMER_INSTRUMENTED=ON ||
    { tail -n 60 "$LOGS/build.log"; exit 1; }
  cuobjdump --dump-resource-usage build/libflashformer_kernels.a >"$LOGS/resources.txt" 2>&1
  grep -A1 "Function.*megakernel" "$LOGS/resources.txt" | grep -o "REG:[0-9]* STACK:[0-9]* SHARED:[0-9]* LOCAL:[0-9]*" | tee -a "$OUT/summary.txt"
fi
if has prebuild; then
  find_bases prebuild
  export -f build_base
  for tarball in "${base_tars[@]}"; do
    dir=$(base_dir "$tarball")
    [ -f "$dir/done" ] && continue
    rm -rf "$dir" && mkdir -p "$dir" && touch "$dir/building"
    # its own session, so it outlives this call's command on a warm machine
    setsid nohup bash -c "cd '$PWD' && build_base '$tarball' '$dir'" >"$dir/build.log" 2>&1 </dev/null &
    echo "prebuild: $(basename "$tarball" .tar) building in the background into $dir" | tee -a "$OUT/summary.txt"
  done
fi
has ctest && step ctest ctest --test-dir build --output-on-failure
# shellcheck disable=SC2086
has pytest && step pytest python3 -m pytest -m gpu -v -p no:cacheprovider ${PYTEST_ARGS:-}
if has sanitize; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 build/cpp/tests/test_ops
  for tool in memcheck racecheck synccheck; do
    step "mk-$tool" env FLASHFORMER_WATCHDOG_MS=600000 compute-sanitizer --tool "$tool" --kernel-name kns=megakernel \
      --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider tests/test_megakernel.py -k sanitizer_smoke
    step "sampler-$tool" compute-sanitizer --tool "$tool" --kernel-name kns=flashformer --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py -k sampler_sanitizer_smoke
  done
fi
if has profile; then
  # shellcheck disable=SC2086
  step profile python3 benchmarks/profile_step.py --out "$LOGS" ${PROFILE_ARGS:-}
  cat "$LOGS/profile.log"
fi
alternate() {  # alternate PREFIX PATTERN SCRIPT [ARGS...]: this tree's SCRIPT over every base's install and
  # this tree's, alternating, COMPARE_ROUNDS rounds; the log lines matching PATTERN, each named
  local prefix=$1 pattern=$2 round name
  shift 2
  for round in $(seq "${COMPARE_ROUNDS:-2}"); do
    for name in "${!site[@]}"; do
      step "$prefix$name-$round" env PYTHONPATH="${site[$name]}" python3 "$@"
      grep -h "$pattern" "$LOGS/$prefix$name-$round.log" | sed "s/^/$name /"
    done
    step "${prefix}head-$round" python3 "$@"
    grep -h "$pattern" "$LOGS/${prefix}head-$round.log" | sed 's/^/head /'
  done
}
if has compare; then
  build_bases compare
  # shellcheck disable=SC2086
  alternate "" "^llama" benchmarks/profile_step.py ${PROFILE_ARGS:-}
fi
if has gencmp; then  # generate's device timeline (benchmarks/profile_generate.py; GEN_ARGS adds arguments)
  build_bases gencmp
  # shellcheck disable=SC2086
  alternate gen- "^{" benchmarks/profile_generate.py ${GEN_ARGS:-}
fi
if has dumpcmp; then
  build_bases dumpcmp
  IFS=';' read -ra dump_sets <<<"${DUMP_ARGS:---batch 1,8;--models llama-3.2-1b,llama-3.1-8b --quantization fp8}"
  for k in "${!dump_sets[@]}"; do
    # shellcheck disable=SC2086
    step "dump-head.$k" timeout 150 python3 benchmarks/dump_logits.py --out "$LOGS/dump-head.$k.pt" ${dump_sets[$k]}
    for name in "${!site[@]}"; do
      # shellcheck disable=SC2086
      step "dump-$name.$k" env PYTHONPATH="${site[$name]}" timeout 150 python3 benchmarks/dump_logits.py \
        --out "$LOGS/dump-$name.$k.pt" ${dump_sets[$k]}
      step "dumpcmp-$name.$k" python3 benchmarks/dump_logits.py --compare "$LOGS/dump-$name.$k.pt" "$LOGS/dump-head.$k.pt"
    done
  done
  rm -f "$LOGS"/dump-*.pt  # (the logs say what differed)
fi
bench_cli=(python3 -c 'import sys; from flashformer.cli import main; sys.exit(main(sys.argv[1:]))' bench --no-progress)
if has benchcmp; then
  build_bases benchcmp
  IFS=';' read -ra bench_sets <<<"${BENCH_ARGS:---batch 1,8 --peers none}"  # (';' between sets of flags)
  for round in $(seq "${COMPARE_ROUNDS:-2}"); do
    for k in "${!bench_sets[@]}"; do
      for name in "${!site[@]}"; do
        # shellcheck disable=SC2086
        step "bench-$name-$round.$k" env PYTHONPATH="${site[$name]}" FLASHFORMER_COMMIT="$name" "${bench_cli[@]}" \
          --out "$LOGS/bench-$name-$round.$k" ${bench_sets[$k]}
      done
      # shellcheck disable=SC2086
      step "bench-head-$round.$k" "${bench_cli[@]}" --out "$LOGS/bench-head-$round.$k" ${bench_sets[$k]}
    done
  done
  python3 - "$LOGS" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
runs = {p.parent.name[len("bench-"):]: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("bench-*/bench.json"))}
names = sorted({k.rsplit("-", 1)[0] for k in runs})
best = {n: {} for n in names}  # the fastest round of each row (noise only ever adds time)
for key, doc in runs.items():
    d = best[key.rsplit("-", 1)[0]]
    figures = [((r["model"], r["batch"], r["ctx"]), r["engine_ms"]) for r in doc["rows"]]
    figures += [((t["model"], "ttft", t["prompt_len"]), t["engine_ms"]) for t in doc["ttft"]]
    figures += [((g["model"], g["batch"], g["mode"]), g["ms_per_token"]) for g in doc.get("generate", [])]
    for row, ms in figures:
        d[row] = min(d.get(row, 1e9), ms)
print("model batch ctx " + " ".join(names) + "  (ms, best of rounds; last column / first - 1)")
for row in sorted(best[names[0]], key=str):
    vals = [best[n].get(row) for n in names]
    ratio = f"{vals[-1] / vals[0] - 1:+.1%}" if None not in vals else ""
    print(*row, *(f"{v:.3f}" if v else "-" for v in vals), ratio)
PY
fi
if has bench; then
  # shellcheck disable=SC2086
  step bench "${bench_cli[@]}" --out "$OUT/h200" ${BENCH_ARGS:---batch 1,8 --peers fast}
fi
ncu_run() {  # ncu_run NAME [PYTHONPATH]: one step of NCU_MODEL under Nsight Compute, into $NCU/NAME
  local name=$1 pp=${2:-} model
  model=${NCU_MODEL:-$(PYTHONPATH=$pp python3 -c 'from flashformer.bench import DEFAULT_MODELS; print(DEFAULT_MODELS[-1])')}
  mkdir -p "$NCU/$name"
  # shellcheck disable=SC2086
  step "ncu-$name" env PYTHONPATH="$pp" timeout 300 ncu --clock-control none --kernel-name regex:megakernel \
    --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters \
    --section MemoryWorkloadAnalysis -f -o "$NCU/$name/mk" python3 benchmarks/profile_step.py --models "$model" \
    --layers 8 --cases "${NCU_CASES:-1x128}" --ncu-step ${NCU_ARGS:-}
  ncu -i "$NCU/$name/mk.ncu-rep" --page details --csv >"$NCU/$name/details.csv" 2>&1
  ncu -i "$NCU/$name/mk.ncu-rep" --page source --csv --print-source sass >"$NCU/$name/sass.csv" 2>&1
  ncu -i "$NCU/$name/mk.ncu-rep" --page source --csv --print-source cuda >"$NCU/$name/cuda.csv" 2>&1
  ls -la "$NCU/$name" | tee -a "$OUT/summary.txt"
}
has ncu && ncu_run head
if has ncubase; then  # the same step for every .carry/base*.tar (this tree's profile_step.py), e.g. beside ncu
  build_bases ncubase
  for name in "${!site[@]}"; do ncu_run "$name" "${site[$name]}"; done
fi
exit $status
