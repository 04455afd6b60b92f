#!/usr/bin/env bash
# The test suite on the CPU under the GPU machine's library versions, before spending GPU time on them.
#
# The lent H100 / H200 image (device tool's KINDS.md, read 2026-11) has torch 2.11.0 (triton 3.6.0),
# transformers 5.17.0, huggingface_hub 1.33.0, accelerate 1.15.0 and numpy 2.5.2 on Python 3.12, older than
# what `pip install -e ".[test]"` resolves today. This builds a fresh venv with those versions (diffusers,
# bitsandbytes and pydantic at the wheels gpu_check.sh carries, benchmarks/carried-wheels.txt) and runs the
# whole suite. numpy is held at 2.3.5: Triton 3.6's interpreter, which the CPU tests use, fails with
# numpy >= 2.4 (conftest.py says so and stops); on the GPU the kernels compile natively and numpy 2.5 is fine.
#
#   PYTHON=python3.12 bash benchmarks/stack_check.sh      # ~5 GB of wheels (torch 2.11 is a CUDA build);
#                                                         # PYTHON: any Python 3.12 (the image's), a full path works
#
# Measured 2026-11-27 on the 2-core CPU (AMD EPYC), at c3e65a7: 426 passed, 1 skipped (CUDA only),
# pytest 6 min 26 s with -n 2, 629 s in all (install included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.12}"
VENV="${STACK_VENV:-/tmp/gpo-fast-gpu-stack}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
cat >"$constraints" <<'EOF'
torch==2.11.0
torchvision==0.26.0
triton==3.6.0
transformers==5.17.0
huggingface_hub==1.33.0
accelerate==1.15.0
safetensors==0.8.0
tokenizers==0.23.2
numpy==2.3.5
EOF
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --constraint "$constraints" --constraint benchmarks/carried-wheels.txt -e ".[test]" \
  pytest-xdist
"$VENV/bin/python" -c "import torch, triton, transformers, huggingface_hub, numpy, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'huggingface_hub', huggingface_hub.__version__, 'numpy', numpy.__version__, 'diffusers', diffusers.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2
