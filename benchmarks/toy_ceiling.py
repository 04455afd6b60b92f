"""How close trained toy runs come to their base model's own training data, prompt by prompt.

The toy base model learned from captions that name the wrong count (n - 1 or n + 1) a fraction `caption_noise`
of the time (its manifest, gpo_fast/toy/weights/model.json). A model that drew, for a prompt, exactly the images
its captions were written for would count right as often as the caption is right: P(count = n | caption n),
`gpo_fast.toy.pretrain.caption_posterior`. This prints that beside the base's held-out accuracy and the trained
runs' (each run's summary.json, `accuracy_per_n`), per prompt and on average, as a Markdown table.

    python benchmarks/toy_ceiling.py RUN [RUN ...]

RUN: a run folder of `gpo-fast train` on the toy world (its summary.json), e.g. the folders
`python benchmarks/toy_ablation.py --objectives gpo-per-member` writes under runs/toy-ablation/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from gpo_fast.toy.data import MAX_DOTS, prompt_for
from gpo_fast.toy.model import SHIPPED
from gpo_fast.toy.pretrain import caption_posterior


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    summaries = []
    for run in args.runs:
        path = run / "summary.json"
        if not path.is_file():
            print(f"error: {path} does not exist; pass run folders of a finished `gpo-fast train`.", file=sys.stderr)
            return 2
        summary = json.loads(path.read_text())
        if "accuracy_per_n" not in summary.get("eval_after", {}):
            print(f"error: {path} has no per-prompt accuracy (eval_after.accuracy_per_n); is it a toy-world run?",
                  file=sys.stderr)
            return 2
        summaries.append(summary)
    noise = json.loads((SHIPPED / "model.json").read_text())["pretrain"]["caption_noise"]
    right = caption_posterior(noise).diagonal().tolist()
    before = summaries[0]["eval_before"]["accuracy_per_n"]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{100 * values[0]:.1f}%"
        return f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"

    print(f"caption_noise {noise}; {len(summaries)} run(s)\n")
    print("| prompt | its captions right (the data) | base model | trained: mean (min-max) | trained / data |")
    print("|---|---|---|---|---|")
    after_means = []
    for n in range(1, MAX_DOTS + 1):
        after = [s["eval_after"]["accuracy_per_n"][str(n)] for s in summaries]
        after_means.append(statistics.mean(after))
        print(f"| {prompt_for(n)} | {100 * right[n - 1]:.1f}% | {100 * before[str(n)]:.1f}% | {cell(after)} | "
              f"{after_means[-1] / right[n - 1]:.2f} |")
    data, trained = statistics.mean(right), statistics.mean(after_means)
    base = statistics.mean(before[str(n)] for n in range(1, MAX_DOTS + 1))
    print(f"| **mean of the {MAX_DOTS} prompts** | {100 * data:.1f}% | {100 * base:.1f}% | {100 * trained:.1f}% | "
          f"{trained / data:.2f} |")
    print(f"\ngain so far: {100 * (trained - base):+.1f} points; a model that drew its data: {100 * (data - base):+.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
