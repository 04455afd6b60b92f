"""What a run or an evaluation shows a person: image grids, plots, the gain with its interval, and files
written atomically (a kill at any moment leaves the old file or the new one, whole)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def write_atomic(path: Path, text: str) -> None:
    """Replace path's content so that a kill at any moment leaves the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def gain_interval(before: dict, after: dict) -> dict:
    """The accuracy gain and its 95% interval (normal approximation, the two evaluations independent)."""
    gain = after["accuracy"] - before["accuracy"]
    se = math.sqrt(before["accuracy_stderr"] ** 2 + after["accuracy_stderr"] ** 2)
    return {"gain": gain, "gain_ci95": [gain - 1.96 * se, gain + 1.96 * se]}


def describe_gain(interval: dict) -> str:
    lo, hi = interval["gain_ci95"]
    return f"gain {100 * interval['gain']:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def save_grid(images: torch.Tensor, path: Path) -> None:
    """Images in [-1, 1] as a 10-wide grid of thumbnails: tiny images upscaled (nearest, so single
    pixels stay visible), large ones shrunk to 128 px."""
    from torchvision.utils import make_grid, save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.detach().float().cpu() + 1) / 2
    side = x.shape[-1]
    if side < 64:
        x = torch.nn.functional.interpolate(x, scale_factor=64 // side, mode="nearest")
    elif side > 128:
        x = torch.nn.functional.interpolate(x, size=(128, 128), mode="area")
    save_image(make_grid(x, nrow=10, pad_value=0.5), path)


def save_before_after(before_images: torch.Tensor, after_images: torch.Tensor, path: Path) -> None:
    """The same held-out samples before (top) and after (bottom), a gray row between."""
    k = min(50, before_images.shape[0])
    save_grid(torch.cat([before_images[:k], torch.zeros_like(before_images[:10]), after_images[:k]]), path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_reward_curve(history: list[dict], path: Path) -> None:
    """The rollout reward per rollout and the validation accuracy where it was measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["rollout"] for h in history], [h["reward_mean"] for h in history], label="rollout reward")
    val = [(h["rollout"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation accuracy")
    ax.set_xlabel("rollout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_accuracy_bars(report: dict, labels: list[str], path: Path) -> None:
    """One bar per evaluated model (report[label]["accuracy"]) with its 95% interval."""
    plt = _pyplot()
    accs = [report[k]["accuracy"] for k in labels]
    errs = [1.96 * report[k]["accuracy_stderr"] for k in labels]
    fig, ax = plt.subplots(figsize=(3.5, 3.2))
    ax.bar(labels, accs, yerr=errs, capsize=6, color=["#999999", "#3b7dd8"][: len(labels)])
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
