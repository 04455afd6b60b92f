#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_check.sh needs and the GPU image lacks (about 50 MB):
# diffusers, bitsandbytes, pydantic and its needs (pydantic-core for the device's CPython 3.12, x86-64).
# Run here, where the package registry is reachable; then carry .whl in the device call (it is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
ls -la .whl
