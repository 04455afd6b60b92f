"""The model card a run writes beside its adapter (or fine-tuned model): README.md with the YAML front matter the
Hugging Face hub reads (huggingface_hub's ModelCardData), the task, the reward, the key hyper-parameters, the
held-out accuracy before and after with its interval, the before/after grid, and how to load it."""

from __future__ import annotations

import shutil
from pathlib import Path

from gpo_fast.config import Config

# the licenses of the bases this project knows; another base's license applies as its authors state it
LICENSES = {
    "stabilityai/stable-diffusion-3.5-medium": ("other", "stabilityai-ai-community",
                                                "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"),
    "stabilityai/stable-diffusion-3.5-large": ("other", "stabilityai-ai-community",
                                               "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md"),
}
TOY_BASE = "gpo-fast toy model (shipped with gpo-fast, Apache-2.0)"


def _reference(train) -> str:
    """What the log-ratio was measured against (train.reference_decay)."""
    if not train.reference_decay:
        return "the frozen base"
    return f"a moving average of its own weights (train.reference_decay {train.reference_decay})"


def base_model(config: Config) -> str:
    from gpo_fast.models.sd3 import DEFAULT_MODEL

    return TOY_BASE if config.model.kind == "toy" else (config.model.path or DEFAULT_MODEL)


def _task(config: Config) -> str:
    kind = config.reward.kind
    if kind == "python":
        return f"your own reward, `{config.reward.callable}`"
    task = {"toy-count": "drawing the asked number of dots (the toy world)",
            "yolo-count": f"counting objects (YOLO `{config.reward.detector}`, confidence {config.reward.conf})",
            "ocr-text": "rendering the asked text (easyocr)",
            "composite": f"a weighted mix of rewards {dict(config.reward.weights)}"}[kind]
    if kind in ("toy-count", "yolo-count") and config.reward.partial_credit:
        task += ", rewarded with partial credit for a count near the asked one, max(0, 1 - |count - n| / n)"
    return task


def _snippet(config: Config, folder: Path) -> str:
    if config.model.kind == "toy":
        run = folder.parent
        return (f"gpo-fast eval {run}/config.toml --adapter {run}        # held-out accuracy, base vs this adapter\n"
                f'gpo-fast sample {run}/config.toml --adapter {run} --prompt "three dots"')
    base, ev = base_model(config), config.eval  # sampled as it was evaluated: steps, guidance, solver
    imports = "StableDiffusion3Pipeline" + (", DPMSolverMultistepScheduler" if ev.solver == "dpm++2m" else "")
    lines = ["import torch", f"from diffusers import {imports}", "",
             f'pipe = StableDiffusion3Pipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")']
    if ev.solver == "dpm++2m":
        lines += ["pipe.scheduler = DPMSolverMultistepScheduler(algorithm_type=\"dpmsolver++\", solver_order=2, "
                  "prediction_type=\"flow_prediction\",",
                  "    use_flow_sigmas=True, flow_shift=pipe.scheduler.config.shift)"]
    lines += [f'pipe.load_lora_weights("{folder}")',
              f'image = pipe("a photo of three cats", num_inference_steps={ev.steps}, '
              f"guidance_scale={ev.cfg_scale:g}).images[0]"]
    return "\n".join(lines)


def _guidance(config: Config) -> list[str]:
    """What a user of the adapter should know about guidance, when it was trained without."""
    if config.rollout.cfg_scale != 1.0:
        return []
    if config.eval.cfg_scale != 1.0:
        return [f"Trained on samples drawn without classifier-free guidance (rollout.cfg_scale 1), measured at "
                f"guidance {config.eval.cfg_scale:g}, as the snippet below samples.", ""]
    return ["Trained on samples drawn without classifier-free guidance (rollout.cfg_scale 1) and measured without "
            "guidance too: it is meant to be used without guidance, one forward per step (`guidance_scale=1.0`).", ""]


def model_card(config: Config, summary: dict, folder: Path, grid: str | None) -> str:
    """The card's text: front matter, then Markdown."""
    from huggingface_hub import ModelCardData

    base = base_model(config)
    license_id, license_name, license_link = LICENSES.get(base, ("other", None, None))
    if config.model.kind == "toy":
        license_id, license_name, license_link = "apache-2.0", None, None
    data = ModelCardData(
        base_model=None if config.model.kind == "toy" else base, library_name="diffusers", license=license_id,
        license_name=license_name, license_link=license_link, pipeline_tag="text-to-image",
        tags=["lora" if config.lora.enabled else "full-fine-tune", "gpo", "gpo-fast", "text-to-image",
              config.train.objective])
    t, ro = config.train, config.rollout
    lo, hi = summary["gain_ci95"]
    guided = "accuracy_base_guided" in summary  # a guidance-free run, its base also measured with guidance
    free = ", no guidance" if guided else ""
    lines = [
        f"# {'LoRA adapter' if config.lora.enabled else 'Fine-tuned model'} for {base}, trained with GPO",
        "",
        "Trained with gpo-fast (Group Preference Optimization) at "
        f"{_task(config)}, on its own samples: {ro.group_size} images per prompt, rewards standardized within "
        f"each group, a DPO-style objective against {_reference(config.train)}.",
        "",
        "## Held-out accuracy",
        "",
        f"| | accuracy | samples |\n|---|---|---|\n"
        + (f"| base, guidance {summary['base_cfg_scale']:g} | {summary['accuracy_base_guided']:.3f} | "
           f"{summary['eval_samples']} |\n" if guided else "")
        + f"| base{free} | {summary['accuracy_before']:.3f} | {summary['eval_samples']} |\n"
        f"| this {'adapter' if config.lora.enabled else 'model'}{free} | {summary['accuracy_after']:.3f} | "
        f"{summary['eval_samples']} |",
        "",
        f"Gain {100 * summary['gain']:+.1f} points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}] (the same "
        f"prompts and seeds before and after; the kept weights are those of rollout {summary['best_rollout']}, "
        f"chosen on {summary.get('validation', 'validation')}).",
        "",
        *_guidance(config),
    ]
    if grid:
        lines += [f"![the same prompts and seeds, before and after]({grid})", ""]
    lines += [
        "## Training",
        "",
        f"- objective `{t.objective}`, beta {t.beta}{' / G' if t.beta_per_member else ''}, lr {t.lr}, optimizer "
        f"`{t.optimizer}`"
        + (f", the kept weights a moving average (train.ema_decay {t.ema_decay})" if t.ema_decay else ""),
        f"- {summary['rollouts']} rollouts of {ro.prompts} prompts x {ro.group_size} images, {t.inner_updates} "
        f"updates each ({summary['steps']} in all), {ro.steps} sampler steps ({ro.solver}), CFG {ro.cfg_scale}",
        f"- {'LoRA rank ' + str(config.lora.rank) + ', alpha ' + str(config.lora.alpha) if config.lora.enabled else 'every weight trained'}"
        + ("" if config.model.kind == "toy" else f", resolution {config.model.resolution} px") + f", seed {config.seed}",
        "- the whole configuration: `config.toml` in the run folder",
        "",
        "## Use",
        "",
        f"```{'bash' if config.model.kind == 'toy' else 'python'}",
        _snippet(config, folder),
        "```",
        "",
        f"License: the base model's ({license_name or license_id}).",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(folder: Path, config: Config, summary: dict, grid_path: Path | None) -> Path:
    """README.md in the adapter (or model) folder, with a copy of the before/after grid beside it."""
    grid = None
    if grid_path is not None and grid_path.is_file():
        shutil.copyfile(grid_path, folder / grid_path.name)
        grid = grid_path.name
    path = folder / "README.md"
    path.write_text(model_card(config, summary, folder, grid))
    return path
