"""Held-out evaluation: sample on fixed seeds, score, report accuracy with its standard error."""

from __future__ import annotations

import math

import torch

from gpo_fast.models.base import DiffusionModel
from gpo_fast.rewards.toy import count_dots
from gpo_fast.sampling import sample
from gpo_fast.toy.data import MAX_DOTS, count_in_prompt, prompt_for

LENIENT_MIN_SIZE = 5  # the lenient counter ignores specks under 5 px; accuracy is also reported strict


def toy_eval_prompts(n_samples: int) -> list[str]:
    """Word-form prompts cycling through 1..MAX_DOTS dots."""
    return [prompt_for(1 + i % MAX_DOTS) for i in range(n_samples)]


def evaluate_toy(
    model: DiffusionModel, *, n_samples: int = 1000, steps: int = 12, cfg_scale: float = 2.0, seed: int = 10_000,
) -> dict:
    """Counting accuracy of the toy model on n_samples fixed-seed samples."""
    prompts = toy_eval_prompts(n_samples)
    images = model.decode(sample(model, prompts, steps=steps, cfg_scale=cfg_scale,
                                 generator=torch.Generator().manual_seed(seed)))
    wanted = torch.tensor([count_in_prompt(p) for p in prompts])
    strict = count_dots(images)
    lenient = count_dots(images, min_size=LENIENT_MIN_SIZE)
    acc = (strict == wanted).float().mean().item()
    return {
        "n_samples": n_samples,
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n_samples),
        "accuracy_lenient": (lenient == wanted).float().mean().item(),
        "blank_fraction": (strict == 0).float().mean().item(),
        "mean_count": strict.float().mean().item(),
        "accuracy_per_n": {n: (strict[wanted == n] == n).float().mean().item() for n in range(1, MAX_DOTS + 1)},
    }, images


def evaluate_prompts(
    model: DiffusionModel, reward, prompts: list, *, n_samples: int, steps: int, cfg_scale: float, seed: int,
    batch_size: int = 0,
) -> tuple[dict, torch.Tensor]:
    """Accuracy (the reward's exact success) and mean reward on n_samples fixed-seed samples, the eval
    prompts cycled in order; images come back on the CPU."""
    chosen = [prompts[i % len(prompts)] for i in range(n_samples)]
    gen = torch.Generator().manual_seed(seed)
    step = batch_size or n_samples
    images, rewards, correct = [], [], []
    for i in range(0, n_samples, step):  # one batch at a time: sample, decode, score, keep only the images
        part = chosen[i:i + step]
        imgs = model.decode(sample(model, [p.text for p in part], steps=steps, cfg_scale=cfg_scale, generator=gen,
                                   batch_size=step)).float().cpu()
        res = reward.measure(imgs, part)
        images.append(imgs)
        rewards.append(res.reward.float().cpu())
        correct.append(res.correct.cpu())
    rewards, correct = torch.cat(rewards), torch.cat(correct)
    acc = correct.float().mean().item()
    return {
        "n_samples": n_samples,
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n_samples),
        "reward_mean": rewards.nanmean().item(),
        "failed": int(rewards.isnan().sum()),
    }, torch.cat(images)
