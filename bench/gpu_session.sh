#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, a CUDA build of torch, Triton and nvcc
# (nothing is installed from the network: the extensions are built in place).
#
#   bash bench/gpu_session.sh tests [OUT]   build both extensions, run the GPU test matrix
#   bash bench/gpu_session.sh bench [OUT]   build, then the GPU throughput benchmark
#
# Each stage ends within about nine minutes. Logs, the failures (as they happen), the JUnit
# report and the benchmark's CSV and PNG go to OUT (default: $OUT if set, else
# bench/results/gpu_session); the benchmark also writes its files to bench/results/.
# Record a passing matrix in bench/results/GPU_TESTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu_session.sh tests|bench [OUT]}
out=${2:-${OUT:-bench/results/gpu_session}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export FASTOPT_CUDA_ARCH=${FASTOPT_CUDA_ARCH:-90}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

# fastopt._C (CPU), fastopt._host (the step's host passes, against this torch) and
# fastopt._cuda (build_cuda.py, run by setup.py where nvcc and a CUDA torch are present);
# a failed build leaves that part out, which the tests then report
start=$SECONDS
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || echo "pip install failed: see build.log"
python3 -c "import fastopt; from fastopt import tensor_lists; print({k: v or 'ok' for k, v in fastopt.available_backends().items()}, 'host passes in C++:', tensor_lists.native())" | tee -a "$out/gpu.txt"
echo "build: $((SECONDS - start)) s"

case "$stage" in
tests)
    # the CUDA cases of every file that has them; CI runs the rest of each file. Each
    # failure's message is appended to failures.txt as it happens (tests/failure_log.py):
    # pytest's own summary and JUnit report are lost if the time limit cuts the run short.
    rm -f "$out/failures.txt"
    FASTOPT_FAILURE_LOG="$out/failures.txt" timeout 480 python3 -m pytest -q -n 16 -p no:cacheprovider --timeout 300 -rfE \
        --junitxml="$out/gpu_tests.xml" \
        tests/test_triton_backend.py tests/test_cuda_backend.py tests/test_gpu_matrix.py tests/test_amp_device_hooks.py \
        tests/test_capturable.py tests/test_distributed.py tests/test_reliability_hostile.py \
        tests/test_reliability_determinism.py tests/test_reliability_checkpoint.py \
        tests/test_reliability_amp.py tests/test_reliability_scale.py tests/test_step_footprint.py \
        --deselect tests/test_cuda_backend.py::test_cuda_sources_compile 2>&1 | tee "$out/gpu_tests.log"
    ;;
bench)
    # the sets and experiments that fit one call (the 1B set and the layout experiment:
    # python3 -m bench.gpu_throughput --sets gpt2-1B --experiments layout; the AMP step with
    # p.grad written back, against torch fused under the same lent scale:
    # python3 -m bench.gpu_throughput --sets 64M,1000x64k --optimizers adam,adam_amp)
    timeout 520 python3 -m bench.gpu_throughput --out bench/results \
        --sets 64M,1000x64k,resnet50,gpt2-small --experiments tiny 2>&1 | tee "$out/bench.log"
    cp bench/results/throughput_cuda_* "$out/" 2>/dev/null || true
    ;;
*)
    echo "unknown stage $stage (tests or bench)" >&2
    exit 2
    ;;
esac
