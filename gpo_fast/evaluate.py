"""Held-out evaluation: sample on fixed seeds, score, report accuracy with its standard error."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gpo_fast.models.base import DiffusionModel
from gpo_fast.rewards.toy import count_dots
from gpo_fast.sampling import sample
from gpo_fast.toy.data import MAX_DOTS, count_in_prompt, prompt_for

LENIENT_MIN_SIZE = 5  # the lenient counter ignores specks under 5 px; accuracy is also reported strict


def toy_eval_prompts(n_samples: int) -> list[str]:
    """Word-form prompts cycling through 1..MAX_DOTS dots."""
    return [prompt_for(1 + i % MAX_DOTS) for i in range(n_samples)]


def evaluate_toy(
    model: DiffusionModel, *, n_samples: int = 1000, steps: int = 12, cfg_scale: float = 2.0, seed: int = 10_000,
) -> dict:
    """Counting accuracy of the toy model on n_samples fixed-seed samples."""
    prompts = toy_eval_prompts(n_samples)
    images = model.decode(sample(model, prompts, steps=steps, cfg_scale=cfg_scale,
                                 generator=torch.Generator().manual_seed(seed)))
    wanted = torch.tensor([count_in_prompt(p) for p in prompts])
    strict = count_dots(images)
    lenient = count_dots(images, min_size=LENIENT_MIN_SIZE)
    acc = (strict == wanted).float().mean().item()
    return {
        "n_samples": n_samples,
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n_samples),
        "accuracy_lenient": (lenient == wanted).float().mean().item(),
        "blank_fraction": (strict == 0).float().mean().item(),
        "mean_count": strict.float().mean().item(),
        "accuracy_per_n": {n: (strict[wanted == n] == n).float().mean().item() for n in range(1, MAX_DOTS + 1)},
    }, images


def full_precision():
    """A block where an enclosing CUDA autocast is switched off."""
    import contextlib

    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


def evaluate_prompts(
    model: DiffusionModel, reward, prompts: list, *, n_samples: int, steps: int, cfg_scale: float, seed: int,
    batch_size: int = 0, keep_images: int = 50,
) -> tuple[dict, torch.Tensor]:
    """Accuracy (the reward's exact success) and mean reward on n_samples fixed-seed samples, the eval
    prompts cycled in order; the first keep_images images come back, on the CPU (for grids)."""
    chosen = [prompts[i % len(prompts)] for i in range(n_samples)]
    gen = torch.Generator().manual_seed(seed)
    step = batch_size or n_samples
    images, rewards, correct = [], [], []
    for i in range(0, n_samples, step):  # one batch at a time: sample, decode, score, keep only the images
        part = chosen[i:i + step]
        imgs = model.decode(sample(model, [p.text for p in part], steps=steps, cfg_scale=cfg_scale, generator=gen,
                                   batch_size=step)).float().cpu()
        with full_precision():  # reward engines (easyocr) break on bf16 outputs of an enclosing autocast
            res = reward.measure(imgs, part)
        if sum(len(x) for x in images) < keep_images:
            images.append(imgs[:keep_images - sum(len(x) for x in images)])
        rewards.append(res.reward.float().cpu())
        correct.append(res.correct.cpu())
    rewards, correct = torch.cat(rewards), torch.cat(correct)
    acc = correct.float().mean().item()
    return {
        "n_samples": n_samples,
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n_samples),
        "reward_mean": rewards.nanmean().item(),
        "failed": int(rewards.isnan().sum()),
    }, torch.cat(images)


def load_tuned(model, source: Path) -> str:
    """Load what a run trained into `model`: an adapter folder, or a run folder holding `adapter/`
    (LoRA) or `model/` (a fully fine-tuned toy model or SD3 transformer). Returns what was loaded."""
    from gpo_fast.models.base import ADAPTER_FILE

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
    raise FileNotFoundError(f"{source} holds no adapter ({ADAPTER_FILE}) and no fine-tuned model; pass a run "
                            "folder of `gpo-fast train` or its `adapter` folder")


def run_eval(config, adapter: Path | None, out: Path, log=print) -> dict:
    """Accuracy on the eval prompts with fixed seeds: the base model, and beside it the adapter (or fully
    fine-tuned model) of a run. Writes report.json, grid.png (base above, tuned below) and accuracy.png."""
    import contextlib
    import json

    from gpo_fast.components import build_model, build_prompts, build_reward, resolve_device

    device = resolve_device(config)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    _, prompts = build_prompts(config)
    reward = build_reward(config, device)
    if hasattr(reward, "load"):
        reward.load()
    model = build_model(config, device, trainable=False, prompts=[p.text for p in prompts])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = config.eval

    def measure():
        with torch.no_grad(), amp():
            if config.model.kind == "toy":
                return evaluate_toy(model, n_samples=ev.samples, steps=ev.steps, cfg_scale=ev.cfg_scale, seed=ev.seed)
            return evaluate_prompts(model, reward, prompts, n_samples=ev.samples, steps=ev.steps,
                                    cfg_scale=ev.cfg_scale, seed=ev.seed, batch_size=config.rollout.batch_size)

    report = {"samples": ev.samples, "seed": ev.seed, "steps": ev.steps, "cfg_scale": ev.cfg_scale}
    base, base_images = measure()
    report["base"] = base
    log(f"base: accuracy {base['accuracy']:.3f} +- {base['accuracy_stderr']:.3f} on {ev.samples} samples")
    rows, labels = [base_images[:10]], ["base"]
    if adapter is not None:
        report["loaded"] = load_tuned(model, adapter)
        tuned, tuned_images = measure()
        report["tuned"] = tuned
        gain = tuned["accuracy"] - base["accuracy"]
        se = math.sqrt(base["accuracy_stderr"] ** 2 + tuned["accuracy_stderr"] ** 2)
        report.update(gain=gain, gain_ci95=[gain - 1.96 * se, gain + 1.96 * se])
        log(f"tuned: accuracy {tuned['accuracy']:.3f} +- {tuned['accuracy_stderr']:.3f}; gain {100 * gain:+.1f} "
            f"points, 95% CI [{100 * (gain - 1.96 * se):+.1f}, {100 * (gain + 1.96 * se):+.1f}]")
        rows.append(tuned_images[:10])
        labels.append("tuned")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    from gpo_fast.train import _save_grid

    _save_grid(torch.cat(rows), out / "grid.png")
    _bar_plot(report, labels, out / "accuracy.png")
    return report


def _bar_plot(report: dict, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accs = [report[k]["accuracy"] for k in labels]
    errs = [1.96 * report[k]["accuracy_stderr"] for k in labels]
    fig, ax = plt.subplots(figsize=(3.5, 3.2))
    ax.bar(labels, accs, yerr=errs, capsize=6, color=["#999999", "#3b7dd8"][: len(labels)])
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
