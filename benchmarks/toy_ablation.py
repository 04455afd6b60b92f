"""The paper's comparison in miniature: gpo, gpo-pairs, dpo (and gpo with beta per member) on the toy world, same
budget, 3 seeds each.

Each run is `gpo-fast train` with the default (toy) preset and one objective; rows are appended to
benchmarks/results/toy.csv (machine, commit, objective, seed, accuracy before/after, gain, wall time)
and a table of mean and spread per objective is printed (Markdown, for the README).

    python benchmarks/toy_ablation.py                       # 4 settings x 3 seeds, ~1 h on 2 cores
    python benchmarks/toy_ablation.py --objectives gpo --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from gpo_fast.config import load_config
from gpo_fast.train import train

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["machine", "threads", "commit", "objective", "seed", "accuracy_before", "accuracy_after", "gain",
          "gain_ci95_low", "gain_ci95_high", "blank_before", "blank_after", "best_rollout", "rollouts",
          "wall_seconds"]


# a setting: the config keys it changes from the default toy preset
SETTINGS = {
    "gpo": ['train.objective="gpo"'],
    "gpo-pairs": ['train.objective="gpo-pairs"'],
    "dpo": ['train.objective="dpo"'],
    "gpo-per-member": ['train.objective="gpo"', "train.beta_per_member=true"],  # beta / G
}


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows: list[dict]) -> str:
    lines = ["| objective | seeds | accuracy before | accuracy after | gain, points: mean (min, max) | wall s, mean |",
             "|---|---|---|---|---|---|"]
    for objective in dict.fromkeys(r["objective"] for r in rows):
        rs = [r for r in rows if r["objective"] == objective]
        gains = [100 * float(r["gain"]) for r in rs]
        lines.append(
            f"| {objective} | {len(rs)} | {statistics.mean(float(r['accuracy_before']) for r in rs):.3f} | "
            f"{statistics.mean(float(r['accuracy_after']) for r in rs):.3f} | "
            f"{statistics.mean(gains):+.1f} ({min(gains):+.1f}, {max(gains):+.1f}) | "
            f"{statistics.mean(float(r['wall_seconds']) for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objectives", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                    help="settings to run (objective, or gpo-per-member: gpo with train.beta_per_member)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("runs/toy-ablation"), help="where the run folders go")
    ap.add_argument("--csv", type=Path, default=RESULTS / "toy.csv")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = ap.parse_args(argv)
    meta = dict(machine=machine(), threads=torch.get_num_threads(), commit=commit())
    rows = []
    for objective in args.objectives:
        for seed in args.seeds:
            out = args.runs / f"{objective}-seed{seed}"
            cfg = load_config(overrides=[*SETTINGS[objective], f"seed={seed}", f'out="{out}"', *args.overrides])
            s = train(cfg, log=lambda *a: None).summary
            row = dict(meta, objective=objective, seed=seed, accuracy_before=f"{s['accuracy_before']:.4f}",
                       accuracy_after=f"{s['accuracy_after']:.4f}", gain=f"{s['gain']:.4f}",
                       gain_ci95_low=f"{s['gain_ci95'][0]:.4f}", gain_ci95_high=f"{s['gain_ci95'][1]:.4f}",
                       blank_before=f"{s['blank_before']:.4f}", blank_after=f"{s['blank_after']:.4f}",
                       best_rollout=s["best_rollout"], rollouts=s["rollouts"], wall_seconds=f"{s['wall_seconds']:.0f}")
            rows.append(row)
            print(f"{objective:9s} seed {seed}: {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} "
                  f"({100 * s['gain']:+.1f} points) in {s['wall_seconds']:.0f} s", flush=True)
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            new = not args.csv.exists()
            with args.csv.open("a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)
    print(f"\n{meta['machine']}, {meta['threads']} threads, commit {meta['commit']}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
