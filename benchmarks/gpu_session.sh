#!/usr/bin/env bash
# What a session with a GPU runs, stage by stage (each stage fits one 10-minute device command):
#
#   bash benchmarks/gpu_session.sh build      # compile the extension for this GPU
#   bash benchmarks/gpu_session.sh test       # the whole suite, GPU tests included, all backends
#   bash benchmarks/gpu_session.sh sanitize   # compute-sanitizer memcheck/racecheck on the CUDA ops
#   bash benchmarks/gpu_session.sh bench [mixops-bench arguments, e.g. presets]
#                                             # default presets -> benchmarks/results/<gpu>/
#
# Logs and results go to $OUT when it is set (the device tool's return folder), else ./gpu-out.
# The GPU image has torch and triton installed and no network: the build uses them as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
gpu="$(python3 -c 'import torch; print(torch.cuda.get_device_name().lower().replace(" ", "-"))' 2>/dev/null || echo unknown-gpu)"

case "${1:-}" in
build)
  pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
  rc=$?
  python3 -c "import mixops, torch; print(mixops.cuda_extension_status(), torch.ops.mixops._cuda_arch_list(), torch.ops.mixops._device_arch(torch.zeros(1, device='cuda')))" >>"$out/build.log" 2>&1
  tail -5 "$out/build.log"
  exit $rc
  ;;
test)
  # every backend on CUDA tensors, fp32/fp16/bf16, determinism; no interpreter on a GPU machine
  MIXOPS_EXPECT_CUDA_EXTENSION=1 python3 -m pytest -q -x -p no:cacheprovider --junitxml="$out/tests.xml" \
    >"$out/tests.log" 2>&1
  rc=$?
  tail -30 "$out/tests.log"
  exit $rc
  ;;
sanitize)
  rc=0
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      python3 -m pytest -q -x -p no:cacheprovider -m needs_cuda -k "cuda" tests/test_morph_fc_cuda.py tests/test_atm_cuda.py \
      >"$out/sanitize-$tool.log" 2>&1 || rc=$?
    tail -5 "$out/sanitize-$tool.log"
  done
  exit $rc
  ;;
bench)
  mkdir -p "benchmarks/results/$gpu"
  mixops-bench --out "benchmarks/results/$gpu" "${@:2}" >"$out/bench.log" 2>&1
  rc=$?
  cp "benchmarks/results/$gpu"/* "$out/" 2>/dev/null
  tail -40 "$out/bench.log"
  exit $rc
  ;;
*)
  echo "usage: $0 build|test|sanitize|bench" >&2
  exit 2
  ;;
esac
