"""Held-out evaluation: sample on fixed seeds, score, report accuracy with its standard error.

An evaluator is what the training loop (before, validation, after) and `gpo-fast eval` call:

    metrics, images = evaluator(model, seed, dist=None)

metrics holds at least n_samples, accuracy and accuracy_stderr; images are Tiles: the first `keep_images`
samples, on the CPU, with what each was asked and whether the reward counted it right, for grids;
`evaluator.headline` names the extra metrics a run summary reports before and after.
gpo_fast.components.build_evaluator builds one from the config: a PromptEvaluator (a reward over the eval
prompts) here, or the toy world's ToyEvaluator (gpo_fast.toy.evaluate).

With several processes (`dist`, gpo_fast.distributed) every rank calls the evaluator: each samples and scores its
contiguous share of the samples, from the starting noise a one-process evaluation draws for them
(`noise_of_share`), and the per-sample results are gathered in rank order (`gather_shares`). Every rank gets the
metrics of the whole evaluation: those of one process, up to the float rounding of other batch sizes. The tiles
(the kept images) go to rank 0 alone (`kept_on_main`); the other ranks get empty ones.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from gpo_fast.errors import MissingFileError
from gpo_fast.language import Prompt
from gpo_fast.models.base import ADAPTER_FILE, DiffusionModel
from gpo_fast.rewards.base import Reward
from gpo_fast.sampling import sample
from gpo_fast.watch import StatsAccumulator


def ask_label(prompt: Prompt) -> str:
    """What a prompt asks, in a few characters for a grid tile: '3', '3 cat', '"open"', or its first words."""
    if prompt.task == "toy" and prompt.n is not None:
        return str(prompt.n)
    if prompt.task == "counting" and prompt.n is not None and prompt.cls:
        return f"{prompt.n} {prompt.cls}"
    if prompt.task == "text" and prompt.target:
        return f'"{prompt.target}"'
    return prompt.text if len(prompt.text) <= 14 else prompt.text[:13] + "~"


@dataclass
class Tiles:
    """Images to show in a grid, with what each was asked and whether the reward counted it right (None:
    not known); the same length all three."""

    images: torch.Tensor  # (K, 3, H, W) in [-1, 1], on the CPU
    labels: list[str]
    correct: list[bool | None]

    def __len__(self) -> int:
        return self.images.shape[0]

    def head(self, k: int) -> "Tiles":
        return Tiles(self.images[:k], self.labels[:k], self.correct[:k])

    def state(self) -> dict:
        """For a checkpoint (tensors and plain values only)."""
        return {"images": self.images, "labels": list(self.labels),
                "correct": [None if c is None else bool(c) for c in self.correct]}

    @classmethod
    def from_state(cls, state) -> "Tiles | None":
        if state is None:
            return None
        if isinstance(state, torch.Tensor):  # a checkpoint from before tiles carried their labels
            return cls(state, [""] * state.shape[0], [None] * state.shape[0])
        return cls(state["images"], list(state["labels"]), list(state["correct"]))


class Evaluator(Protocol):
    headline: dict[str, str]

    def __call__(self, model: DiffusionModel, seed: int, dist=None) -> tuple[dict, Tiles]: ...


def share_of(n: int, dist=None) -> slice:
    """This process's contiguous share of n samples (all of them without `dist`)."""
    return slice(0, n) if dist is None else dist.part(n)


def noise_of_share(shape: tuple[int, ...], n: int, step: int, seed: int, share: slice) -> torch.Tensor:
    """The starting noise of samples share.start..share.stop of n, as one process evaluating all n draws it: `step`
    samples per draw from the seed's generator (the sampler draws each batch's noise on the CPU, in order), whatever
    the share. A rank keeps only its rows."""
    gen, parts = torch.Generator().manual_seed(seed), []
    for i in range(0, n, step):
        x = torch.randn((min(step, n - i), *shape), generator=gen)
        lo, hi = max(i, share.start), min(i + x.shape[0], share.stop)
        if lo < hi:
            parts.append(x[lo - i:hi - i])
    return torch.cat(parts) if parts else torch.zeros((0, *shape))


def gather_shares(share: dict, dist=None) -> dict:
    """Every rank's per-sample results joined in rank order (the samples in order): tensors concatenated, dicts
    joined key by key, None kept. One process: the share itself."""
    if dist is None or dist.world == 1:
        return share
    return _join(dist.gather_objects(share))


def kept_on_main(kept: torch.Tensor | None, dist=None) -> torch.Tensor:
    """The kept images (the first keep_images samples) of every rank, in order, on rank 0 alone: only it draws
    pictures, and they are the largest thing an evaluation gathers. The other ranks get none."""
    if dist is None or dist.world == 1:
        return kept if kept is not None else torch.zeros(0)
    parts = dist.gather_to_main(kept)
    joined = _join(parts) if parts is not None else None
    return joined if joined is not None else torch.zeros(0)


def _join(parts: list):
    parts = [p for p in parts if p is not None]  # None: a rank with nothing of this kind (an empty share)
    if not parts:
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], dict):
        return {k: _join([p[k] for p in parts]) for k in parts[0]}
    raise TypeError(f"cannot join shares of type {type(parts[0]).__name__}")


def full_precision():
    """A block where an enclosing CUDA autocast is switched off."""
    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


@dataclass
class PromptEvaluator:
    """Accuracy (the reward's exact success) and mean reward on `samples` fixed-seed samples, the eval
    prompts cycled in order, sampled and scored one batch at a time (only kept images stay in memory)."""

    reward: Reward
    prompts: list[Prompt]
    samples: int
    steps: int
    cfg_scale: float
    solver: str = "euler"
    batch_size: int = 0  # images per sampler forward; 0: all at once
    keep_images: int = 50
    precision: Callable = contextlib.nullcontext  # bf16 autocast on a GPU (gpo_fast.components.autocast_for)
    watch: Reward | None = None  # measured beside the reward, never trained on (eval.watch_reward)
    headline = {}

    def __call__(self, model: DiffusionModel, seed: int, dist=None) -> tuple[dict, Tiles]:
        chosen = [self.prompts[i % len(self.prompts)] for i in range(self.samples)]
        step = self.batch_size or self.samples
        mine = share_of(self.samples, dist)
        noise = noise_of_share(model.latent_shape, self.samples, step, seed, mine)
        kept, rewards, correct, watched = [], [], [], []
        stats = StatsAccumulator()
        model.eval()
        for i in range(mine.start, mine.stop, step):
            part = chosen[i:min(i + step, mine.stop)]
            with torch.no_grad(), self.precision():
                latents = sample(model, [p.text for p in part], steps=self.steps, cfg_scale=self.cfg_scale,
                                 generator=None, noise=noise[i - mine.start:i - mine.start + len(part)],
                                 batch_size=step, solver=self.solver)
                imgs = model.decode(latents).float().cpu()
            with full_precision():  # reward engines (easyocr) break on bf16 outputs of an enclosing autocast
                scored = self.reward.measure(imgs, part)
                if self.watch is not None:
                    watched.append(self.watch.measure(imgs, part).reward.float().cpu())
            stats.add(imgs)
            if i < self.keep_images:  # the first keep_images samples of the evaluation (a copy: not the batch)
                kept.append(imgs[:self.keep_images - i].clone())
            rewards.append(scored.reward.float().cpu())
            correct.append(scored.correct.cpu())
        empty = torch.zeros(0)
        every = gather_shares({
            "reward": torch.cat(rewards) if rewards else empty,
            "correct": torch.cat(correct) if correct else empty.bool(),
            "watch": torch.cat(watched) if watched else (None if self.watch is None else empty),
            "stats": stats.values(),
        }, dist)
        tiles = kept_on_main(torch.cat(kept) if kept else None, dist)
        rewards, correct, kept_n = every["reward"], every["correct"], len(tiles)
        acc = correct.float().mean().item()
        return {
            "n_samples": self.samples,
            "accuracy": acc,
            "accuracy_stderr": math.sqrt(acc * (1 - acc) / self.samples),
            "reward_mean": rewards.nanmean().item(),
            "failed": int(rewards.isnan().sum()),
            "image_stats": StatsAccumulator.of(every["stats"]).summary(),
            **({"watch_reward_mean": every["watch"].nanmean().item()} if every["watch"] is not None else {}),
        }, Tiles(tiles, [ask_label(p) for p in chosen[:kept_n]], correct[:kept_n].tolist())


def load_tuned(model, source: Path) -> str:
    """Load what a run trained into `model`: an adapter folder, or a run folder holding `adapter/`
    (LoRA) or `model/` (a fully fine-tuned toy model or SD3 transformer). Returns what was loaded."""
    source = Path(source)
    for folder in (source, source / "adapter"):
        if (folder / ADAPTER_FILE).is_file():
            model.load_adapter(folder)
            return f"adapter {folder}"
    full = source / "model" if (source / "model").is_dir() else source
    if (full / "model.safetensors").is_file() and (full / "model.json").is_file():  # a toy model
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(full / "model.safetensors")))
        return f"toy model {full}"
    if (full / "config.json").is_file():  # an SD3 transformer saved by diffusers
        from diffusers import SD3Transformer2DModel

        tuned = SD3Transformer2DModel.from_pretrained(str(full), torch_dtype=model.transformer.dtype)
        model.transformer.load_state_dict(tuned.state_dict())
        return f"transformer {full}"
    raise MissingFileError(f"{source} holds no adapter ({ADAPTER_FILE}) and no fine-tuned model; pass a run "
                           "folder of `gpo-fast train` or its adapter folder")
