#!/usr/bin/env bash
# The prepared GPU check (issue 9): what a session with a lent GPU runs, as ONE device command
# (a device command may run 600 s; a loan is 15 minutes of device time in all):
#
#   MIXOPS_COMMIT=<sha> bash benchmarks/gpu_check.sh       # on the GPU machine (device timeout_s ~560)
#   bash benchmarks/gpu_check.sh --dry-run                 # anywhere without a GPU: the script's own logic
#   bash benchmarks/gpu_check.sh [--dry-run] STAGE...      # only these stages (e.g. a rerun on a warm machine)
#
# Stages, in priority order, each under its own time limit inside one budget
# (MIXOPS_CHECK_BUDGET_S, default 530 s, so the device's ~560 s limit is never what stops it):
#   build     the extension for the visible GPU (TORCH_CUDA_ARCH_LIST from the device); it needs the
#             CUTLASS headers staged first (benchmarks/stage_cutlass.sh, carry: [".cutlass"]), and the
#             script stops at once without them
#   tests     pytest -m needs_cuda: every kernel x backend x dtype against float64 (junit XML)
#   bench     mixops-bench's `headline` preset (the DESIGN.md targets) in bf16, ceilings in the same run
#   sanitize  compute-sanitizer memcheck + racecheck on the small case of each tests/test_*_cuda.py
# $OUT (the device tool's return folder, which brings back at most 8 files, at most 2 folders
# down; default /tmp/mixops-gpu-check-out) receives, as the run goes:
#   SUMMARY.md                the verdicts, read this first (rewritten before and after every stage)
#   gpu-check-files.tar.gz    every log, junit XML, per-test duration log, versions.json (idem)
#   results/<gpu>/<date>.*    the bench JSON/Markdown/PNG, written after every case: the layout of
#                             benchmarks/results/<gpu>/, ready to commit
# The dry run builds nothing, runs the same pytest commands (every needs_cuda test is collected
# and skipped without a GPU), times one small CPU case per headline target and only looks for
# compute-sanitizer.
set -uo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."

usage() { sed -n '2,7p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 2; }

ALL_STAGES=(build tests bench sanitize)
# seconds: the most a stage may take (MIXOPS_CHECK_CAPS="build=120 ..." changes it), and what the
# stages before it must leave it. A stage's limit is its cap or what is left after the later
# stages' reserves, whichever is less, so the tests get whatever the build did not use. The build
# (one arch, 16 cores) should take 60-90 s (CI: ~240 s of CPU for sm_90a on 2 cores): its cap is
# for a slow one. The sanitizers start a CUDA context and torch under instrumentation per tool.
declare -A CAP=([build]=240 [tests]=400 [bench]=150 [sanitize]=150)
declare -A RESERVE=([build]=0 [tests]=0 [bench]=90 [sanitize]=150)
for kv in ${MIXOPS_CHECK_CAPS:-}; do CAP[${kv%%=*}]=${kv#*=}; done
MIN_STAGE_S=20      # a stage with less time than this (or than its cap, if smaller) is skipped, not started
PUBLISH_S=${MIXOPS_CHECK_PUBLISH_S:-30}  # how often SUMMARY.md and the archive are rewritten while a stage runs
SUMMARY_S=10        # kept back at the end for the last summary
TEST_WORKERS=4      # pytest-xdist processes sharing the GPU (the GPU image has xdist), so Triton's JIT
                    # compiles on several cores; --dist loadfile keeps a test file in one process
SANITIZER_CASES="small_case_for_compute_sanitizer"  # -k: one tiny call of every kernel, per tests/test_*_cuda.py

# --- one stage's work (run as `gpu_check.sh --stage NAME` under `timeout`) -------------------

note() { printf '%s' "$*" >"$WORK/.note-$STAGE"; }

find_sanitizer() {
  local nvcc home=${CUDA_HOME:-/usr/local/cuda}
  command -v compute-sanitizer && return
  nvcc=$(command -v nvcc) && home="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"
  for f in "$home"/{bin,compute-sanitizer}/compute-sanitizer /usr/local/cuda/bin/compute-sanitizer; do
    [ -x "$f" ] && { echo "$f"; return; }
  done
  return 1
}

pip_install() {  # pip install -e . offline, flags in "$@"; the caller sets MIXOPS_*_CUDA
  python3 -m pip install --no-index --no-build-isolation --no-deps "${PIP_SYSTEM[@]}" "$@" -e . && return
  local rc=$?
  # a system python3 under PEP 668 refuses (the GPU image's python3 is a venv's, which never does)
  [ ${#PIP_SYSTEM[@]} = 0 ] && grep -q externally-managed-environment "$WORK/build.log" || return $rc
  PIP_SYSTEM=(--break-system-packages)  # for this call and the ones after it
  pip_install "$@"
}

stage_build() {
  local arch jobs
  jobs=$(nproc)
  if [ "$DRY" = 1 ]; then
    note "dry run: not built (on a GPU: TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS=$jobs, pip install -e .; CUTLASS headers: $CUTLASS_INCLUDE)"
    return 0
  fi
  # pure Python first (seconds): a CUDA build killed at the stage's limit still leaves mixops
  # importable, so the tests stage runs the Triton and torch tests and reports the CUDA ones
  PIP_SYSTEM=()
  # (each install names both switches: a caller's MIXOPS_FORCE_CUDA / MIXOPS_SKIP_CUDA must not leak in)
  MIXOPS_FORCE_CUDA= MIXOPS_SKIP_CUDA=1 pip_install || { note "pure-Python install failed: mixops is not installed"; return 1; }
  # a TORCH_CUDA_ARCH_LIST already set, else the visible GPU's architecture with the 'a' features
  # (wgmma, TMA) from sm_90 on: setup.py's own choice, recorded here for the summary
  arch=${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}.{m}" + "a" * (M >= 9))')} ||
    { note "no CUDA device: installed without the extension"; return 1; }
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs CUTLASS headers: $CUTLASS_INCLUDE"; command -v nvcc cmake ninja
  note "CUDA build (TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs) not finished: installed without the extension"
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs MIXOPS_SKIP_CUDA= MIXOPS_FORCE_CUDA=1 pip_install -v ||
    { note "CUDA build failed (TORCH_CUDA_ARCH_LIST=$arch): installed without the extension"; return 1; }
  python3 -c 'import mixops, sys; print(mixops.cuda_extension_status()); sys.exit(not mixops.cuda_extension_available())' ||
    { note "CUDA build done (TORCH_CUDA_ARCH_LIST=$arch) but the extension does not load"; return 1; }
  note "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs"
}

stage_tests() {
  local expect=1 workers=() rc
  if [ "$DRY" = 1 ]; then
    expect=0  # no extension; and one process collects faster than several
  elif python3 -c 'import xdist' 2>/dev/null; then
    workers=(-n "$TEST_WORKERS" --dist loadfile)
  fi
  # -v: the log shows the test a killed run was in; gpu_check_plugin labels each test with its
  # backend and logs it as it finishes (tests-log.tsv), which survives a kill the XML does not
  MIXOPS_EXPECT_CUDA_EXTENSION=$expect PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" \
    python3 -m pytest -p gpu_check_plugin -p no:cacheprovider -m needs_cuda "${workers[@]}" -v --durations=0 \
    -o junit_family=xunit1 --junitxml="$WORK/tests.xml" --gpu-check-log="$WORK/tests-log.tsv" tests
  rc=$?
  note "$([ "$DRY" = 1 ] && echo "dry run: collected and skipped (no GPU); ")${workers[*]:-one process}"
  return $rc
}

stage_bench() {
  # the timed run is bounded: the headline cases only, fewer repetitions than the CLI's default,
  # no torch.compile backend (its compile time alone would exceed the stage)
  local size=(--dtype bf16 --warmup 5 --rep 30)
  [ "$DRY" = 1 ] && size=(--device cpu --warmup 1 --rep 2)
  python3 -m mixops.bench.cli headline --modes fwd,fwd+bwd --backends official,triton,cuda "${size[@]}" \
    --out "$OUT/results/$GPU"
}

stage_sanitize() {
  local san tool t0 limit r status rc=0 files=(tests/test_*_cuda.py)
  printf 'tool\tstatus\tseconds\tnote\n' >"$WORK/sanitize.tsv"
  python3 -m pytest -p no:cacheprovider --collect-only -q -m needs_cuda -k "$SANITIZER_CASES" "${files[@]}" \
    >"$WORK/sanitize-cases.txt" 2>&1 || return 1
  if ! san=$(find_sanitizer); then
    printf '%s\tnot available\t0\tno compute-sanitizer found\n' memcheck racecheck >>"$WORK/sanitize.tsv"
    note "compute-sanitizer: not available"
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    printf '%s\tnot run\t0\tdry run (found %s)\n' memcheck "$san" racecheck "$san" >>"$WORK/sanitize.tsv"
    note "dry run: compute-sanitizer found at $san, not run"
    return 0
  fi
  for tool in memcheck racecheck; do
    t0=$SECONDS
    # memcheck may take half the stage (75 s at its reserve: pytest, torch's CUDA start and every
    # kernel's first load run instrumented), racecheck what is left; without the caching allocator every
    # tensor is its own cudaMalloc, so memcheck sees an access past a tensor's end, not into the pool
    if [ $tool = memcheck ]; then limit=$((STAGE_LIMIT / 2)); else limit=$((STAGE_LIMIT - SECONDS - 5)); fi
    if [ $limit -lt 10 ]; then  # (`timeout 0` would mean no limit at all)
      printf '%s\tskipped\t0\tno time left\n' "$tool" >>"$WORK/sanitize.tsv"
      rc=1
      continue
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --signal=INT --kill-after=5 "$limit" \
      "$san" --tool "$tool" --error-exitcode 99 --target-processes all \
      python3 -m pytest -p no:cacheprovider -q -m needs_cuda -k "$SANITIZER_CASES" \
      --junitxml="$WORK/sanitize-$tool.xml" "${files[@]}" >"$WORK/sanitize-$tool.log" 2>&1
    r=$?
    case $r in 0) status=ok ;; 124 | 137) status="timed out" ;; *) status="failed (exit $r)" ;; esac
    printf '%s\t%s\t%s\t\n' "$tool" "$status" $((SECONDS - t0)) >>"$WORK/sanitize.tsv"
    [ $r -eq 0 ] || rc=1
  done
  return $rc
}

if [ "${1:-}" = --stage ]; then
  STAGE=$2
  SECONDS=0  # the stage's own clock (STAGE_LIMIT counts from here)
  "stage_$STAGE" >"$WORK/$STAGE.log" 2>&1
  exit
fi

# --- the driver --------------------------------------------------------------------------------

DRY=0
stages=()
for arg in "$@"; do
  case $arg in
  --dry-run) DRY=1 ;;
  -h | --help) usage ;;
  *) [[ " ${ALL_STAGES[*]} " == *" $arg "* ]] || usage; stages+=("$arg") ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || stages=("${ALL_STAGES[@]}")

# The CUDA build needs the CUTLASS/CuTe headers, which the offline GPU machine cannot download:
# stop before anything runs (seconds of the loan, not a build's minutes) when they are missing.
CUTLASS_INCLUDE=
if [[ " ${stages[*]} " == *" build "* ]] && ! CUTLASS_INCLUDE=$(bash benchmarks/stage_cutlass.sh --check); then
  echo "gpu_check: the CUDA build needs the CUTLASS/CuTe headers. On the calling machine run" \
    "'bash benchmarks/stage_cutlass.sh', then the device call with carry: [\".cutlass\"] (benchmarks/README.md)" >&2
  exit 1
fi

# nvcc (the build) and compute-sanitizer where an image keeps the toolkit off the PATH
command -v nvcc >/dev/null || PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
OUT=${OUT:-${TMPDIR:-/tmp}/mixops-gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mixops-gpu-check.XXXXXX") || exit 1
start=$SECONDS
deadline=$((start + ${MIXOPS_CHECK_BUDGET_S:-530}))
[ "$DRY" = 1 ] && echo "dry run: no GPU, no build" >"$WORK/DRY_RUN"

publish() {  # SUMMARY.md, and every file of $WORK in one archive (the device returns 8 files at most)
  local snap tmp="$OUT/.gpu-check-files.tmp"
  python3 benchmarks/gpu_check_report.py summary "$WORK" "$OUT" || echo "gpu_check: the summary failed" >&2
  # a copy first: tar exits 1 on a log that grows while it reads it (a running stage's), cp does not
  snap=$(mktemp -d "${TMPDIR:-/tmp}/mixops-gpu-check-snap.XXXXXX") || return
  cp -r "$WORK/." "$snap" && find "$snap" -maxdepth 1 -name '.*' -exec rm -f {} + &&
    tar -czf "$snap.tar.gz" -C "$snap" . &&
    cp "$snap.tar.gz" "$tmp" && mv "$tmp" "$OUT/gpu-check-files.tar.gz" ||  # the rename is atomic
    echo "gpu_check: the archive failed" >&2
  rm -rf "$snap" "$snap.tar.gz" "$tmp"
}

publish_while_running() {  # every $PUBLISH_S s until $WORK/.stage-done: even a kill from outside returns progress
  local n=0
  until [ -e "$WORK/.stage-done" ]; do
    sleep 1
    n=$((n + 1))
    [ $((n % PUBLISH_S)) = 0 ] && publish
  done
}

set_stage() {  # stage status seconds limit note: one line of $WORK/stages.tsv, in stage order
  awk -F'\t' -v OFS='\t' -v s="$1" -v line="$1	$2	$3	$4	$5" '$1 == s { $0 = line } { print }' \
    "$WORK/stages.tsv" >"$WORK/stages.tmp" && mv "$WORK/stages.tmp" "$WORK/stages.tsv"
}

printf 'stage\tstatus\tseconds\tlimit\tnote\n' >"$WORK/stages.tsv"
for s in "${stages[@]}"; do printf '%s\tpending\t\t\t\n' "$s" >>"$WORK/stages.tsv"; done

GPU=$(python3 benchmarks/gpu_check_report.py versions "$WORK" 2>"$WORK/versions.log") || GPU=unknown-gpu
export OUT WORK DRY GPU CUTLASS_INCLUDE

for s in "${stages[@]}"; do
  later=0 after=0  # what the stages after this one must be left
  for t in "${stages[@]}"; do
    [ $after = 1 ] && later=$((later + RESERVE[$t]))
    [ "$t" = "$s" ] && after=1
  done
  left=$((deadline - SECONDS - SUMMARY_S))
  limit=$((CAP[$s] < left - later ? CAP[$s] : left - later))
  # too little to leave the later stages theirs: the earlier stage, of higher priority, goes first
  least=$((CAP[$s] < MIN_STAGE_S ? CAP[$s] : MIN_STAGE_S))
  [ $limit -lt $least ] && limit=$((CAP[$s] < left ? CAP[$s] : left))
  if [ $limit -lt $least ]; then
    set_stage "$s" "skipped" 0 "$limit" "not enough time left"
    continue
  fi
  set_stage "$s" "running (a summary that still says so was cut short)" "" "$limit" ""
  publish
  t0=$SECONDS
  rm -f "$WORK/.stage-done"
  publish_while_running &
  publisher=$!
  # SIGINT first: pytest then writes its junit XML; mixops-bench has written every finished case
  STAGE_LIMIT=$limit timeout --signal=INT --kill-after=15 "$limit" bash "$SELF" --stage "$s"
  rc=$?
  touch "$WORK/.stage-done"
  wait $publisher
  case $rc in 0) status=ok ;; 124 | 137) status="timed out" ;; *) status="failed (exit $rc)" ;; esac
  note=$(cat "$WORK/.note-$s" 2>/dev/null)
  rm -f "$WORK/.note-$s"
  set_stage "$s" "$status" $((SECONDS - t0)) "$limit" "$note"
  echo "gpu_check: $s $status in $((SECONDS - t0)) s (limit $limit s)"
  # the build changed what the versions report (the extension and the archs it was built for)
  if [ "$s" = build ] && [ "$DRY" = 0 ]; then
    python3 benchmarks/gpu_check_report.py versions "$WORK" >/dev/null 2>>"$WORK/versions.log"
  fi
  publish
done
publish  # the stages skipped at the end
rm -rf "$WORK"
echo "gpu_check: done in $((SECONDS - start)) s; read $OUT/SUMMARY.md"
