"""The interface between the training loop and a diffusion model (flow matching, velocity prediction).

Conventions: latents x (B, *latent_shape); noise level sigma in [0, 1] per sample; x_sigma =
(1 - sigma) * x0 + sigma * eps; the model predicts the velocity u = eps - x0. The loop never imports
diffusers: it calls these methods only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class PromptEmbeds:
    """What the transformer is conditioned on: token states (B, T, D) and pooled vectors (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def repeat_interleave(self, k: int) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden.repeat_interleave(k, 0), self.pooled.repeat_interleave(k, 0))

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), torch.cat([p.pooled for p in parts]))


class DiffusionModel(Protocol):
    latent_shape: tuple[int, ...]
    device: torch.device

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings of the prompts ('' is the unconditional prompt), cached per prompt."""

    def predict(self, latents: torch.Tensor, sigmas: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The velocity prediction, with the adapter (if any) active."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W), for the rewards."""
