"""The toy model: a tiny SD3 transformer (the same `SD3Transformer2DModel` class as SD3.5) on 16x16
one-channel pixels, conditioned through a learned prompt table (docs/toy-world.md).

Row 0 of the table is the empty prompt used for classifier-free guidance. Decoding is the identity:
the latents are the pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from gpo_fast.models.base import SOLVERS, AdapterMixin, PromptEmbeds, dpm_solver
from gpo_fast.errors import InputError, MissingFileError
from gpo_fast.toy.data import IMAGE_SIZE, PROMPTS

SHIPPED = Path(__file__).resolve().parent / "weights"  # the base model shipped in the package


@dataclass
class ToyModelConfig:
    sample_size: int = IMAGE_SIZE
    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    embed_dim: int = 64  # joint attention, caption projection and pooled projection width
    prompt_tokens: int = 4
    prompts: tuple[str, ...] = PROMPTS


class ToyModel(AdapterMixin, torch.nn.Module):
    def __init__(self, config: ToyModelConfig | None = None):
        super().__init__()
        self.config = c = config or ToyModelConfig()
        self.transformer = SD3Transformer2DModel(
            sample_size=c.sample_size, patch_size=c.patch_size, in_channels=1, out_channels=1,
            num_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
            attention_head_dim=c.attention_head_dim, joint_attention_dim=c.embed_dim,
            caption_projection_dim=c.embed_dim, pooled_projection_dim=c.embed_dim,
            pos_embed_max_size=c.sample_size // c.patch_size,
        )
        self.prompt_hidden = torch.nn.Embedding(len(c.prompts), c.prompt_tokens * c.embed_dim)
        self.prompt_pooled = torch.nn.Embedding(len(c.prompts), c.embed_dim)
        torch.nn.init.normal_(self.prompt_hidden.weight, std=0.02)
        torch.nn.init.normal_(self.prompt_pooled.weight, std=0.02)
        self._index = {p: i for i, p in enumerate(c.prompts)}
        self.latent_shape = (1, c.sample_size, c.sample_size)

    @property
    def device(self) -> torch.device:
        return self.prompt_pooled.weight.device

    def prompt_index(self, prompts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self._index[p] for p in prompts], device=self.device)
        except KeyError as e:
            known = ", ".join(repr(p) for p in self.config.prompts[1:])
            raise InputError(f"the toy model does not know the prompt {e.args[0]!r}; it knows {known}") from None

    def embed_index(self, index: torch.Tensor) -> PromptEmbeds:
        c = self.config
        hidden = self.prompt_hidden(index).view(-1, c.prompt_tokens, c.embed_dim)
        return PromptEmbeds(hidden, self.prompt_pooled(index))

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # a table lookup: nothing to cache
        return self.embed_index(self.prompt_index(prompts))

    def predict(self, latents: torch.Tensor, sigmas: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        timestep = (sigmas * 1000.0).expand(latents.shape[0]).to(latents.dtype)  # SD3's convention
        return self.denoiser()(
            hidden_states=latents, encoder_hidden_states=embeds.hidden, pooled_projections=embeds.pooled,
            timestep=timestep, return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1.0, 1.0)

    def schedule(self, steps: int, solver: str = "euler") -> torch.Tensor:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
        if solver == "euler":
            return torch.linspace(1.0, 0.0, steps + 1)  # equal steps (pretraining drew logit-normal levels)
        return self.dpm_solver(steps).sigmas.float()

    def dpm_solver(self, steps: int):
        """DPM-Solver++(2M) on the toy's own schedule: equal steps, no shift (diffusers' flow sigmas start at
        0.999, one step of its 1000 below the Euler sampler's 1)."""
        return dpm_solver(steps, shift=1.0)

    # -- weights ------------------------------------------------------------------------------
    def save_pretrained(self, directory: Path, manifest: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "model.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(weights))
        meta = {"config": asdict(self.config), **(manifest or {})}
        (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        return weights

    @classmethod
    def from_pretrained(cls, directory: Path | None = None) -> "ToyModel":
        """Load a toy model saved by save_pretrained (default: the base model shipped in the package)."""
        directory = Path(directory) if directory is not None else SHIPPED
        meta_path, weights = directory / "model.json", directory / "model.safetensors"
        if not meta_path.is_file() or not weights.is_file():
            raise MissingFileError(
                f"no toy model in {directory} (expected model.json and model.safetensors); "
                "create one with `gpo-fast toy pretrain --out DIR`"
            )
        config = json.loads(meta_path.read_text())["config"]
        config["prompts"] = tuple(config["prompts"])
        model = cls(ToyModelConfig(**config))
        model.load_state_dict(load_file(str(weights)))
        return model
