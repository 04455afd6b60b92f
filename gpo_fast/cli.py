"""The `gpo-fast` command line (Typer). Thin: each command parses, validates and calls one library function.

Bad input anywhere below ends as a gpo_fast.errors.UserError; `_Command` turns it into one sentence on
stderr and exit code 2 (with --debug, the traceback), for every command, in one place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

# On every CPU with AVX512-BF16, importing bitsandbytes (diffusers does) fetches an optional CPU 4-bit kernel
# through Hugging Face's kernels package: bitsandbytes warns when that fails, and with HF_HUB_OFFLINE=1 kernels
# says it skips the kernel's publisher check. gpo-fast runs no 4-bit matmul on the CPU, so both lines would
# only bury the real output (a one-sentence error among them); other kernels records still show.
_BNB_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").addFilter(lambda record: _BNB_CPU_KERNEL not in record.getMessage())


class _Command(TyperCommand):
    """A command whose UserError (gpo_fast.errors) is one sentence and exit code 2, unless --debug."""

    def invoke(self, ctx):
        from gpo_fast.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.params.get("debug"):
                raise
            code = getattr(e, "exit_code", None)  # RunStopped: stopped on request, resumable (gpo_fast.stop)
            if code is not None:
                typer.secho(f"stopped: {e}", fg=typer.colors.YELLOW, err=True)
                raise typer.Exit(code)
            _fail(str(e))


app = typer.Typer(
    name="gpo-fast",
    help="Group Preference Optimization for text-to-image diffusion models, on one GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        from gpo_fast import __version__

        typer.echo(f"gpo-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Group Preference Optimization for text-to-image diffusion models, on one GPU."""


@app.command("train", cls=_Command)
def train_cmd(
    config_file: Optional[Path] = typer.Argument(None, metavar="[CONFIG]",
                                                 help="A TOML config; its keys override the preset's."),
    preset: str = typer.Option("toy", help="Starting point: 'toy' (GPO on the shipped toy model, CPU-sized), "
                                          "'sd35m-counting' (SD3.5 Medium, YOLO counting) or 'sd35m-text' "
                                          "(SD3.5 Medium, easyocr text rendering); see gpo_fast/config.py."),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE",
                                   help="Override one key, e.g. --set train.lr=1e-3 (repeatable; value in TOML syntax)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: the config's `out`, runs/gpo-toy)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the rollouts, the noise and the adapter's init."),
    vram: Optional[str] = typer.Option(None, metavar="8|12|16|24|auto",
                                       help="SD3 on a card of 8, 12, 16 or 24 GB: resolution, group size, micro-batch "
                                            "and quantization that fit it (before --set). auto: the largest preset "
                                            "whose planned peak fits this machine's GPU; the default for the SD3.5 "
                                            "presets without a config file when a CUDA GPU is present."),
    resume: Optional[str] = typer.Option(None, metavar="RUN_DIR|latest",
                                         help="Continue a run exactly from its last checkpoint (its config.toml; "
                                              "--set may change only keys that leave the math alone)."),
    report_to: Optional[str] = typer.Option(None, metavar="TRACKER[,TRACKER]",
                                            help="Experiment trackers (log.report_to): tensorboard (the default), "
                                                 "wandb, trackio, mlflow, several joined by commas, or none."),
    debug: bool = typer.Option(False, help="Show the full traceback of an error."),
) -> None:
    """Improve a diffusion model at a measurable skill with GPO, from its own samples.

    Every config key, its default and its meaning: `gpo-fast config --preset NAME`.

    With no arguments: the toy world. The shipped tiny SD3 transformer draws dots; GPO teaches it to
    draw as many as the prompt says. Prints held-out accuracy before and after (1000 samples each),
    the gain and its 95% interval; writes config.toml, metrics.jsonl, TensorBoard events, the adapter
    (diffusers LoRA format), before_after.png, reward_curve.png and summary.json to the run folder.
    """
    from gpo_fast.config import VRAM_PRESETS, load_config, smaller_vram

    if report_to is not None:
        set_ = [*set_, "log.report_to=" + json.dumps([t.strip() for t in report_to.split(",") if t.strip()])]
    if resume is not None:
        return _resume(resume, list(set_))
    vram = _vram(vram, preset, config_file)
    overrides = [*(VRAM_PRESETS[vram] if vram else []), *set_]
    if out is not None:
        overrides.append(f"out={json.dumps(str(out))}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    config = load_config(config_file, preset, overrides)
    run_dir = Path(config.out)
    if (run_dir / "summary.json").exists():
        _fail(f"{run_dir} already holds a finished run; choose another --out (nothing was changed)")
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        _fail(f"{run_dir} holds an unfinished run; continue it with --resume {run_dir} or choose another --out")
    nxt = smaller_vram(vram)
    hint = f"try --vram {nxt}" if nxt else "lower train.micro_batch, rollout.batch_size or model.resolution"
    _run_training(config, f"{hint} (checkpoints already written in {config.out} are intact)")


def _vram(vram: str | None, preset: str, config_file: Path | None) -> int | None:
    """--vram as a preset size: a number, or auto (the default for an SD3.5 preset with no config file when a CUDA
    GPU is present): the largest preset whose planned peak fits the GPU, said with why."""
    from gpo_fast.config import VRAM_PRESETS

    explicit = vram is not None
    if vram is None:
        import torch

        if not (preset.startswith("sd35m") and config_file is None and torch.cuda.is_available()):
            return None
        vram = "auto"
    if vram != "auto":
        if not vram.isdigit() or int(vram) not in VRAM_PRESETS:
            _fail(f"--vram {vram} is not a preset; choose one of {', '.join(map(str, sorted(VRAM_PRESETS)))} or auto")
        return int(vram)
    import torch

    from gpo_fast.plan import auto_vram

    if not torch.cuda.is_available():
        _fail("--vram auto: there is no CUDA GPU here to fit; name a preset (--vram 8, 12, 16 or 24) or leave "
              "--vram out")
    device = int(os.environ.get("LOCAL_RANK", "0"))  # under a launcher, this process's own card
    props = torch.cuda.get_device_properties(device)
    chosen, why = auto_vram(props.total_memory)
    if chosen is None:
        _fail(f"--vram auto on {props.name}: {why}; this card is too small for SD3.5 Medium as planned")
    typer.echo(f"{'--vram auto' if explicit else 'no --vram given, so --vram auto'} on {props.name}: {why}", err=True)
    return chosen


def _resume(resume: str, set_: list[str]) -> None:
    from gpo_fast.checkpoint import latest_intact, list_checkpoints
    from gpo_fast.config import RESUME_HARMLESS, load_config, resume_conflicts

    if resume == "latest":  # the unfinished run under runs/ whose newest checkpoint is the most recent
        runs = [r for r in Path("runs").glob("*") if list_checkpoints(r) and not (r / "summary.json").exists()]
        if not runs:
            _fail("--resume latest: no unfinished run with a checkpoint under runs/; pass the run folder")
        run_dir = max(runs, key=lambda r: list_checkpoints(r)[-1].stat().st_mtime)
    else:
        run_dir = Path(resume)
    if not (run_dir / "config.toml").is_file():
        _fail(f"--resume {run_dir}: not a run folder of `gpo-fast train` (no config.toml); pass the folder a run "
              "wrote (its --out)")
    if (run_dir / "summary.json").exists():
        _fail(f"{run_dir} finished already (summary.json); there is nothing to resume")
    saved = load_config(run_dir / "config.toml")
    config = load_config(run_dir / "config.toml", overrides=[*set_, f"out={json.dumps(str(run_dir))}"])
    math = resume_conflicts(saved, config)
    if math:
        _fail(f"--resume {run_dir}: changing {', '.join(math)} would change the training's math; drop those --set "
              f"or start a new run (keys a resume may change: {', '.join(sorted(RESUME_HARMLESS))})")
    if not list_checkpoints(run_dir):
        _fail(f"{run_dir} has no checkpoint yet (one is written every train.checkpoint_every rollouts); "
              "start it again with a new --out")
    checkpoint, damaged = latest_intact(run_dir, move_aside=os.environ.get("RANK", "0") == "0")
    for reason in damaged:
        typer.echo(f"warning: {reason}; passing over it to the checkpoint before", err=True)
    if checkpoint is None:
        _fail(f"every checkpoint in {run_dir / 'checkpoints'} is damaged (moved aside as damaged-rollout-N), so "
              "the run cannot continue; start it again with a new --out")
    _run_training(config, f"the checkpoints in {run_dir} are intact (try a smaller --vram preset)", resume=checkpoint)


def _run_training(config, oom_hint: str, resume=None) -> None:
    """Train with progress bars; running out of GPU memory is a UserError naming what to try."""
    import torch

    from gpo_fast.errors import UserError

    try:
        _train_with_progress(config, resume)
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(f"the GPU ran out of memory; {oom_hint}") from e


def _train_with_progress(config, resume=None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gpo_fast.train import train

    console = Console()
    console.print(f"[bold]gpo-fast train[/]: objective {config.train.objective}, {config.rollout.prompts} prompts x "
                  f"{config.rollout.group_size} images per rollout, {config.train.rollouts} rollouts -> {config.out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("reward {task.fields[reward]:.2f}  loss {task.fields[loss]:.3g}  "
                             "degenerate {task.fields[degenerate]:.2f}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("rollouts", total=config.train.rollouts, reward=0.0, loss=0.0, degenerate=0.0)
        updates = bar.add_task("updates ", total=config.train.rollouts * config.train.inner_updates, reward=0.0,
                               loss=0.0, degenerate=0.0)

        def on_rollout(row):
            fields = dict(reward=row["reward_mean"], loss=row["loss"], degenerate=row["degenerate_fraction"])
            bar.update(task, completed=row["rollout"], **fields)  # a resumed run starts part-way
            bar.update(updates, **fields)

        result = train(config, log=console.print, progress=on_rollout,
                       on_update=lambda done: bar.update(updates, completed=done), resume=resume)
    s = result.summary
    if not s:  # a process other than rank 0 under `accelerate launch`: rank 0 reports
        return
    from gpo_fast.report import describe_gain

    console.print(f"accuracy before {s['accuracy_before']:.3f}, after {s['accuracy_after']:.3f} "
                  f"({s['eval_samples']} held-out samples): {describe_gain(s)}; {s['wall_seconds']:.0f} s. "
                  f"Run folder: {config.out}")


@app.command("eval", cls=_Command)
def eval_cmd(
    config_file: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", help="A TOML config (e.g. a run's config.toml)."),
    preset: str = typer.Option("toy", help="Starting point: toy, sd35m-counting, sd35m-text."),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE", help="Override one key (repeatable)."),
    adapter: Optional[Path] = typer.Option(None, help="A run folder of `gpo-fast train`, or its adapter folder, to "
                                                      "evaluate beside the base model."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for report.json, grid.png and accuracy.png."),
    samples: Optional[int] = typer.Option(None, min=10, help="Samples per model (default: the config's eval.samples)."),
    debug: bool = typer.Option(False, help="Show the full traceback of an error."),
) -> None:
    """Accuracy on the eval prompts with fixed seeds: the base model and, with --adapter, the tuned one.

    The same held-out seeds and prompts for both, so the difference is the training's. Prints both
    accuracies, the gain and its 95% interval; writes report.json, grid.png (base row, tuned row) and
    accuracy.png (a bar plot).
    """
    from gpo_fast.tuned import run_eval
    from gpo_fast.config import load_config

    extra = [f"eval.samples={samples}"] if samples else []
    config = load_config(config_file, preset, [*set_, *extra])
    if adapter is not None and not adapter.exists():
        _fail(f"--adapter {adapter} does not exist; pass a run folder of `gpo-fast train` or its adapter folder")
    run_eval(config, adapter, out, log=typer.echo)
    typer.echo(f"wrote {out / 'report.json'}")


@app.command("sample", cls=_Command)
def sample_cmd(
    prompt: list[str] = typer.Option(..., "--prompt", help="A prompt (repeatable)."),
    config_file: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", help="A TOML config (e.g. a run's config.toml)."),
    preset: str = typer.Option("toy", help="Which model: toy, sd35m-counting, sd35m-text (their model section)."),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE", help="Override one key (repeatable)."),
    adapter: Optional[Path] = typer.Option(None, help="A run folder of `gpo-fast train`, or its adapter folder."),
    n: int = typer.Option(4, min=1, help="Images per prompt."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampler steps (default: the config's eval.steps)."),
    cfg: Optional[float] = typer.Option(None, min=1.0, help="Guidance scale (default: the config's eval.cfg_scale)."),
    seed: int = typer.Option(0, help="Seed of the starting noise."),
    out: Path = typer.Option(Path("runs/samples"), help="Folder for the PNG files."),
    debug: bool = typer.Option(False, help="Show the full traceback of an error."),
) -> None:
    """Draw images from the base model, or from a trained adapter, into PNG files."""
    from gpo_fast.config import load_config
    from gpo_fast.tuned import draw_to_files

    config = load_config(config_file, preset, list(set_))
    if adapter is not None and not adapter.exists():
        _fail(f"--adapter {adapter} does not exist; pass a run folder of `gpo-fast train` or its adapter folder")
    written = draw_to_files(config, list(prompt), n, out, adapter=adapter, steps=steps, cfg_scale=cfg, seed=seed)
    typer.echo(f"wrote {len(written)} images to {out}")


@app.command("plan", cls=_Command)
def plan_cmd(
    config_file: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", help="A TOML config (e.g. a run's config.toml)."),
    preset: str = typer.Option("sd35m-counting", help="Starting point: sd35m-counting or sd35m-text."),
    vram: Optional[int] = typer.Option(None, help="Plan a --vram preset of `gpo-fast train` (before --set)."),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE", help="Override one key (repeatable)."),
    card: Optional[str] = typer.Option(None, help="Say whether the run fits this card and estimate its time: "
                                                  "rtx3090, rtx4090, rtx5090, a100-40, a100-80, l40s, h100."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
    debug: bool = typer.Option(False, help="Show the full traceback of an error."),
) -> None:
    """Peak GPU memory and FLOPs of a run, per phase, planned on this machine before anything is downloaded.

    Builds the configured SD3 / SD3.5 model from its configs alone (shipped for SD3.5 Medium and Large, or a
    local model.path folder's) and runs the trainer's own code on fake tensors: the prompt encoding (priced),
    one rollout (the sampler at rollout.cfg_scale, the VAE decode) and one training update (reference errors,
    policy passes, backward), with what holds each peak. Planned, not measured on a GPU.
    """
    from gpo_fast.config import VRAM_PRESETS, load_config
    from gpo_fast.plan import CARDS, plan, render

    if vram is not None and vram not in VRAM_PRESETS:
        _fail(f"--vram {vram} is not a preset; choose one of {', '.join(map(str, sorted(VRAM_PRESETS)))}")
    if card is not None and card not in CARDS:
        _fail(f"unknown card '{card}'; choose one of {', '.join(CARDS)}")
    config = load_config(config_file, preset, [*(VRAM_PRESETS[vram] if vram else []), *set_])
    result = plan(config)
    chosen = CARDS[card] if card else None
    if as_json:
        typer.echo(json.dumps(result.to_json(chosen), indent=2))
    else:
        typer.echo(render(result, chosen))


@app.command("doctor")
def doctor_cmd(
    detector: str = typer.Option("yolo11x.pt", help="The YOLO weights to look for (reward.detector)."),
) -> None:
    """One screen: torch, CUDA and the card, the kernels, bitsandbytes, xformers, the reward engines and
    their weights, the network, disk space; each line ok, or what to do."""
    from gpo_fast.doctor import main

    raise typer.Exit(main(detector=detector))


@app.command("config", cls=_Command)
def config_cmd(
    config_file: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", help="A TOML config to resolve."),
    preset: str = typer.Option("toy", help="The preset to start from: toy, sd35m-counting, sd35m-text."),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE", help="Override one key (repeatable)."),
    markdown: bool = typer.Option(False, help="Print the configuration reference instead (every key's type, default, "
                                              "allowed values and meaning; every preset with its reasons): "
                                              "docs/config.md."),
) -> None:
    """Print the resolved config: every key, its value and what it means (TOML; a valid config file).

    Every key can be set in a TOML file passed to `gpo-fast train CONFIG` or with --set section.key=value.
    """
    from gpo_fast.config import config_markdown, describe_config, load_config

    if markdown:
        typer.echo(config_markdown(), nl=False)
        return
    typer.echo(describe_config(load_config(config_file, preset, list(set_))), nl=False)


@app.command("prompts", cls=_Command)
def prompts_cmd(
    kind: str = typer.Argument(..., metavar="counting|text", help="counting: 'a photo of {n} {objects}' over the "
                               "detector's classes; text: 'a sign that says \"{word}\"' over the shipped word list."),
    out: Path = typer.Option(..., "--out", help="JSONL file to write (one prompt per line, with a train/val/eval "
                             "split)."),
    eval_fraction: float = typer.Option(0.2, min=0.01, max=0.99, help="Share of items held out for evaluation."),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.98, help="Share of items held out for validation (picks "
                                       "the best adapter); 0: none, the loop validates on the eval prompts."),
    seed: int = typer.Option(0, help="Seed of the train/val/eval split."),
    n_min: int = typer.Option(1, min=1, max=20, help="counting: smallest count asked for."),
    n_max: int = typer.Option(6, min=1, max=20, help="counting: largest count asked for."),
    words: Optional[Path] = typer.Option(None, help="text: a word list (one per line) instead of the shipped one."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Generate a prompt set with its metadata (class and count; target text) as JSONL.

    Train, val and eval splits are disjoint by item: a (class, count) pair or a word is trained on, validated
    on or held out, only one of them. Use the file with --set data.prompts=FILE.jsonl.
    """
    from gpo_fast.prompts import make_prompt_set

    if kind not in ("counting", "text"):
        _fail(f"unknown prompt set '{kind}'; choose counting or text")
    if n_min > n_max:
        _fail(f"--n-min ({n_min}) is above --n-max ({n_max})")
    if eval_fraction + val_fraction >= 1:
        _fail(f"--eval-fraction + --val-fraction must be below 1 (got {eval_fraction} + {val_fraction}): something "
              "must be left to train on")
    if out.exists() and not overwrite:
        _fail(f"{out} already exists; choose another --out or pass --overwrite")
    if words is not None and not words.is_file():
        _fail(f"word list {words} does not exist")
    try:
        n_train, n_val, n_eval = make_prompt_set(kind, out, eval_fraction=eval_fraction, val_fraction=val_fraction,
                                                 seed=seed, n_min=n_min, n_max=n_max, words_file=words)
    except OSError as e:  # the file cannot be written
        _fail(f"cannot write {out} ({e.strerror or e}); choose another --out")
    typer.echo(f"wrote {n_train} train, {n_val} val and {n_eval} eval prompts to {out}")


toy_app = typer.Typer(help="The toy world: a tiny SD3 transformer that learns to draw and count dots on a CPU.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _fail(message: str) -> None:
    """One sentence on stderr, exit code 2, no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@toy_app.command("pretrain", cls=_Command)
def toy_pretrain(
    out: Path = typer.Option(..., "--out", help="Folder for model.safetensors and model.json (the manifest)."),
    steps: int = typer.Option(3000, min=1, help="Optimizer steps (batch 64: about 0.17 s each on 2 CPU cores)."),
    batch_size: int = typer.Option(64, min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak AdamW learning rate (linear warm-up, cosine decay)."),
    caption_noise: float = typer.Option(0.5, min=0.0, max=1.0,
                                        help="Fraction of images captioned with n +- 1 instead of n."),
    seed: int = typer.Option(0, help="Seed of the data, the noise and the initial weights."),
    eval_samples: int = typer.Option(1000, min=10, help="Held-out samples for the accuracy in the manifest."),
    overwrite: bool = typer.Option(False, help="Replace a model already in --out."),
) -> None:
    """Pretrain the toy base model with flow matching on dot images whose captions carry count noise.

    Writes the EMA weights (safetensors) and a manifest with their sha256, this command and the
    held-out counting accuracy it reached. The shipped base model was made this way.
    """
    import sys

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from gpo_fast.toy.pretrain import PretrainConfig, pretrain_and_save

    if (out / "model.safetensors").exists() and not overwrite:
        _fail(f"{out / 'model.safetensors'} already exists; choose another --out or pass --overwrite")
    config = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, caption_noise=caption_noise, seed=seed)
    with Progress(TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("pretrain", total=steps, loss=float("nan"))
        manifest = pretrain_and_save(config, out, eval_samples, command="gpo-fast " + " ".join(sys.argv[1:]),
                                     progress=lambda step, loss: bar.update(task, advance=1, loss=loss),
                                     log=typer.echo)
    metrics = manifest["eval"]
    typer.echo(f"accuracy {metrics['accuracy']:.3f} +- {metrics['accuracy_stderr']:.3f} (strict counter), "
               f"blank {metrics['blank_fraction']:.3f}; wrote {out / 'model.safetensors'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
