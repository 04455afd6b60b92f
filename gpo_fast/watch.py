"""A reward-hacking watch: image statistics the reward does not see, measured at every validation and compared
with the base model's validation images.

Per image, from (B, C, H, W) in [-1, 1] (C = 3, or 1 in the toy world), on [0, 1] luminance L (the mean of the
channels): brightness (mean L), saturation (mean over pixels of max - min over the channels; 0 for one channel),
contrast (std of L), near_black and near_white (the fractions of pixels with L below 0.1 or above 0.9), high_freq
(mean squared difference between neighbouring pixels of L: detail and noise). An evaluator reports, over all its
samples, each statistic's mean and std (`summarize`). DriftWatch measures how far a validation's mean has moved
from the base's, in units of the base's per-image spread (its std), and warns once, in plain words, when a
statistic moves further than `multiple` spreads while the training reward climbs: the policy is changing what the
reward does not look at, which is what gaming a reward looks like.
"""

from __future__ import annotations

import math

import torch

STATS = ("brightness", "saturation", "contrast", "near_black", "near_white", "high_freq")
NEAR = 0.1  # near-black: L below it (the trained toy model's faint background haze, 0.05-0.1, is not "dark")
SPREAD_FLOOR = 1e-3  # a statistic constant over the base images (saturation of grey images) moves in these units


def image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each statistic per image: name -> (B,) float32."""
    x = (images.detach().float().cpu() + 1.0) / 2.0  # [0, 1]
    lum = x.mean(dim=1)  # (B, H, W)
    flat = lum.flatten(1)
    dx = (lum[:, :, 1:] - lum[:, :, :-1]).pow(2).flatten(1).mean(1)
    dy = (lum[:, 1:, :] - lum[:, :-1, :]).pow(2).flatten(1).mean(1)
    return {
        "brightness": flat.mean(1),
        "saturation": (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(1),
        "contrast": flat.std(1, unbiased=False),
        "near_black": (flat < NEAR).float().mean(1),
        "near_white": (flat > 1.0 - NEAR).float().mean(1),
        "high_freq": (dx + dy) / 2,
    }


class StatsAccumulator:
    """Adds up the statistics of batch after batch; `summary()` is name -> {"mean", "std"} over every image."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in STATS}

    def add(self, images: torch.Tensor) -> None:
        for name, values in image_stats(images).items():
            self.parts[name].append(values)

    def values(self) -> dict[str, torch.Tensor]:
        """Each statistic of every image added, in order: name -> (N,) float32 (what a rank sends to be gathered)."""
        return {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in self.parts.items()}

    @classmethod
    def of(cls, values: dict[str, torch.Tensor]) -> "StatsAccumulator":
        """An accumulator holding these per-image values (gathered from every rank)."""
        acc = cls()
        for name in STATS:
            acc.parts[name].append(values[name])
        return acc

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, values in self.values().items():
            out[name] = {"mean": values.mean().item() if len(values) else math.nan,
                         "std": values.std(unbiased=False).item() if len(values) else math.nan}
        return out


class DriftWatch:
    """Drift of each statistic from the base validation's, in base spreads; one warning when one passes `multiple`
    while the reward climbs (multiple 0: never warns)."""

    def __init__(self, base: dict[str, dict[str, float]], multiple: float):
        self.base = base
        self.multiple = multiple
        self.warning: str | None = None
        self.max_drift = {name: 0.0 for name in base}
        self.last_drift: dict[str, float] = {}  # of the latest check

    def drift(self, stats: dict[str, dict[str, float]]) -> dict[str, float]:
        """name -> (mean now - mean at base) / max(base std, SPREAD_FLOOR), signed."""
        out = {}
        for name, base in self.base.items():
            spread = max(base["std"], SPREAD_FLOOR)
            out[name] = (stats[name]["mean"] - base["mean"]) / spread
            self.max_drift[name] = max(self.max_drift[name], abs(out[name]))
        return out

    def check(self, stats: dict[str, dict[str, float]], reward_climbing: bool, rollout: int) -> str | None:
        """The warning the first time a drift passes the multiple while the reward climbs (None otherwise, and
        after that); this validation's drifts are left in `last_drift`."""
        drifts = self.last_drift = self.drift(stats)
        if self.warning is not None or not self.multiple or not reward_climbing:
            return None
        moved = sorted((name for name, d in drifts.items() if abs(d) > self.multiple), key=lambda n: -abs(drifts[n]))
        if not moved:
            return None
        parts = [f"{name.replace('_', '-')} {'rose' if drifts[name] > 0 else 'fell'} from "
                 f"{self.base[name]['mean']:.3f} to {stats[name]['mean']:.3f} ({abs(drifts[name]):.1f} base spreads)"
                 for name in moved]
        self.warning = (f"rollout {rollout}: the reward is climbing while the images change in ways the reward "
                        f"does not measure: {'; '.join(parts)}. The policy may be gaming the reward; look at the "
                        "validation grids before trusting the gain (eval.watch_multiple sets this threshold)")
        return self.warning


def reward_climbing(rewards: list[float], window: int = 3) -> bool:
    """Whether the mean rollout reward of the last `window` rollouts is above that of the first `window`."""
    finite = [r for r in rewards if r == r]
    if len(finite) < 2:
        return False
    w = min(window, len(finite) // 2)
    return sum(finite[-w:]) / w > sum(finite[:w]) / w
