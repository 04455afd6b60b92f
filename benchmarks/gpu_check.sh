#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU. About 9 minutes, so it fits one 600 s device call: every step has
# a timeout (they add up to 620 s, 110 of them for installs and a version print that take seconds), the steps run
# most important first, and the kernel sweep starts no new shape after 40 s and writes its summary and plots even
# when its timeout stops it.
#   1. the parity tests on CUDA (the Triton kernels compiled natively, against the PyTorch reference,
#      CUDA-graph capture included),
#   2. the kernel benchmark (benchmarks/bench_kernels.py: triton vs eager vs torch.compile),
#   3. the step benchmark, quick grid (benchmarks/bench_step.py --quick: one GPO update of the SD3.5-M
#      transformer at 512 px, G = 8, bf16 and nf4 base, LoRA; gpo-fast's step vs the eager one, and
#      gpo-fast plan's planned peak beside the measured one: commit the ratio),
#   4. the rollout benchmark (benchmarks/bench_rollout.py: images/s of one group of 8 at 512 px, 10 steps,
#      CFG 4.5, the trainer's sampler vs StableDiffusion3Pipeline.__call__ on the same model, latents and
#      decoded images), then a scored rollout of 2 prompts x 8 with the counting reward (YOLO from its yaml)
#      scored in line and overlapped with sampling (rollout.overlap_scoring); skipped without ultralytics,
#   5. the compiled denoiser (model.compile = true) against eager: the same sampler's latents, the first compiled
#      call (the compile) and the calls after it (bench_rollout.py --outputs compiled).
# Writes gpu_check.log, kernels.csv, step.csv, rollout.csv, the plots and the summary to $OUT when set, else to
# benchmarks/results/. Commit what it wrote under benchmarks/results/ (the files carry the card's name).
#
# Packages the image lacks travel as wheels in .whl/ (benchmarks/fetch_wheels.sh downloads them; carry .whl in
# the device call); they are installed to /tmp/site when present. The step benchmark needs diffusers, bitsandbytes and pydantic (gpo_fast.config;
# with pydantic-core built for the device's Python, annotated-types, typing-inspection and
# typing-extensions >= 4.14, which pydantic needs and --no-deps does not check), the rollout benchmark
# diffusers; without them those steps fail with an ImportError in the log and the status is 1.
# Nothing here touches the network (HF_HUB_OFFLINE): the SD3.5-M configs are in the code.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY="${PYTHON:-python3}"
status=0
{
  echo "== gpu_check $(date -u +%FT%TZ) commit ${GPO_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if compgen -G ".whl/*.whl" >/dev/null; then
    timeout -k 5 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  if ! timeout -k 5 45 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    # an old setuptools in the image, a read-only site: run from the source tree instead
    echo "pip install -e failed; running from the source tree"
    ln -sfn ../kernels gpo_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  XDIST=""
  "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"  # the parity tests compile ~75 kernels: in parallel
  timeout -k 5 20 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "== parity tests on CUDA"
  timeout -k 5 110 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_kernels.py tests/test_objective.py || status=1
  echo "== kernel benchmark"
  timeout -k 5 85 "$PY" benchmarks/bench_kernels.py --budget-s 40 || status=1
  echo "== step benchmark (quick)"
  timeout -k 5 140 "$PY" benchmarks/bench_step.py --quick --steps 3 || status=1
  echo "== rollout benchmark"
  timeout -k 5 85 "$PY" benchmarks/bench_rollout.py --repeats 3 --outputs latent images scored --prompts 2 || status=1
  echo "== compiled denoiser"
  timeout -k 5 90 "$PY" benchmarks/bench_rollout.py --repeats 2 --outputs compiled || status=1
  echo "== gpu_check done, status $status"
  exit $status
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
