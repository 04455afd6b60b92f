"""What every reward returns, and the image conversion the detector and OCR rewards share.

A reward maps a batch of images (B, 3, H, W) in [-1, 1] and their prompts to
- reward: (B,) float32, higher is better; NaN where the reward's engine (detector, OCR) failed on that image,
- correct: (B,) bool, exact success (what accuracy counts); False where the engine failed,
- details: one dict per image (counts, readings, or the error that made the reward NaN).
Wrong input (a prompt without the fields the reward needs) raises ValueError instead: that is a bug in the
prompt set, not a bad sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from gpo_fast.errors import UserError


class RewardEngineError(UserError):
    """The reward's model (detector weights, OCR weights) cannot be loaded; the message says how to fix it."""


@dataclass
class RewardResult:
    reward: torch.Tensor  # (B,) float32, NaN where the engine failed
    correct: torch.Tensor  # (B,) bool
    details: list[dict]


class Reward(Protocol):
    def measure(self, images: torch.Tensor, prompts: list) -> RewardResult: ...


def check_batch(images: torch.Tensor, prompts: list) -> None:
    """ValueError unless images is (B, 3, H, W) with one prompt per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB, rounded to nearest."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
