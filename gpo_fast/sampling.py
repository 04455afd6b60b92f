"""Sampling: the deterministic flow-matching ODE (Euler) with classifier-free guidance, and group rollouts.

Noise levels go from 1 (pure noise) to 0 along the model's schedule (equal steps for the toy model,
the shifted schedule of the scheduler for SD3, as its pipeline samples); v = v_uncond + w * (v_cond -
v_uncond); x <- x + (sigma_next - sigma) * v, in float32. Each image has its own starting noise, drawn from a seeded generator,
so a rollout is reproducible.
"""

from __future__ import annotations

import torch

from gpo_fast.models.base import DiffusionModel, PromptEmbeds


@torch.no_grad()
def sample(
    model: DiffusionModel, prompts: list[str], *, steps: int, cfg_scale: float, generator: torch.Generator,
    batch_size: int = 256, noise: torch.Tensor | None = None,
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
        out.append(_euler(model, chunk, noise[i : i + batch_size].to(model.device), steps, cfg_scale))
    return torch.cat(out)


def _euler(model, prompts, x, steps, cfg_scale):
    cond = model.encode_prompts(prompts)
    guided = cfg_scale != 1.0
    if guided:
        both = PromptEmbeds.cat([model.encode_prompts([""] * len(prompts)), cond])
    sigmas = model.schedule(steps).to(x.device)
    for i in range(steps):
        s = sigmas[i]
        if guided:
            v_uncond, v_cond = model.predict(torch.cat([x, x]), s, both).chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            v = model.predict(x, s, cond)
        x = x + (sigmas[i + 1] - s) * v
    return x


def rollout(
    model: DiffusionModel, prompts: list[str], group_size: int, *, steps: int, cfg_scale: float,
    generator: torch.Generator, batch_size: int = 0, noise: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """G samples per prompt, members of a group contiguous: (prompts per sample, latents, images).
    batch_size: images per sampler forward (0: all at once)."""
    per_sample = [p for p in prompts for _ in range(group_size)]
    latents = sample(model, per_sample, steps=steps, cfg_scale=cfg_scale, generator=generator,
                     batch_size=batch_size or len(per_sample), noise=noise)
    return per_sample, latents, model.decode(latents)
