"""Planned peak memory and FLOPs of SD3.5 Medium and Large for every --vram preset, with `gpo-fast plan`'s
planner (fake tensors on the CPU: planned, not measured on a GPU), into benchmarks/results/plan.csv and a
Markdown table on stdout (docs/memory.md, "The presets, planned"; the README shows its peaks).

    python benchmarks/plan_presets.py [--out benchmarks/results/plan.csv]

Rows: SD3.5 Medium at each --vram preset of sd35m-counting; the same step without this project's savings
(no gradient checkpointing, the whole rollout in one pass, torch AdamW) for the ratio; SD3.5 Large with LoRA on
an nf4 base (the 12 and 8 GB presets' settings).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROWS = [
    ("SD3.5 Medium", "--vram 24", 24, []),
    ("SD3.5 Medium", "--vram 16", 16, []),
    ("SD3.5 Medium", "--vram 12", 12, []),
    ("SD3.5 Medium", "--vram 8", 8, []),
    ("SD3.5 Medium", "--vram 24 without the savings", 24,
     ["train.gradient_checkpointing=false", "train.micro_batch=0", 'train.optimizer="adamw"']),
    ("SD3.5 Large", "--vram 12 (nf4, LoRA)", 12, ['model.path="stabilityai/stable-diffusion-3.5-large"']),
    ("SD3.5 Large", "--vram 8 (nf4, LoRA)", 8, ['model.path="stabilityai/stable-diffusion-3.5-large"']),
]
PHASES = ("encode", "rollout", "decode", "update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan.csv")
    args = parser.parse_args()

    from gpo_fast.config import VRAM_PRESETS, load_config
    from gpo_fast.plan import GIB, plan

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for model, setting, vram, extra in ROWS:
        config = load_config(preset="sd35m-counting", overrides=[*VRAM_PRESETS[vram], *extra])
        result = plan(config)
        row = {"model": model, "setting": setting, "peak_gib": round(result.peak_bytes / GIB, 2),
               **{f"{p}_gib": round(result.phase(p).peak_bytes / GIB, 2) for p in PHASES},
               "update_activations_gib": round(result.phase("update").holders.get("activations", 0) / GIB, 2),
               "rollout_tflop": round((result.phase("rollout").flops + result.phase("decode").flops) / 1e12, 1),
               "update_tflop": round(result.phase("update").flops / 1e12, 1),
               "plan_seconds": round(result.seconds, 1), "commit": commit}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| model | setting | encode | rollout | decode | update | peak | FLOPs per rollout / update |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['setting']} | {r['encode_gib']} | {r['rollout_gib']} | {r['decode_gib']} | "
              f"{r['update_gib']} | **{r['peak_gib']}** | {r['rollout_tflop']} T / {r['update_tflop']} T |")


if __name__ == "__main__":
    main()
