#!/usr/bin/env bash
# Installs fastopt and everything its tests and benchmarks need, from the repo's own files.
# torch is pinned: an unpinned torch would pull a CUDA build of several GB. The extension
# is built without build isolation so that no build environment ever fetches torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "numpy>=1.23" "pybind11>=2.10" "setuptools>=64" wheel
python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test,triton,bench]"
python -c "import fastopt; from fastopt import tensor_lists; print('fastopt', fastopt.__version__, 'backends:', {k: ('ok' if v is None else 'unavailable') for k, v in fastopt.available_backends().items()}, 'host passes in C++:', tensor_lists.native())"
