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


RIGHT, WRONG, UNKNOWN = (34, 160, 60), (210, 40, 40), (150, 150, 150)  # tile borders: the reward's `correct`
BORDER, LABEL_H, GAP, TITLE_H = 3, 13, 4, 18  # px


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """(K, 3, s, s) in [0, 1]: tiny images upscaled (nearest, so single pixels stay visible) to at least
    64 px, large ones shrunk to 128 px; one channel is shown grey."""
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    side = x.shape[-1]
    if side < 64:
        x = torch.nn.functional.interpolate(x, scale_factor=-(-64 // side), mode="nearest")
    elif side > 128:
        x = torch.nn.functional.interpolate(x, size=(128, 128), mode="area")
    return x


def render_panels(panels: list[tuple[str, object]], ncol: int = 10):
    """One image of labelled tiles: each panel (title, Tiles) a block of `ncol` columns under its title, the
    panels side by side with tile i at the same place in each (the same prompt and seed across a
    before/after). Every tile has its label (what was asked) under it and a border green where the reward
    counted it right, red where wrong, grey where not known. Returns (PIL image, boxes): boxes[p][i] is
    tile i's (left, top, right, bottom) in panel p, border included."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    thumbs = [_thumbnails(t.images) for _, t in panels]
    side = max(th.shape[-1] for th in thumbs)
    cell_w, cell_h = side + 2 * BORDER + GAP, side + 2 * BORDER + LABEL_H + GAP
    rows = max(-(-len(t) // ncol) for _, t in panels)
    titled = any(title for title, _ in panels)
    top = TITLE_H if titled else 0
    panel_w = ncol * cell_w
    canvas = Image.new("RGB", (len(panels) * panel_w + (len(panels) - 1) * 3 * GAP + GAP,
                               top + rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for p, ((title, tiles), th) in enumerate(zip(panels, thumbs)):
        x_panel = GAP + p * (panel_w + 3 * GAP)
        if title:
            draw.text((x_panel, 3), title, fill="black", font=font)
        panel_boxes = []
        for i in range(len(tiles)):
            x0, y0 = x_panel + (i % ncol) * cell_w, top + GAP + (i // ncol) * cell_h
            ok = tiles.correct[i]
            colour = UNKNOWN if ok is None else RIGHT if ok else WRONG
            box = (x0, y0, x0 + th.shape[-1] + 2 * BORDER, y0 + th.shape[-2] + 2 * BORDER)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
            tile = (th[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(tile), (x0 + BORDER, y0 + BORDER))
            label = tiles.labels[i]
            while label and draw.textlength(label, font=font) > cell_w - GAP:
                label = label[:-2] + "~"
            draw.text((x0, box[3] + 1), label, fill="black", font=font)
            panel_boxes.append(box)
        boxes.append(panel_boxes)
    return canvas, boxes


def save_grid(tiles, path: Path, title: str = "") -> None:
    """Tiles (gpo_fast.evaluate.Tiles) as a labelled 10-wide grid."""
    save_panels([(title, tiles)], path, ncol=10)


def save_panels(panels: list[tuple[str, object]], path: Path, ncol: int = 5) -> None:
    """Several titled grids side by side, the same place the same prompt and seed (before / after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_panels(panels, ncol=ncol)[0].save(path)


def _accuracy_title(name: str, metrics: dict | None) -> str:
    if not metrics:
        return name
    return f"{name}: accuracy {100 * metrics['accuracy']:.1f}% of {metrics['n_samples']} held-out samples"


def save_before_after(before, after, path: Path, before_metrics: dict | None = None,
                      after_metrics: dict | None = None, guided: tuple | None = None) -> None:
    """The same held-out prompts and seeds before (left) and after (right), labelled and marked. guided:
    (tiles, metrics, scale) of the base with guidance, for a run evaluated without: then three panels, the base
    with guidance, the base without, the tuned model without."""
    if guided is None:
        k = min(50, len(before), len(after))
        save_panels([(_accuracy_title("before", before_metrics), before.head(k)),
                     (_accuracy_title("after", after_metrics), after.head(k))], path)
        return
    tiles, metrics, scale = guided
    k = min(50, len(before), len(after), len(tiles))
    save_panels([(_accuracy_title(f"base, guidance {scale:g}", metrics), tiles.head(k)),
                 (_accuracy_title("base, no guidance", before_metrics), before.head(k)),
                 (_accuracy_title("tuned, no guidance", after_metrics), after.head(k))], path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """An exponential moving average, debiased (TensorBoard's smoothing); NaNs are carried over, not used."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm if norm else math.nan)
    return out


def reward_curve_figure(history: list[dict], *, val_start: float | None = None, before: float | None = None,
                        after: float | None = None, kept_rollout: int | None = None):
    """The run in one figure: validation accuracy from rollout 0 (val_start, the base model), the held-out
    accuracy before and after as dashed lines, the rollout reward raw and smoothed, the degenerate-group
    fraction on the right axis, and a vertical line at the kept adapter's rollout."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [h["rollout"] for h in history]
    reward = [math.nan if h.get("reward_mean") is None else h["reward_mean"] for h in history]
    ax.plot(x, reward, color="#9bbbe8", linewidth=1, label="rollout reward")
    ax.plot(x, smoothed(reward), color="#2a62b5", linewidth=2, label="rollout reward, smoothed")
    val = [(0, val_start)] if val_start is not None else []
    val += [(h["rollout"], h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]
    if val:
        ax.plot(*zip(*val), marker="o", color="#d9822b", label="validation accuracy")
    if before is not None:
        ax.axhline(before, color="#777777", linestyle="--", linewidth=1, label=f"held-out before {100 * before:.1f}%")
    if after is not None:
        ax.axhline(after, color="#2e9e44", linestyle="--", linewidth=1, label=f"held-out after {100 * after:.1f}%")
    if kept_rollout is not None:
        ax.axvline(kept_rollout, color="#2e9e44", linestyle=":", linewidth=1.5,
                   label=f"kept adapter (rollout {kept_rollout})")
    ax.set_xlabel("rollout")
    ax.set_ylabel("reward, accuracy")
    ax.set_xlim(left=0)
    if history and all(h.get("flops") is not None for h in history):  # a second x-axis: the training compute so far
        import numpy as np

        rollouts = np.array([0.0] + [float(h["rollout"]) for h in history])
        flops = np.array([0.0] + [h["flops"] / 1e12 for h in history])  # TFLOP, increasing with the rollout
        top = ax.secondary_xaxis("top", functions=(lambda r: np.interp(r, rollouts, flops),
                                                   lambda f: np.interp(f, flops, rollouts)))
        top.set_xlabel("training compute, TFLOP (rollouts and updates)")
    right = ax.twinx()
    degenerate = [h.get("degenerate_fraction") for h in history]
    right.plot(x, [math.nan if d is None else d for d in degenerate], color="#b0b0b0", linewidth=1,
               label="degenerate groups (right axis)")
    right.set_ylabel("fraction of degenerate groups")
    right.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def save_reward_curve(history: list[dict], path: Path, **marks) -> None:
    """reward_curve_figure(history, **marks) as a PNG."""
    plt = _pyplot()
    fig = reward_curve_figure(history, **marks)
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
