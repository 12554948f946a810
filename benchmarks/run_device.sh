#!/usr/bin/env bash
# The GPU machine's steps, run from the repository root with the kernel library
# (jax_flash/_lib/) built beforehand: report the GPU and jax, check that the
# CUDA kernels load, run the GPU tests, run the benchmark sweep, and print the
# benchmark's markdown table last.
#
#   bash benchmarks/run_device.sh [--skip-tests] [--skip-bench] [--sm80-tests]
#                                 [BENCH FLAGS...]
#
# --sm80-tests runs the GPU tests a second time with JAX_FLASH_KERNELS=sm80, so
# that on Hopper the sm80 kernel family is tested as well as the default one.
#
# Every other argument goes to benchmarks/bench_attention.py, e.g.
#   bash benchmarks/run_device.sh --skip-tests --quick --seqs 4096
#
# Environment:
#   OUT           folder for logs and results (default ./device_out)
#   SKIP_TESTS=1, SKIP_BENCH=1   same as the flags
#   PYTEST_FLAGS  extra pytest arguments (e.g. "-k vmap")
#   TEST_WORKERS  pytest-xdist processes sharing the GPU (default 8)
#   TEST_TIMEOUT_S  limit for the test run (default 300)
#   DEADLINE_S    seconds this whole script may take (default 570); the
#                 benchmark starts no new cell past it, so its table is written
#
# Writes $OUT/env.txt, $OUT/gpu_tests.log (and gpu_tests_sm80.log),
# $OUT/bench.log and the benchmark's <gpu>-<date>.jsonl and .md.

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"

skip_tests="${SKIP_TESTS:-0}"
skip_bench="${SKIP_BENCH:-0}"
families=(default)
bench_args=()
for arg in "$@"; do
  case "$arg" in
    --skip-tests) skip_tests=1 ;;
    --skip-bench) skip_bench=1 ;;
    --sm80-tests) families=(default sm80) ;;
    *) bench_args+=("$arg") ;;
  esac
done

section() { printf '\n== %s\n' "$*"; }

section "environment"
{
  nvidia-smi -L || echo "nvidia-smi failed"
  python - <<'EOF'
import jax, jaxlib
print(f"python jax {jax.__version__}, jaxlib {jaxlib.__version__}")
print("devices:", jax.devices())
EOF
} 2>&1 | tee "$OUT/env.txt"

section "jax_flash CUDA kernels"
if ! python - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"; then
import sys
from jax_flash import _cuda
if not _cuda.available():
  print("FATAL: jax_flash CUDA kernels unavailable: "
        f"{_cuda.unavailable_reason()}", file=sys.stderr)
  sys.exit(1)
print("jax_flash CUDA kernels loaded and registered")
EOF
  echo "FATAL: no tests or benchmark run (build jax_flash/_lib, carry it)"
  exit 1
fi

tests_status="skipped"
tests_rc=0
if [[ "$skip_tests" != 1 ]]; then
  tests_status=""
  for family in "${families[@]}"; do
    if [[ $family == default ]]; then
      section "GPU tests"
      log="$OUT/gpu_tests.log"
      kernels=""
    else
      section "GPU tests, JAX_FLASH_KERNELS=$family"
      log="$OUT/gpu_tests_$family.log"
      kernels="$family"
    fi
    # shellcheck disable=SC2086  # PYTEST_FLAGS is a list of words
    # Compilation, not the kernels, dominates the test time: run the cases in
    # several processes sharing the GPU (no preallocation) and skip GEMM
    # autotuning of the references.
    JAX_FLASH_KERNELS="$kernels" \
    XLA_PYTHON_CLIENT_PREALLOCATE=false \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
    timeout "${TEST_TIMEOUT_S:-300}" python -m pytest -q -rs -n "${TEST_WORKERS:-8}" \
        ${PYTEST_FLAGS:-} tests/test_attention_gpu.py 2>&1 | tee "$log"
    rc=$?
    last_line="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -n 1)"
    if [[ $rc == 0 ]]; then
      status="passed: $last_line"
    elif [[ $rc == 124 ]]; then
      status="TIMED OUT after ${TEST_TIMEOUT_S:-300} s"
    else
      status="FAILED (rc $rc): $last_line"
    fi
    (( rc != 0 )) && tests_rc=$rc
    tests_status+="${tests_status:+; }$family kernels $status"
  done
fi

bench_rc=0
md=""
if [[ "$skip_bench" != 1 ]]; then
  section "benchmark"
  left=$(( ${DEADLINE_S:-570} - SECONDS - 30 ))
  (( left < 30 )) && left=30
  before="$(date +%s)"
  # The deadline comes first so that a --time-limit-s among the flags wins.
  python benchmarks/bench_attention.py --out-dir "$OUT" --time-limit-s "$left" \
      "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
  bench_rc=$?
  md="$(find "$OUT" -maxdepth 1 -name '*.md' -newermt "@$before" | head -n 1)"
fi

section "summary"
echo "GPU tests: $tests_status"
[[ "$skip_bench" != 1 ]] && echo "benchmark: rc $bench_rc"
if [[ -n "$md" ]]; then
  echo
  cat "$md"
fi
(( tests_rc != 0 )) && exit "$tests_rc"
exit "$bench_rc"
