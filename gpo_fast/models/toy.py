"""The toy model: a tiny SD3 transformer (the same `SD3Transformer2DModel` class as SD3.5) on 16x16
one-channel pixels, conditioned through a learned prompt table (shared/design/toy-world.md).

Row 0 of the table is the empty prompt used for classifier-free guidance. Decoding is the identity:
the latents are the pixels.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from gpo_fast.models.base import PromptEmbeds
from gpo_fast.toy.data import IMAGE_SIZE, PROMPTS

SHIPPED = Path(__file__).resolve().parent.parent / "toy" / "weights"


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


class ToyModel(torch.nn.Module):
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
            raise ValueError(f"the toy model does not know the prompt {e.args[0]!r}; it knows {known}") from None

    def embed_index(self, index: torch.Tensor) -> PromptEmbeds:
        c = self.config
        hidden = self.prompt_hidden(index).view(-1, c.prompt_tokens, c.embed_dim)
        return PromptEmbeds(hidden, self.prompt_pooled(index))

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # a table lookup: nothing to cache
        return self.embed_index(self.prompt_index(prompts))

    def predict(self, latents: torch.Tensor, sigmas: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        timestep = (sigmas * 1000.0).expand(latents.shape[0]).to(latents.dtype)  # SD3's convention
        return self.transformer(
            hidden_states=latents, encoder_hidden_states=embeds.hidden, pooled_projections=embeds.pooled,
            timestep=timestep, return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1.0, 1.0)

    # -- adapter and reference ---------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        """Freeze the base and wrap the target projections with a LoRA adapter (B = 0: output unchanged)."""
        from peft import LoraConfig

        from diffusers.utils import logging as diffusers_logging

        self.requires_grad_(False)
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # peft's dtype cast makes diffusers warn about fp32 modules
        try:
            self.transformer.add_adapter(
                LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
            )
        finally:
            diffusers_logging.set_verbosity(level)

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def enable_full_finetune(self) -> None:
        """Train every transformer weight; the reference becomes a frozen copy of the current model."""
        reference = copy.deepcopy(self).requires_grad_(False).eval()
        object.__setattr__(self, "_reference_copy", reference)  # not a submodule: neither trained nor saved
        self.requires_grad_(False)
        self.transformer.requires_grad_(True)

    @contextlib.contextmanager
    def reference(self):
        """The frozen base model: the adapter disabled inside the block (or the frozen copy)."""
        frozen = getattr(self, "_reference_copy", None)
        if frozen is not None:
            yield frozen
            return
        if not self.has_adapter:
            raise RuntimeError("the reference needs an adapter (add_lora) or a frozen copy (enable_full_finetune)")
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_adapter(self, directory: Path) -> None:
        """The LoRA adapter in diffusers' pipeline format (pytorch_lora_weights.safetensors, keys
        prefixed `transformer.`), the layout `load_lora_weights` of a diffusers pipeline reads."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        StableDiffusion3Pipeline.save_lora_weights(
            str(directory), transformer_lora_layers=get_peft_model_state_dict(self.transformer)
        )

    def load_adapter(self, directory: Path) -> None:
        self.transformer.load_lora_adapter(str(directory), weight_name="pytorch_lora_weights.safetensors",
                                           prefix="transformer")

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
            raise FileNotFoundError(
                f"no toy model in {directory} (expected model.json and model.safetensors); "
                "create one with `gpo-fast toy pretrain --out DIR`"
            )
        config = json.loads(meta_path.read_text())["config"]
        config["prompts"] = tuple(config["prompts"])
        model = cls(ToyModelConfig(**config))
        model.load_state_dict(load_file(str(weights)))
        return model
