"""Sampling: the deterministic flow-matching ODE with classifier-free guidance, and group rollouts.

Noise levels go from 1 (pure noise) to 0 along the model's schedule (equal steps for the toy model,
the shifted schedule of the scheduler for SD3, as its pipeline samples); v = v_uncond + w * (v_cond -
v_uncond). Two solvers, one forward (two with guidance) per step each:
- "euler": x <- x + (sigma_next - sigma) * v, in float32;
- "dpm++2m": DPM-Solver++(2M), diffusers' DPMSolverMultistepScheduler for flow matching (the model's
  `dpm_solver`), second order from the second step on; the model sees the scheduler's (integer) timesteps,
  as StableDiffusion3Pipeline given that scheduler does.
Each image has its own starting noise, drawn from a seeded generator, so a rollout is reproducible.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from gpo_fast.models.base import SOLVERS, DiffusionModel, PromptEmbeds


@torch.no_grad()
def sample(
    model: DiffusionModel, prompts: list[str], *, steps: int, cfg_scale: float, generator: torch.Generator,
    batch_size: int = 256, noise: torch.Tensor | None = None, solver: str = "euler",
) -> torch.Tensor:
    """Final latents (B, *latent_shape) for the prompts, float32, on the model's device. The starting
    noise is drawn from `generator`, or given (`noise`, one per prompt)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if noise is None:
        noise = torch.randn((len(prompts), *model.latent_shape), generator=generator)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        out.append(_solve(model, chunk, noise[i : i + batch_size].to(model.device), steps, cfg_scale, solver))
    return torch.cat(out)


def _solve(model, prompts, x, steps, cfg_scale, solver="euler"):
    cond = model.encode_prompts(prompts)
    guided = cfg_scale != 1.0
    both = PromptEmbeds.cat([model.encode_prompts([""] * len(prompts)), cond]) if guided else None

    def velocity(x, s):
        if not guided:
            return model.predict(x, s, cond)
        v_uncond, v_cond = model.predict(torch.cat([x, x]), s, both).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    if solver == "euler":
        sigmas = model.schedule(steps).to(x.device)
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
        return x
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    sched = model.dpm_solver(steps)
    for t in sched.timesteps:
        v = velocity(x, (t.float() / 1000.0).to(x.device))  # the pipeline's timestep t, as a noise level
        x = sched.step(v.float(), t, x).prev_sample  # float32 in, float32 out
    return x


@torch.no_grad()
def rollout(
    model: DiffusionModel, prompts: list[str], group_size: int, *, steps: int, cfg_scale: float,
    generator: torch.Generator, batch_size: int = 0, noise: torch.Tensor | None = None,
    score: Callable[[torch.Tensor, int], object] | None = None, overlap: bool = True, solver: str = "euler",
) -> tuple[list[str], torch.Tensor, torch.Tensor] | tuple[list[str], torch.Tensor, torch.Tensor, list]:
    """G samples per prompt, members of a group contiguous: (prompts per sample, latents, images).
    batch_size: images per sampler forward (0: all at once); each batch is decoded as soon as it is drawn.

    score(images, start): called on every decoded batch (float32, on the CPU; `start` its first sample's
    index), under no_grad and without autocast; its results come back in batch order as a fourth element, and
    the images come back as those float32 CPU batches (each moved off the GPU once decoded: the GPU holds the
    final latents of the batches drawn so far and, while one is decoded, that batch's images, which
    gpo_fast.plan counts).
    With overlap (and more than one batch) a worker thread scores each batch while the sampler draws the
    next (on a GPU, on its own CUDA stream), so reward time hides behind sampling; the batches, and so the
    results, are the same either way."""
    per_sample = [p for p in prompts for _ in range(group_size)]
    n = len(per_sample)
    if noise is None:
        noise = torch.randn((n, *model.latent_shape), generator=generator)
    step = batch_size or n
    pool = ThreadPoolExecutor(1, thread_name_prefix="gpo-fast-score") if score and overlap and step < n else None
    device = _cuda_device(model.device)  # the worker scores on this device, not on cuda:0 (a new thread's current one)
    latents, images, scored = [], [], []
    try:
        for i in range(0, n, step):
            x = _solve(model, per_sample[i:i + step], noise[i:i + step].to(model.device), steps, cfg_scale, solver)
            img = model.decode(x)
            latents.append(x)
            if score is not None:
                batch = img.float().cpu()
                del img  # off the GPU at once, not kept while the next batch is drawn
                images.append(batch)
                scored.append(pool.submit(_score_in_worker, score, batch, i, device) if pool
                              else _score_here(score, batch, i))
            else:
                images.append(img)
        scored = [s.result() for s in scored] if pool else scored
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    out = per_sample, torch.cat(latents), torch.cat(images)
    return (*out, scored) if score is not None else out


def _score_here(score, images, start):
    """The score in this thread: autocast off (reward engines break on bf16 outputs of an enclosing one)."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return score(images, start)


def _cuda_device(device) -> torch.device | None:
    """The model's CUDA device with its index (a bare "cuda" is the current device), or None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


_SIDE_STREAMS: dict = {}
_SIDE_STREAMS_LOCK = threading.Lock()


def side_stream(device: torch.device):
    """One side stream per CUDA device, made once: a new stream per batch would each get its own pools in the
    caching allocator (up to 32 pooled streams), and one made in a fresh thread lands on cuda:0."""
    with _SIDE_STREAMS_LOCK:
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
        return _SIDE_STREAMS[device]


def _score_in_worker(score, images, start, device=None):
    """The score in the worker thread (no autocast there: it is per thread), on the model's device's side stream;
    the thread's current device is set to it first (a fresh thread's is cuda:0, whatever the rank)."""
    with torch.no_grad():
        if device is not None:
            torch.cuda.set_device(device)
            side = side_stream(device)
            with torch.cuda.stream(side):
                result = score(images, start)
            side.synchronize()  # whatever the reward left queued on its stream is done before the result is used
            return result
        return score(images, start)
