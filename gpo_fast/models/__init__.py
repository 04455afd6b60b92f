"""Models behind the one interface the training loop talks to (gpo_fast.models.base.DiffusionModel): SD3 and
SD3.5 here; the toy world's model is gpo_fast.toy.model."""

from gpo_fast.models.base import DiffusionModel, PromptEmbeds

__all__ = ["DiffusionModel", "PromptEmbeds"]
