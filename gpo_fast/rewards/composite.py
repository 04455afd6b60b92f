"""A weighted mix of rewards: reward = sum_i w_i r_i / sum_i w_i, correct = every member correct.

Every member scores the same images and prompts (so the prompts carry what each member needs, e.g. class,
n and text). A member's NaN (its engine failed on that image) makes the mix NaN for that image. Weights are
>= 0 with a positive sum; a member of weight 0 is left out (not run, not part of `correct`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gpo_fast.rewards.base import Reward, RewardResult


class WeightedReward:
    """WeightedReward([(reward, weight), ...]) with finite weights >= 0 and a positive sum."""

    def __init__(self, members: Sequence[tuple[Reward, float]]):
        for _, w in members:
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"reward weights must be finite and >= 0; got {w}")
        self.members = [(r, float(w)) for r, w in members if w > 0]  # weight 0: not run at all
        if not self.members:
            raise ValueError("WeightedReward needs at least one (reward, weight) pair with weight > 0")

    def load(self) -> None:
        """Load every member's engine now (RewardEngineError when weights are missing)."""
        for r, _ in self.members:
            if hasattr(r, "load"):
                r.load()

    def measure(self, images: torch.Tensor, prompts: list) -> RewardResult:
        results = [r.measure(images, prompts) for r, _ in self.members]
        weights = torch.tensor([w for _, w in self.members], dtype=torch.float32)
        stacked = torch.stack([res.reward.float().cpu() for res in results])  # (M, B)
        reward = (weights[:, None] * stacked).sum(0) / weights.sum()
        correct = torch.stack([res.correct.cpu() for res in results]).all(0)
        details = [{"rewards": [float(res.reward[b]) for res in results], "parts": [res.details[b] for res in results]}
                   for b in range(len(prompts))]
        return RewardResult(reward, correct, details)
