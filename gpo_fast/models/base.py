"""The interface between the training loop and a diffusion model (flow matching, velocity prediction).

Conventions: latents x (B, *latent_shape); noise level sigma in [0, 1] per sample; x_sigma =
(1 - sigma) * x0 + sigma * eps; the model predicts the velocity u = eps - x0; the transformer sees
timestep = 1000 * sigma (SD3's convention). The loop never imports diffusers: it calls these methods only.

`AdapterMixin` holds what every model built on a diffusers transformer (`self.transformer`) shares:
the LoRA adapter through peft, the reference (adapter disabled, or a frozen copy when every weight
trains), and the adapter saved and loaded in diffusers' pipeline LoRA format.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, get_args

import torch

from gpo_fast.config import Solver
from gpo_fast.errors import InputError, MissingFileError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(folder) finds it
SOLVERS = get_args(Solver)  # rollout.solver, eval.solver


def dpm_solver(steps: int, shift: float, dynamic_shifting: bool = False, mu: float | None = None):
    """diffusers' DPMSolverMultistepScheduler as DPM-Solver++(2M) for flow matching (velocity prediction, sigmas
    shifted as `shift * s / (1 + (shift - 1) * s)`), with its timesteps set: the scheduler a
    StableDiffusion3Pipeline can be given in place of its Euler one. `step(v, t, x)` moves x one step."""
    from diffusers import DPMSolverMultistepScheduler

    # the dynamic-shift arguments only where used: diffusers before 0.35 has neither
    dynamic = {"use_dynamic_shifting": True, "time_shift_type": "exponential"} if dynamic_shifting else {}
    sched = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, final_sigmas_type="zero", lower_order_final=True, **dynamic)
    sched.set_timesteps(steps, device="cpu", **({"mu": mu} if mu is not None else {}))
    return sched


@dataclass
class PromptEmbeds:
    """What the transformer is conditioned on: token states (B, T, D) and pooled vectors (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: slice) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden[index], self.pooled[index])

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

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

    def schedule(self, steps: int, solver: str = "euler") -> torch.Tensor:
        """The sampler's noise levels, (steps + 1,) float32 from 1 (or just below) down to 0."""

    def dpm_solver(self, steps: int):
        """`dpm_solver(...)` on this model's schedule (its shift), timesteps set for `steps`."""


class AdapterMixin:
    """LoRA, reference and adapter files for a model whose denoiser is `self.transformer`."""

    transformer: torch.nn.Module

    def add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        """Freeze the base and wrap the target projections with a LoRA adapter (B = 0: output unchanged)."""
        from diffusers.utils import logging as diffusers_logging
        from peft import LoraConfig

        self.requires_grad_(False)
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # peft's dtype cast makes diffusers warn about fp32 modules
        try:
            self.transformer.add_adapter(
                LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
            )
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise InputError(f"lora.targets: {e}") from None
        finally:
            diffusers_logging.set_verbosity(level)
        # peft keeps the LoRA weights in the base weights' dtype; train them in float32 (bf16 Adam
        # updates underflow), the base stays in bf16
        for p in self.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def enable_full_finetune(self) -> None:
        """Train every transformer weight; the reference becomes a frozen copy of the transformer."""
        frozen = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        object.__setattr__(self, "_frozen_transformer", frozen)  # not a submodule: neither trained nor saved
        self.requires_grad_(False)
        # trained weights in float32 (bf16 drops updates below half its step: bf16(0.1) + 1e-4 == 0.1);
        # autocast still computes in bf16 on the GPU; the frozen copy keeps the loaded dtype
        self.transformer.float().requires_grad_(True)

    def denoiser(self) -> torch.nn.Module:
        """The transformer predict() runs: the trained one, or the frozen copy inside reference()."""
        active = getattr(self, "_active_transformer", None)
        return self.transformer if active is None else active

    @contextlib.contextmanager
    def reference(self):
        """The frozen base model: the adapter disabled inside the block (or the frozen copy)."""
        frozen = getattr(self, "_frozen_transformer", None)
        if frozen is not None:
            object.__setattr__(self, "_active_transformer", frozen)
            try:
                yield self
            finally:
                object.__setattr__(self, "_active_transformer", None)
            return
        if not self.has_adapter:
            raise RuntimeError("the reference needs an adapter (add_lora) or a frozen copy (enable_full_finetune)")
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def compile_denoiser(self) -> None:
        """torch.compile the transformer's forward in place (Module.compile: the module, its parameters and their
        names stay as they are, so adapters, checkpoints and moving averages see no wrapper); the frozen copy of
        full fine-tuning too."""
        self.transformer.compile()
        frozen = getattr(self, "_frozen_transformer", None)
        if frozen is not None:
            frozen.compile()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_adapter(self, directory: Path) -> None:
        """The LoRA adapter in diffusers' pipeline format (pytorch_lora_weights.safetensors, keys
        prefixed `transformer.`), the layout `load_lora_weights` of a diffusers pipeline reads.

        The scale alpha / rank is folded into lora_B and the file says alpha = rank: tools that read diffusers'
        SD3 keys but scale by alpha / rank only when an `.alpha` tensor is present (ComfyUI among them, diffusers
        issue #9134) would otherwise apply the adapter at scale 1, the wrong strength whenever alpha != rank.
        Folded, every loader gets the trained strength, and diffusers the same weights as before."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        config = self.transformer.peft_config["default"]
        scales = {m.scaling["default"] for m in self.transformer.modules()
                  if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
        if len(scales) != 1:  # one rank and alpha for every layer is all add_lora makes
            raise RuntimeError(f"the adapter's layers have different scales {sorted(scales)}; cannot fold them")
        scale = scales.pop()
        state = {k: v * scale if ".lora_B." in k else v for k, v in get_peft_model_state_dict(self.transformer).items()}
        metadata = {**config.to_dict(), "lora_alpha": config.r}  # the scale is in lora_B now: alpha / rank = 1
        StableDiffusion3Pipeline.save_lora_weights(
            str(directory), transformer_lora_layers=state,
            # rank and alpha travel with the weights (alpha = rank, what a loader assumes without them)
            transformer_lora_adapter_metadata=metadata,
        )

    def load_adapter(self, directory: Path) -> None:
        """Load an adapter written by save_adapter (or any SD3 LoRA in diffusers' format)."""
        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise MissingFileError(f"no adapter in {directory} (expected {ADAPTER_FILE}); "
                                    "pass the `adapter` folder of a finished run")
        self.transformer.load_lora_adapter(str(directory), weight_name=ADAPTER_FILE, prefix="transformer")
