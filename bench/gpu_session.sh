#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, a CUDA build of torch, Triton and nvcc
# (nothing is installed from the network: the extensions are built in place).
#
#   bash bench/gpu_session.sh all [OUT]     build, the GPU test matrix, then the benchmark,
#                                           all within FASTOPT_GPU_SECONDS (default 540)
#   bash bench/gpu_session.sh tests [OUT]   build, then the GPU test matrix
#   bash bench/gpu_session.sh bench [OUT]   build, then the GPU throughput benchmark
#                                           (each also within FASTOPT_GPU_SECONDS)
#
# `all` is the check for a lease of 15 minutes of device time: one call of at most ten
# minutes after the machine's start, and a few minutes left to rerun what failed. Its time
# after the build goes 55 % to the tests (FASTOPT_GPU_TEST_SHARE) and the rest to the
# benchmark. The tests run in two tiers: every CUDA case but the whole family first (what
# has never passed on a GPU is there), then the whole family on both backends, CUDA C++
# first, in 64 slices, until the tests' time is up. The benchmark measures in the order of
# bench.gpu_throughput.plan and starts nothing once its budget is spent; it still prints
# the table and the targets.
#
# FASTOPT_GPU_BUILD=0 skips the build (a second call on the same warm machine: the first
# call's extensions are still in place). Logs, the failures (as they happen) and the
# benchmark's CSV and PNG go to OUT (default: $OUT if set, else bench/results/gpu_session),
# seven files at most; the benchmark also writes its files to bench/results/. gpu.txt ends
# with a summary of the whole run.
# Record a passing matrix in bench/results/GPU_TESTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu_session.sh all|tests|bench [OUT]}
out=${2:-${OUT:-bench/results/gpu_session}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export FASTOPT_CUDA_ARCH=${FASTOPT_CUDA_ARCH:-90}
total=${FASTOPT_GPU_SECONDS:-540}
case "$stage" in all | tests | bench) ;; *)
    echo "unknown stage $stage (all, tests or bench)" >&2
    exit 2
    ;;
esac

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

# fastopt._C (CPU), fastopt._host (the step's host passes, against this torch) and
# fastopt._cuda (build_cuda.py, run by setup.py where nvcc and a CUDA torch are present),
# built in place side by side (pip builds them one after another: _C's slowest object
# takes over a minute on its own); a failed build leaves that part out, which the tests
# then report. The checkout on PYTHONPATH stands for an install, in the tests' child
# processes too. (FASTOPT_GPU_BUILD=0: a later call on the same warm machine keeps the
# first call's build.)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${FASTOPT_GPU_BUILD:-1}" != 0 ]; then
    python3 setup.py -q build_ext --inplace --parallel 16 >"$out/build.log" 2>&1 ||
        python3 -m pip install --no-build-isolation --no-deps -e . >>"$out/build.log" 2>&1 ||
        echo "build failed: see build.log"
fi
python3 -c "import fastopt; from fastopt import tensor_lists; print({k: v or 'ok' for k, v in fastopt.available_backends().items()}, 'host passes in C++:', tensor_lists.native())" | tee -a "$out/gpu.txt"
echo "build: $SECONDS s" | tee -a "$out/gpu.txt"

GPU_FILES=(
    tests/test_triton_backend.py tests/test_cuda_backend.py tests/test_gpu_matrix.py tests/test_amp_device_hooks.py
    tests/test_capturable.py tests/test_distributed.py tests/test_reliability_hostile.py
    tests/test_reliability_determinism.py tests/test_reliability_checkpoint.py
    tests/test_reliability_amp.py tests/test_reliability_scale.py tests/test_step_footprint.py
)
# the CUDA C++ family first: its kernels are built already, Triton's compile as they run
FAMILY_TESTS=(
    tests/test_cuda_backend.py::test_whole_family_matches_torch_backend
    tests/test_triton_backend.py::test_whole_family_cuda
)

# run_pytest LABEL SECONDS ARGS...: pytest for at most SECONDS, then SIGINT, so that pytest
# still prints its summary of what ran; each failure's message is appended to failures.txt
# as it happens (tests/failure_log.py), in case even that is cut short
run_pytest() {
    local label=$1 seconds=$2
    shift 2
    FASTOPT_FAILURE_LOG="$out/failures.txt" timeout -s INT -k 30 "$seconds" python3 -m pytest -q -n "${FASTOPT_GPU_WORKERS:-16}" \
        -p no:cacheprovider -p no:benchmark --timeout 300 -rfE "$@" 2>&1 | tee -a "$out/tests.log"
    echo "[pytest $label: exit ${PIPESTATUS[0]} (124: cut at its limit), limit $seconds s, at $SECONDS s]" |
        tee -a "$out/tests.log"
}

summary() {
    {
        echo "== summary (${SECONDS} s in all)"
        grep -E "^\[pytest|^=* ?([0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran)\b.* in [0-9.]+s" "$out/tests.log" 2>/dev/null
        [ -s "$out/failures.txt" ] && echo "failures: $(grep -c '^==== ' "$out/failures.txt") (failures.txt)"
        sed -n '/^not measured/p;/^Targets:/,$p' "$out/bench.log" 2>/dev/null
    } | tee -a "$out/gpu.txt"
}

rm -f "$out/failures.txt" "$out/tests.log"
case "$stage" in
tests)
    left=$((total - SECONDS))
    run_pytest matrix $((left > 60 ? left - 30 : 30)) "${GPU_FILES[@]}"
    ;;
bench)
    # the sets and experiments that fit one call (the 1B set and the layout experiment:
    # python3 -m bench.gpu_throughput --sets gpt2-1B --experiments layout; the AMP step with
    # p.grad written back, against torch fused under the same lent scale:
    # python3 -m bench.gpu_throughput --sets 64M,1000x64k --optimizers adam,adam_amp)
    left=$((total - SECONDS))
    timeout -k 15 $((left > 20 ? left - 10 : 10)) python3 -m bench.gpu_throughput --out bench/results \
        --budget $((left > 80 ? left - 70 : 10)) \
        --sets 64M,1000x64k,resnet50,gpt2-small --experiments tiny 2>&1 | tee "$out/bench.log"
    ;;
all)
    left=$((total - SECONDS))
    tests_end=$((SECONDS + left * ${FASTOPT_GPU_TEST_SHARE:-55} / 100))
    deselect=()
    for t in "${FAMILY_TESTS[@]}"; do deselect+=(--deselect "$t"); done
    run_pytest "matrix without the family" $(((tests_end - SECONDS) * 3 / 4)) "${GPU_FILES[@]}" "${deselect[@]}"
    [ $((tests_end - SECONDS)) -gt 30 ] && run_pytest "whole family" $((tests_end - SECONDS)) "${FAMILY_TESTS[@]}"
    # the benchmark's budget leaves a minute for the cell in flight, the table and the PNG
    left=$((total - SECONDS))
    timeout -k 15 $((left > 20 ? left - 10 : 10)) python3 -m bench.gpu_throughput --out bench/results \
        --budget $((left > 80 ? left - 70 : 10)) --rounds 7 \
        --sets 64M,1000x64k,resnet50,gpt2-small --experiments tiny 2>&1 | tee "$out/bench.log"
    ;;
esac
cp bench/results/throughput_cuda_* "$out/" 2>/dev/null || true
summary
