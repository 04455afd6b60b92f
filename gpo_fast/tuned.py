"""A trained run, used: measured beside its base model (`gpo-fast eval`) and drawn from (`gpo-fast sample`).

run_eval: the base model and a run's adapter (or fine-tuned model) on the same held-out prompts and seeds,
so the difference is the training's; writes report.json, grid.png (base and tuned side by side, the
same prompts and seeds, each tile labelled and marked right or wrong) and accuracy.png.
draw_to_files: images of the base model or of a run, one PNG each."""

from __future__ import annotations

from pathlib import Path

import torch

from gpo_fast.components import build_evaluator, build_model, build_task, resolve_device
from gpo_fast.evaluate import load_tuned
from gpo_fast.report import describe_gain, gain_interval, save_accuracy_bars, save_panels, write_json


def run_eval(config, adapter: Path | None, out: Path, log=print) -> dict:
    """Accuracy of the base model, and beside it of the tuned one when `adapter` is given; the report."""
    device = resolve_device(config)
    task = build_task(config, device)
    evaluator = build_evaluator(config, task, device)
    model = build_model(config, device, trainable=False, prompts=[p.text for p in task.eval_prompts])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = config.eval
    report = {"samples": ev.samples, "seed": ev.seed, "steps": ev.steps, "cfg_scale": ev.cfg_scale}
    base, base_images = evaluator(model, ev.seed)
    report["base"] = base
    log(f"base: accuracy {base['accuracy']:.3f} +- {base['accuracy_stderr']:.3f} on {ev.samples} samples")
    panels, labels = [(f"base: accuracy {100 * base['accuracy']:.1f}%", base_images.head(50))], ["base"]
    if adapter is not None:
        report["loaded"] = load_tuned(model, adapter)
        tuned, tuned_images = evaluator(model, ev.seed)
        report["tuned"] = tuned
        report.update(gain_interval(base, tuned))
        log(f"tuned: accuracy {tuned['accuracy']:.3f} +- {tuned['accuracy_stderr']:.3f}; {describe_gain(report)}")
        panels.append((f"tuned: accuracy {100 * tuned['accuracy']:.1f}%", tuned_images.head(50)))
        labels.append("tuned")
    write_json(out / "report.json", report)
    save_panels(panels, out / "grid.png")
    save_accuracy_bars(report, labels, out / "accuracy.png")
    return report


def draw_to_files(config, prompts: list[str], per_prompt: int, out: Path, adapter: Path | None = None,
                  steps: int | None = None, cfg_scale: float | None = None, seed: int = 0) -> list[Path]:
    """`per_prompt` images for each prompt (the config's eval sampler unless steps / cfg_scale are given),
    written to out/NNN-<prompt>.png; returns the paths."""
    from torchvision.utils import save_image

    from gpo_fast.sampling import sample

    device = resolve_device(config)
    model = build_model(config, device, trainable=False)
    if adapter is not None:
        load_tuned(model, adapter)
    texts = [p for p in prompts for _ in range(per_prompt)]
    with torch.no_grad():
        latents = sample(model, texts, steps=steps or config.eval.steps, cfg_scale=cfg_scale or config.eval.cfg_scale,
                         generator=torch.Generator().manual_seed(seed),
                         batch_size=config.rollout.batch_size or len(texts), solver=config.eval.solver)
        images = model.decode(latents).float().cpu()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (text, img) in enumerate(zip(texts, images)):
        slug = "".join(c if c.isalnum() else "-" for c in text.lower())[:40].strip("-") or "empty"
        written.append(out / f"{i:03d}-{slug}.png")
        save_image((img + 1) / 2, written[-1])
    return written
