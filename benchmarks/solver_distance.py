"""How close few-step samplers come to a many-step one: DPM-Solver++(2M) against Euler at the same number of steps.

    python benchmarks/solver_distance.py [--steps 6] [--reference-steps 24] [--samples 1000]

For the shipped toy model (with the toy default's rollout guidance, 3) and a tiny random-weight SD3 built in code
(guidance 4.5), the same prompts and starting noise are sampled with 24 Euler steps (the reference) and with
`--steps` steps of each solver; the table gives the mean absolute difference of the decoded images from the
reference's (pixels in [-1, 1]) and, for the toy, the held-out counting accuracy of each sampler (the strict
counter on the evaluation's prompts and seed). Rows are appended to benchmarks/results/solver_distance.csv with
the machine, the commit and the thread count. CPU-sized: about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from toy_ablation import commit, machine  # the same machine and commit names as the toy rows (beside this file)

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["machine", "threads", "commit", "model", "cfg_scale", "samples", "solver", "steps", "reference_steps",
          "mean_abs_diff", "accuracy"]


def _images(model, prompts, noise, steps, cfg, solver):
    from gpo_fast.sampling import sample

    with torch.no_grad():
        return model.decode(sample(model, prompts, steps=steps, cfg_scale=cfg, generator=torch.Generator(),
                                   noise=noise, solver=solver)).float()


def measure(draw, cfg, samples, steps, reference_steps) -> list[dict]:
    """Each solver at `steps` against Euler at `reference_steps`; draw(steps, solver) -> (images, accuracy or "")
    draws the same prompts from the same noise every time."""
    reference, accuracy = draw(reference_steps, "euler")
    rows = [("euler", reference_steps, reference, accuracy), *((s, steps, *draw(steps, s)) for s in ("euler", "dpm++2m"))]
    return [{"cfg_scale": cfg, "samples": samples, "solver": solver, "steps": n, "reference_steps": reference_steps,
             "mean_abs_diff": round((images - reference).abs().mean().item(), 5), "accuracy": acc}
            for solver, n, images, acc in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reference-steps", type=int, default=24)
    ap.add_argument("--samples", type=int, default=1000, help="toy samples (the held-out evaluation's count)")
    ap.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "solver_distance.csv")
    args = ap.parse_args(argv)
    from gpo_fast.models.sd3 import SD3Model
    from gpo_fast.models.testing import IMAGE_SIZE, build_tiny_sd3
    from gpo_fast.toy.evaluate import evaluate_toy
    from gpo_fast.toy.model import ToyModel

    start = time.time()
    toy = ToyModel.from_pretrained().eval()

    def toy_draw(steps, solver):  # the held-out evaluation's prompts and seed, as a run measures accuracy
        with torch.no_grad():
            metrics, images = evaluate_toy(toy, n_samples=args.samples, steps=steps, cfg_scale=3.0, solver=solver)
        return images.float(), round(metrics["accuracy"], 4)

    rows = [dict(r, model="toy (shipped)") for r in measure(toy_draw, 3.0, args.samples, args.steps,
                                                            args.reference_steps)]
    with tempfile.TemporaryDirectory() as folder:
        sd3 = SD3Model.from_pretrained(str(build_tiny_sd3(Path(folder))), resolution=IMAGE_SIZE, t5="off").eval()
        prompts = ["a photo of three cats", "a sign that says garden"] * 4
        noise = torch.randn((len(prompts), *sd3.latent_shape), generator=torch.Generator().manual_seed(10_000))
        rows += [dict(r, model="tiny SD3 (random weights)") for r in measure(
            lambda steps, solver: (_images(sd3, prompts, noise, steps, 4.5, solver), ""), 4.5, len(prompts),
            args.steps, args.reference_steps)]
    meta = {"machine": machine(), "threads": torch.get_num_threads(), "commit": commit()}
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows([{**meta, **r} for r in rows])
    print(f"{meta['machine']}, {meta['threads']} threads, commit {meta['commit']}, {time.time() - start:.0f} s\n")
    print("| model | guidance | samples | sampler | mean abs. difference from Euler, "
          f"{args.reference_steps} steps | toy accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f}%" if r["accuracy"] != "" else "-"
        print(f"| {r['model']} | {r['cfg_scale']:g} | {r['samples']} | {r['solver']}, {r['steps']} steps | "
              f"{r['mean_abs_diff']:.4f} | {acc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
