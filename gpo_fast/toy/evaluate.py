"""The toy world's held-out evaluation: counting accuracy on fixed-seed samples of every count.

Accuracy is the strict counter (every component counts, docs/toy-world.md); the lenient counter (specks
under LENIENT_MIN_SIZE px ignored), the fraction of blank images, the accuracy per count and what is drawn
for each count asked (`counts_per_n`: how the model errs, blank, one short, one over) come beside it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from gpo_fast.evaluate import Tiles, gather_shares, kept_on_main, noise_of_share, share_of
from gpo_fast.language import Prompt
from gpo_fast.models.base import DiffusionModel
from gpo_fast.sampling import sample
from gpo_fast.toy.data import MAX_DOTS, count_in_prompt, prompt_for
from gpo_fast.toy.reward import count_dots
from gpo_fast.watch import StatsAccumulator

LENIENT_MIN_SIZE = 5  # the lenient counter ignores specks under 5 px; accuracy is also reported strict


def toy_eval_prompts(n_samples: int) -> list[str]:
    """Word-form prompts cycling through 1..MAX_DOTS dots."""
    return [prompt_for(1 + i % MAX_DOTS) for i in range(n_samples)]


def evaluate_toy(
    model: DiffusionModel, *, n_samples: int = 1000, steps: int = 12, cfg_scale: float = 2.0, seed: int = 10_000,
    solver: str = "euler",
) -> tuple[dict, torch.Tensor]:
    """(metrics, images): counting accuracy of the toy model on n_samples fixed-seed samples."""
    prompts = toy_eval_prompts(n_samples)
    images = model.decode(sample(model, prompts, steps=steps, cfg_scale=cfg_scale,
                                 generator=torch.Generator().manual_seed(seed), solver=solver))
    return toy_metrics(count_dots(images), count_dots(images, min_size=LENIENT_MIN_SIZE)), images


def toy_metrics(strict: torch.Tensor, lenient: torch.Tensor) -> dict:
    """The metrics of samples 0..N-1 of the toy evaluation from their component counts, strict and lenient."""
    n_samples = len(strict)
    wanted = torch.tensor([count_in_prompt(p) for p in toy_eval_prompts(n_samples)])
    acc = (strict == wanted).float().mean().item()
    return {
        "n_samples": n_samples,
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n_samples),
        "accuracy_lenient": (lenient == wanted).float().mean().item(),
        "blank_fraction": (strict == 0).float().mean().item(),
        "mean_count": strict.float().mean().item(),
        "accuracy_per_n": {n: (strict[wanted == n] == n).float().mean().item() for n in range(1, MAX_DOTS + 1)},
        "counts_per_n": counts_per_n(strict, wanted),
    }


def counts_per_n(counted: torch.Tensor, wanted: torch.Tensor) -> dict[int, list[float]]:
    """For each count asked, the fraction of its images with 0, 1, ..., MAX_DOTS and more than MAX_DOTS
    components (the last bucket): a row of the confusion between the count asked and the count drawn."""
    out = {}
    for n in range(1, MAX_DOTS + 1):
        drawn = counted[wanted == n].clamp(max=MAX_DOTS + 1)
        hist = torch.bincount(drawn, minlength=MAX_DOTS + 2).float()
        out[n] = (hist / max(len(drawn), 1)).tolist()
    return out


@dataclass
class ToyEvaluator:
    """evaluator(model, seed) -> (metrics, Tiles of the first `keep_images` samples), as gpo_fast.evaluate
    describes; a tile is labelled with its count and marked right by the strict counter."""

    samples: int
    steps: int
    cfg_scale: float
    solver: str = "euler"
    keep_images: int = 50
    precision: Callable = contextlib.nullcontext  # bf16 autocast on a GPU (gpo_fast.components.autocast_for)
    watch: object = None  # a reward measured beside the count, never trained on (eval.watch_reward)
    # beside accuracy, the run summary reports these before and after (metric -> summary name)
    headline = {"accuracy_lenient": "accuracy_lenient", "blank_fraction": "blank"}

    def __call__(self, model: DiffusionModel, seed: int, dist=None) -> tuple[dict, Tiles]:
        """With `dist`, this rank's share of the samples (gpo_fast.evaluate): the noise of one process's evaluation
        (drawn at once for all samples), the counts and statistics gathered in rank order, the tiles on rank 0."""
        prompts = toy_eval_prompts(self.samples)
        mine = share_of(self.samples, dist)
        noise = noise_of_share(model.latent_shape, self.samples, self.samples, seed, mine)
        model.eval()
        with torch.no_grad(), self.precision():
            images = model.decode(sample(model, prompts[mine], steps=self.steps, cfg_scale=self.cfg_scale,
                                         generator=None, noise=noise, solver=self.solver)).float().cpu()
        stats = StatsAccumulator()
        stats.add(images)
        watch = None
        if self.watch is not None:
            asked = [Prompt(text=t, task="toy", n=count_in_prompt(t)) for t in prompts[mine]]
            watch = self.watch.measure(images, asked).reward.float().cpu()
        every = gather_shares({"strict": count_dots(images), "lenient": count_dots(images, min_size=LENIENT_MIN_SIZE),
                               "stats": stats.values(), "watch": watch}, dist)
        first = max(0, self.keep_images - mine.start)  # of the first keep_images samples, this share's (a copy)
        kept = kept_on_main(images[:first].clone() if first else None, dist)
        metrics = toy_metrics(every["strict"], every["lenient"])
        metrics["image_stats"] = StatsAccumulator.of(every["stats"]).summary()
        if every["watch"] is not None:
            metrics["watch_reward_mean"] = every["watch"].nanmean().item()
        wanted = [count_in_prompt(t) for t in prompts[:len(kept)]]
        right = (every["strict"][:len(kept)] == torch.tensor(wanted, dtype=torch.long)).tolist()  # the strict counter
        return metrics, Tiles(kept, [str(n) for n in wanted], right)
