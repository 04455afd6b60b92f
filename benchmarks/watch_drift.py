"""How far a trained run's images have moved from the base model's on the statistics the reward-hacking watch
follows (gpo_fast.watch), in base spreads, on the validation seeds: what the watch would report for that adapter.

    python benchmarks/watch_drift.py RUN [RUN ...] [--samples 300]

RUN: a run folder of `gpo-fast train` (its config.toml and adapter/ or model/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpo_fast.components import build_evaluator, build_model, build_task
from gpo_fast.config import VALIDATION_SEED_OFFSET, load_config
from gpo_fast.evaluate import load_tuned
from gpo_fast.watch import DriftWatch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    for run in args.runs:
        config = load_config(run / "config.toml", overrides=[f"eval.samples={args.samples}"])
        task = build_task(config, cpu)
        evaluator = build_evaluator(config, task, cpu, split="val")
        seed = config.eval.seed + VALIDATION_SEED_OFFSET
        base, _ = evaluator(build_model(config, cpu, trainable=False), seed)
        tuned_model = build_model(config, cpu, trainable=False)
        load_tuned(tuned_model, run)
        tuned, _ = evaluator(tuned_model, seed)
        drift = DriftWatch(base["image_stats"], config.eval.watch_multiple).drift(tuned["image_stats"])
        print(f"{run}: accuracy {base['accuracy']:.3f} -> {tuned['accuracy']:.3f}; drift in base spreads: "
              + ", ".join(f"{name} {d:+.2f}" for name, d in drift.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
