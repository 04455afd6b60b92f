"""The `gpo-fast` command line (Typer). Thin: each command parses, validates and calls the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

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


@app.command("train")
def train_cmd(
    config_file: Optional[Path] = typer.Argument(None, metavar="[CONFIG]",
                                                 help="A TOML config; its keys override the preset's."),
    preset: str = typer.Option("toy", help="Starting point: 'toy' (GPO on the shipped toy model, CPU-sized)."),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE",
                                   help="Override one key, e.g. --set train.lr=1e-3 (repeatable; value in TOML syntax)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: the config's `out`, runs/gpo-toy)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the rollouts, the noise and the adapter's init."),
    debug: bool = typer.Option(False, help="Show the full traceback of an error."),
) -> None:
    """Improve a diffusion model at a measurable skill with GPO, from its own samples.

    With no arguments: the toy world. The shipped tiny SD3 transformer draws dots; GPO teaches it to
    draw as many as the prompt says. Prints held-out accuracy before and after (1000 samples each),
    the gain and its 95% interval; writes config.toml, metrics.jsonl, TensorBoard events, the adapter
    (diffusers LoRA format), before_after.png, reward_curve.png and summary.json to the run folder.
    """
    from gpo_fast.config import ConfigError, load_config

    overrides = list(set_)
    if out is not None:
        overrides.append(f"out={json.dumps(str(out))}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    try:
        config = load_config(config_file, preset, overrides)
    except ConfigError as e:
        _fail(str(e))
    run_dir = Path(config.out)
    if (run_dir / "summary.json").exists():
        _fail(f"{run_dir} already holds a finished run; choose another --out (nothing was changed)")
    try:
        _run_training(config)
    except (FileNotFoundError, ValueError) as e:
        if debug:
            raise
        _fail(str(e))


def _run_training(config) -> None:
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

        def on_rollout(row):
            bar.update(task, advance=1, reward=row["reward_mean"], loss=row["loss"],
                       degenerate=row["degenerate_fraction"])

        result = train(config, log=console.print, progress=on_rollout)
    s = result.summary
    lo, hi = s["gain_ci95"]
    console.print(f"accuracy before {s['accuracy_before']:.3f}, after {s['accuracy_after']:.3f} "
                  f"(strict counter, {s['eval_samples']} held-out samples): gain {s['gain'] * 100:+.1f} points, "
                  f"95% CI [{lo * 100:+.1f}, {hi * 100:+.1f}]; {s['wall_seconds']:.0f} s. Run folder: {config.out}")


toy_app = typer.Typer(help="The toy world: a tiny SD3 transformer that learns to draw and count dots on a CPU.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _fail(message: str) -> None:
    """One sentence on stderr, exit code 2, no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@toy_app.command("pretrain")
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
    import hashlib
    import json
    import sys
    import time

    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from gpo_fast.evaluate import evaluate_toy
    from gpo_fast.toy.pretrain import PretrainConfig, pretrain

    if (out / "model.safetensors").exists() and not overwrite:
        _fail(f"{out / 'model.safetensors'} already exists; choose another --out or pass --overwrite")
    config = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, caption_noise=caption_noise, seed=seed)
    start = time.time()
    with Progress(TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("pretrain", total=steps, loss=float("nan"))
        model, losses = pretrain(config, progress=lambda step, loss: bar.update(task, advance=1, loss=loss))
    train_seconds = time.time() - start
    typer.echo(f"evaluating on {eval_samples} held-out samples ...")
    metrics, _ = evaluate_toy(model, n_samples=eval_samples)
    manifest = {
        "command": "gpo-fast " + " ".join(sys.argv[1:]),
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
    typer.echo(f"accuracy {metrics['accuracy']:.3f} +- {metrics['accuracy_stderr']:.3f} (strict counter), "
               f"blank {metrics['blank_fraction']:.3f}; wrote {weights}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
