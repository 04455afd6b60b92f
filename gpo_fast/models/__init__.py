"""Models behind the one interface the training loop talks to (gpo_fast.models.base.DiffusionModel)."""

from gpo_fast.models.base import DiffusionModel, PromptEmbeds
from gpo_fast.models.toy import ToyModel

__all__ = ["DiffusionModel", "PromptEmbeds", "ToyModel"]
