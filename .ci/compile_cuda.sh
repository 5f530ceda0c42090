#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc, compile only (no GPU needed), so that CI catches code
# that no longer builds. Usage: .ci/compile_cuda.sh [extra nvcc flags...]
# Environment: NVCC (default: nvcc on PATH), CUDA_ARCH (default 90), JOBS (parallel shards of
# each file's kernels, default: the number of CPUs).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
arch="${CUDA_ARCH:-90}"
jobs="${JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

if ! command -v "$nvcc" >/dev/null 2>&1; then
    echo "compile_cuda.sh: $nvcc not found" >&2
    exit 2
fi
"$nvcc" --version | tail -n 1

shopt -s nullglob
sources=("$root"/csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "compile_cuda.sh: no .cu files under csrc/" >&2
    exit 2
fi

status=0
for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    # The kernels of a file are split into shards (FASTOPT_SHARD, as build_cuda.py does),
    # compiled in parallel; together the shards compile every kernel once.
    pids=()
    for ((k = 0; k < jobs; k++)); do
        "$nvcc" -std=c++17 -O3 -arch="sm_$arch" -Xcompiler -fPIC -I"$root/csrc" \
            -DFASTOPT_SHARDS="$jobs" -DFASTOPT_SHARD="$k" "$@" \
            -c "$src" -o "$out/$name.$k.o" >"$out/$name.$k.log" 2>&1 &
        pids+=($!)
    done
    failed=0
    for ((k = 0; k < jobs; k++)); do
        if ! wait "${pids[$k]}"; then
            failed=1
            echo "FAILED: $src (shard $k of $jobs)" >&2
            cat "$out/$name.$k.log" >&2
        fi
    done
    if [ "$failed" -eq 0 ]; then
        echo "compiled: csrc/$name.cu (sm_$arch, $jobs shards)"
    else
        status=1
    fi
done
exit "$status"
