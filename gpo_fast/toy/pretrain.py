"""Pretraining the toy base model: ordinary flow matching on synthetic dot images with noisy captions.

The regime to reproduce (docs/toy-world.md): a fluent drawer and a mediocre counter, the way
SD3.5 draws objects well and counts them badly. A fraction `caption_noise` of the images is captioned
with n +- 1, so the model learns clean dots and only a loose link between the number and the count.
Noise levels are logit-normal, 10% of captions are dropped (guidance), the shipped weights are an EMA.
Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpo_fast.toy.model import ToyModel, ToyModelConfig
from gpo_fast.toy.data import MAX_DOTS, PROMPTS, prompt_for, render_dots
from gpo_fast.toy.evaluate import evaluate_toy


@dataclass
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_noise: float = 0.5
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0


def noisy_captions(counts: torch.Tensor, noise: float, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Prompt-table rows for the images: n, or n +- 1 with probability `noise`; row 0 with `dropout`."""
    b = counts.shape[0]
    wrong = torch.rand(b, generator=generator) < noise
    step = torch.where(torch.rand(b, generator=generator) < 0.5, -1, 1)
    shifted = counts + step
    shifted = torch.where((shifted < 1) | (shifted > MAX_DOTS), counts - step, shifted)  # stay in range
    caption = torch.where(wrong, shifted, counts)
    digits = torch.rand(b, generator=generator) < 0.5
    rows = torch.tensor([PROMPTS.index(prompt_for(int(n), bool(d))) for n, d in zip(caption, digits)])
    return torch.where(torch.rand(b, generator=generator) < dropout, 0, rows)


def caption_posterior(noise: float) -> torch.Tensor:
    """P(the image has m dots | its caption says n) in the pretraining data, (MAX_DOTS, MAX_DOTS) float64, row n - 1,
    column m - 1: counts uniform in 1..MAX_DOTS, captioned as `noisy_captions` does (n +- 1 with probability
    `noise`, a step out of range turned back). Its diagonal is how often a caption's number is right: the accuracy
    of a model that draws exactly its training data's images for a prompt."""
    joint = torch.zeros(MAX_DOTS, MAX_DOTS, dtype=torch.float64)  # [caption, count]
    for count in range(1, MAX_DOTS + 1):
        joint[count - 1, count - 1] += 1 - noise
        for step in (-1, 1):
            shifted = count + step
            if not 1 <= shifted <= MAX_DOTS:
                shifted = count - step
            joint[shifted - 1, count - 1] += noise / 2
    return joint / joint.sum(dim=1, keepdim=True)


def pretrain(config: PretrainConfig, progress=None) -> tuple[ToyModel, list[float]]:
    """Train from scratch; returns the EMA model and the loss of every step."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = ToyModel(ToyModelConfig())
    ema = ToyModel(ToyModelConfig())
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    losses = []
    for step in range(config.steps):
        counts = torch.randint(1, MAX_DOTS + 1, (config.batch_size,), generator=gen)
        x0 = render_dots(counts, gen)
        rows = noisy_captions(counts, config.caption_noise, config.cond_dropout, gen)
        sigma = torch.sigmoid(torch.randn(config.batch_size, generator=gen)).view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen)
        x_s = (1 - sigma) * x0 + sigma * eps
        pred = model.predict(x_s, sigma.flatten(), model.embed_index(rows))
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - config.ema_decay)
        losses.append(loss.item())
        if progress is not None:
            progress(step, loss.item())
    return ema, losses


def pretrain_and_save(config: PretrainConfig, out: Path, eval_samples: int = 1000, command: str = "",
                      progress=None, log=print) -> dict:
    """Pretrain, evaluate on held-out seeds and write out/model.safetensors with its manifest out/model.json
    (the config, this command, the held-out accuracy, the weights' sha256). Returns the manifest."""
    start = time.time()
    model, losses = pretrain(config, progress=progress)
    train_seconds = time.time() - start
    log(f"evaluating on {eval_samples} held-out samples ...")
    metrics, _ = evaluate_toy(model, n_samples=eval_samples)
    manifest = {
        "command": command,
        "pretrain": vars(config),
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "eval": metrics,
    }
    weights = model.save_pretrained(out, manifest)
    manifest["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta = json.loads((out / "model.json").read_text())
    meta.update(sha256=manifest["sha256"])
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return manifest
