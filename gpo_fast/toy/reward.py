"""The toy world's reward: count the connected components of the thresholded image.

reward = 1 if the count equals the prompt's n, else 0 (or partial credit max(0, 1 - |count - n| / n)).
`min_size` ignores components smaller than that many pixels; accuracy is always also reported with the
strict counter (min_size=1), so a gain cannot come from gaming the size threshold.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from gpo_fast.rewards.base import RewardResult
from gpo_fast.toy.data import count_in_prompt

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def count_dots(images: torch.Tensor, min_size: int = 1, threshold: float = 0.0) -> torch.Tensor:
    """(B,) int64: components (8-connected) of pixels > threshold with at least min_size pixels."""
    binary = (images.detach().float().cpu().reshape(images.shape[0], *images.shape[-2:]) > threshold).numpy()
    counts = []
    for img in binary:
        labels, n = ndimage.label(img, structure=_EIGHT_CONNECTED)
        if min_size > 1 and n:
            sizes = np.bincount(labels.ravel())[1:]
            n = int((sizes >= min_size).sum())
        counts.append(n)
    return torch.tensor(counts, dtype=torch.int64)


def _wanted(prompt) -> int:
    """The count a toy prompt asks for: a gpo_fast.language.Prompt (its n) or the prompt text."""
    n = getattr(prompt, "n", None)
    return n if n is not None else count_in_prompt(getattr(prompt, "text", prompt))


class DotCountReward:
    """measure(images, prompts): reward 1.0 where the dot count matches the prompt (or partial credit)."""

    def __init__(self, min_size: int = 1, partial_credit: bool = False):
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1; got {min_size}")
        self.min_size = min_size
        self.partial_credit = partial_credit

    def measure(self, images: torch.Tensor, prompts: list) -> RewardResult:
        """Rewards (B,), exact success (B,) bool, and the counts; prompts are Prompt objects or texts."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        wanted = torch.tensor([_wanted(p) for p in prompts], dtype=torch.float32)
        counts = count_dots(images, self.min_size).float()
        correct = counts == wanted
        reward = (1.0 - (counts - wanted).abs() / wanted).clamp(min=0.0) if self.partial_credit else correct.float()
        return RewardResult(reward, correct, [{"count": int(c)} for c in counts])
