#!/usr/bin/env bash
# The multi-GPU machine's steps, from the repository root with the kernel
# library (jax_flash/_lib/) built beforehand:
#   1. the kernel, variant and one-device ring tests on the first GPU alone;
#   2. the sharding and ring attention tests on every GPU (batch/head sharded,
#      sequence sharded, causal balanced ring, GQA) against the unsharded call;
#   3. the ring scaling benchmark (benchmarks/bench_ring.py) with the time left.
#
#   bash benchmarks/run_multi_device.sh [BENCH_RING FLAGS...]
#
# Environment: OUT (default ./device_out) gets the logs and the benchmark's
# .md/.jsonl; DEADLINE_S (default 570) bounds the whole script.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
deadline="${DEADLINE_S:-570}"
summary=()

run_tests() {  # name, limit in seconds, pytest arguments...
  local name="$1" limit="$2"
  shift 2
  timeout "$limit" python -m pytest -q -rs "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc $rc, $(grep -E '(passed|failed|error)' "$OUT/$name.log" | tail -n 1)")
}

nvidia-smi -L | tee "$OUT/env.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/env.txt"

scratch="$(mktemp -d)"
CUDA_VISIBLE_DEVICES=0 SKIP_BENCH=1 TEST_TIMEOUT_S=200 OUT="$scratch" \
    bash benchmarks/run_device.sh > "$scratch/run_device.log" 2>&1
cp "$scratch/gpu_tests.log" "$OUT/one_gpu_kernels.log" 2>/dev/null
summary+=("one GPU, kernel tests: $(grep -E '^GPU tests:' "$scratch/run_device.log")")
CUDA_VISIBLE_DEVICES=0 run_tests one_gpu_variants 150 -n 8 tests/test_variants.py
CUDA_VISIBLE_DEVICES=0 run_tests one_gpu_ring 100 -n 2 tests/test_ring.py -k one_device
run_tests all_gpus_sharding_ring 280 -n 4 tests/test_sharding.py tests/test_ring.py

left=$(( deadline - SECONDS - 20 ))
if (( left > 60 )); then
  # One process per machine: JAX's preallocated pool, as --longest-run needs.
  timeout "$left" env -u XLA_PYTHON_CLIENT_PREALLOCATE \
      python benchmarks/bench_ring.py --out-dir "$OUT" "$@" > "$scratch/bench_ring.log" 2>&1
  summary+=("bench_ring: rc $?")
fi

printf '%s\n' "${summary[@]}"
md="$(find "$OUT" -maxdepth 1 -name 'ring-*.md' | head -n 1)"
if [[ -n "$md" ]]; then cat "$md"; else tail -n 30 "$scratch/bench_ring.log" 2>/dev/null; fi
