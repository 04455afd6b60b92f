#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU: under 7 minutes (GPU_CHECK_LIMIT_S, 410 s by default), so it can
# run twice in a quarter of an hour. Every step has its own budget and none runs past the limit: the steps come
# most important first, and the last ones are cut or skipped when time runs out (said in the log, status 1).
# Each benchmark writes its rows as it measures them, so a step cut short keeps what it measured.
#   1. the parity tests on CUDA (the Triton kernels compiled natively, against the PyTorch reference and the
#      independent formulas of tests/test_numerics.py, CUDA-graph capture included),
#   2. the step benchmark, quick grid (benchmarks/bench_step.py --quick: one GPO update of the SD3.5-M
#      transformer at 512 px, G = 8, bf16 and nf4 base, LoRA; gpo-fast's step vs the eager one, and
#      gpo-fast plan's planned peak beside torch.cuda.max_memory_allocated: commit the ratio),
#   3. the cuda-marked tests (pytest -m cuda, tests/test_cuda.py and beside it: nf4 and int8 bases loaded through
#      SD3Model.from_pretrained and training a LoRA, T5 in 8 bits, xformers against SDPA, the CUDA-graph capture
#      of the loss, the planned update peak against torch.cuda.max_memory_allocated, the overlap worker's device
#      and stream, a scored rollout keeping no decoded image on the GPU),
#   4. the rollout benchmark (benchmarks/bench_rollout.py: images/s of one group of 8 at 512 px, 10 steps,
#      CFG 4.5, the trainer's sampler vs StableDiffusion3Pipeline.__call__ on the same model, latents and
#      decoded images), then a scored rollout of 2 prompts x 8 with the counting reward (YOLO from its yaml)
#      scored in line and overlapped with sampling (rollout.overlap_scoring); skipped without ultralytics,
#   5. the kernel benchmark (benchmarks/bench_kernels.py: triton vs eager vs torch.compile; no new shape
#      after 25 s, its summary and plots written even when its budget stops it),
#   6. the compiled denoiser (model.compile = true) against eager: the same sampler's latents, the first compiled
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
LIMIT="${GPU_CHECK_LIMIT_S:-410}"  # the whole script, in seconds: under 7 minutes, twice in a quarter of an hour
START=$SECONDS
status=0

# step NAME BUDGET_S CMD...: run CMD for at most BUDGET_S seconds and never past LIMIT; skipped (status 1) when
# less than 10 s are left. Every benchmark writes its rows as it measures them, so a step cut short keeps them.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$((LIMIT - (SECONDS - START) - 3))
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    echo "== $name: skipped, the ${LIMIT} s limit is reached"
    status=1
    return
  fi
  echo "== $name (at most ${budget} s; $((SECONDS - START)) s so far)"
  timeout -k 2 "$budget" "$@" || status=1
}

{
  echo "== gpu_check $(date -u +%FT%TZ) commit ${GPO_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if compgen -G ".whl/*.whl" >/dev/null; then
    timeout -k 2 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  if ! timeout -k 2 30 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    # an old setuptools in the image, a read-only site: run from the source tree instead
    echo "pip install -e failed; running from the source tree"
    ln -sfn ../kernels gpo_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  XDIST=""
  "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"  # the parity tests compile ~75 kernels: in parallel
  timeout -k 2 15 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  step "parity tests on CUDA" 100 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_kernels.py tests/test_objective.py tests/test_numerics.py
  step "step benchmark (quick), the planned peak beside the measured one" 110 "$PY" benchmarks/bench_step.py --quick --steps 3
  step "cuda-marked tests" 60 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/
  step "rollout benchmark, scored" 70 "$PY" benchmarks/bench_rollout.py --repeats 3 --outputs latent images scored --prompts 2
  step "kernel benchmark" 50 "$PY" benchmarks/bench_kernels.py --budget-s 25
  step "compiled denoiser" 70 "$PY" benchmarks/bench_rollout.py --repeats 2 --outputs compiled
  echo "== gpu_check done in $((SECONDS - START)) s, status $status"
  exit $status
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
