#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_check.sh needs and the GPU image lacks (about 50 MB):
# diffusers, bitsandbytes, pydantic and its needs (pydantic-core for the device's CPython 3.12, x86-64), as
# pinned in benchmarks/carried-wheels.txt.
# Run here, where the package registry is reachable; then carry .whl in the device call (it is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r benchmarks/carried-wheels.txt
ls -la .whl
