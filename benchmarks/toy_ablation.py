"""The paper's comparison in miniature: gpo, gpo-pairs, dpo (and gpo with beta per member) on the toy world, same
budget, seeds 0-4 each.

Each run is `gpo-fast train` with the toy preset at the budget of BASE below and one objective; rows are appended to
benchmarks/results/toy.csv (machine, commit, objective, seed, accuracy before/after, gain, wall time)
and a table of mean and spread per objective is printed (Markdown, for docs/results/toy.md).

--task graded trains on the graded reward instead (reward.partial_credit: 1 - |count - n| / n, so rewards
inside a group differ by small steps and many best-vs-worst pairs differ marginally, where the paper says
GPO and DPO part); accuracy stays the strict count. Its rows go to benchmarks/results/toy_graded.csv.
--summarize prints the table of the rows already in the CSV (this machine's), running nothing.

--change tunes: each run adds the --set overrides to the setting, and its row goes to
benchmarks/results/toy_tuning.csv with the change named in its first column (kept or not, every tried
setting is recorded); --summarize --change "..." prints that change's table, --summarize --csv benchmarks/results/toy_tuning.csv
every change's.

    python benchmarks/toy_ablation.py                       # 4 settings x 5 seeds, ~80 min on 2 cores
    python benchmarks/toy_ablation.py --objectives gpo --seeds 0
    python benchmarks/toy_ablation.py --task graded
    python benchmarks/toy_ablation.py --task graded --summarize
    python benchmarks/toy_ablation.py --objectives gpo-per-member --change cosine --set train.lr_schedule=cosine

--compute runs the rows of COMPUTE below (the default toy preset, then cheaper rollouts) and writes them to
benchmarks/results/toy_compute.csv with their FLOPs and the tuned model's gain evaluated both with guidance
(eval.cfg_scale = 2, the toy default's) and without (1), whichever the row's own evaluation is:

    python benchmarks/toy_ablation.py --compute default no-guidance --seeds 0 1 2 3 4
    python benchmarks/toy_ablation.py --compute all --summarize
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
TUNING_CSV = RESULTS / "toy_tuning.csv"
COMPUTE_CSV = RESULTS / "toy_compute.csv"
FIELDS = ["machine", "threads", "commit", "objective", "seed", "accuracy_before", "accuracy_after", "gain",
          "gain_ci95_low", "gain_ci95_high", "blank_before", "blank_after", "best_rollout", "rollouts",
          "wall_seconds", "train_tflops", "rollout_tflops"]
# train_tflops / rollout_tflops: the run's training compute and its sampling part (summary.json, "flops"); CSVs
# written before runs counted their FLOPs keep their columns (rows appended to them leave these two out)


# a setting: the config keys it changes from the default toy preset (every key the settings differ in is
# written out, so a row means the same whatever the default is)
SETTINGS = {
    "gpo": ['train.objective="gpo"', "train.beta_per_member=false"],
    "gpo-pairs": ['train.objective="gpo-pairs"', "train.beta_per_member=false"],
    "dpo": ['train.objective="dpo"', "train.beta_per_member=false"],
    "gpo-per-member": ['train.objective="gpo"', "train.beta_per_member=true"],  # beta / G
}

# the budget every row in the three CSVs ran at (the toy preset before its tuned default, with the frozen base
# as the reference and the strict 0/1 reward): a --change names its keys against this base, so old and new rows
# mean the same
BASE = ["train.lr=3e-3", "train.rollouts=60", "rollout.cfg_scale=2", "rollout.steps=8", "train.reference_decay=0",
        "train.ema_decay=0", "reward.partial_credit=false"]
# the toy preset is this setting and change on BASE (tests/test_bench.py holds them equal)
DEFAULT = ("gpo-per-member",
           "train.lr=1.5e-3 train.rollouts=100 rollout.cfg_scale=1 eval.cfg_scale=1 rollout.steps=12 "
           "train.reference_decay=0.95 train.ema_decay=0.98 reward.partial_credit=true")
# the default the compute rows below were measured on (the toy preset until they chose guidance-free rollouts)
COMPUTE_BASE = ("gpo-per-member",
                "train.lr=1.5e-3 train.rollouts=100 rollout.cfg_scale=3 rollout.steps=12 train.reference_decay=0.95 "
                "train.ema_decay=0.98 reward.partial_credit=true")

# the compute rows (half the compute for the same gain?): each is COMPUTE_BASE above (the toy default when they
# ran: guidance 3, 12 Euler steps) plus these keys; "no-guidance" is the toy default now. Without guidance the run also validates and evaluates without it (eval.cfg_scale = 1), as a user of that
# mode would; every row's tuned model is evaluated both ways besides (GUIDED, UNGUIDED)
NO_CFG = ["rollout.cfg_scale=1", "eval.cfg_scale=1"]
DPM6 = ['rollout.solver="dpm++2m"', "rollout.steps=6"]
COMPUTE = {
    "default": [],
    "no-guidance": NO_CFG,
    "dpm++2m-6": DPM6,
    "no-guidance+dpm++2m-6": [*NO_CFG, *DPM6],
    "no-guidance+dpm++2m-6+sigma_min=0.3": [*NO_CFG, *DPM6, "train.sigma_min=0.3"],
    "rollouts=40": ["train.rollouts=40"],
}
GUIDED, UNGUIDED = 2.0, 1.0  # the evaluation's guidance scales of the compute rows' two gains
COMPUTE_FIELDS = ["change", "overrides", *FIELDS, "eval_cfg_scale", "accuracy_before_guided", "accuracy_after_guided",
                  "gain_guided", "accuracy_before_unguided", "accuracy_after_unguided", "gain_unguided"]

# a task: the reward the runs train on (accuracy is always the strict count), and where the results go
TASKS = {
    "strict": {"overrides": [], "csv": "toy.csv", "runs": "runs/toy-ablation"},
    "graded": {"overrides": ["reward.partial_credit=true"], "csv": "toy_graded.csv", "runs": "runs/toy-graded"},
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


def mean_interval(values: list[float]) -> str:
    """The 95% interval of a mean over seeds (Student's t on the seeds' spread), as [lo, hi]."""
    if len(values) < 2:
        return "[-]"
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    m = statistics.mean(values)
    return f"[{m - half:+.1f}, {m + half:+.1f}]"


def _mean_of(rows: list[dict], key: str, spec: str) -> str:
    """The mean of a column over rows, or '-' where a row predates it."""
    values = [r.get(key) for r in rows]
    return format(statistics.mean(float(v) for v in values), spec) if all(values) else "-"


def evaluated_both_ways(cfg, overrides: list[str], s: dict, out: Path) -> dict:
    """The kept model's held-out accuracy, before and after, with guidance (GUIDED) and without (UNGUIDED): the
    run's own evaluation for its eval.cfg_scale, `gpo-fast eval` of the run folder for the other."""
    from gpo_fast.tuned import run_eval

    row = {"eval_cfg_scale": cfg.eval.cfg_scale}
    for name, scale in (("guided", GUIDED), ("unguided", UNGUIDED)):
        if scale == cfg.eval.cfg_scale:
            before, after = s["accuracy_before"], s["accuracy_after"]
        else:
            other = load_config(overrides=[*overrides, f"eval.cfg_scale={scale}"])
            report = run_eval(other, out, out / f"eval-cfg{scale:g}", log=lambda *a: None)
            before, after = report["base"]["accuracy"], report["tuned"]["accuracy"]
        row.update({f"accuracy_before_{name}": f"{before:.4f}", f"accuracy_after_{name}": f"{after:.4f}",
                    f"gain_{name}": f"{after - before:.4f}"})
    return row


def compute_table(rows: list[dict]) -> str:
    """The compute rows: FLOPs beside the gain, and the gain evaluated with and without guidance."""
    lines = ["| row | seeds | rollout TFLOP | training TFLOP | gain, points: mean [95% CI] (min, max) | "
             "gain with guidance (eval cfg 2) | gain without (eval cfg 1) | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["change"] for r in rows):
        rs = [r for r in rows if r["change"] == name]
        gains = [100 * float(r["gain"]) for r in rs]
        both = [f"{statistics.mean(100 * float(r[k]) for r in rs):+.1f} "
                f"{mean_interval([100 * float(r[k]) for r in rs])}" for k in ("gain_guided", "gain_unguided")]
        lines.append(
            f"| {name} | {len(rs)} | {_mean_of(rs, 'rollout_tflops', '.2f')} | {_mean_of(rs, 'train_tflops', '.2f')} | "
            f"{statistics.mean(gains):+.1f} {mean_interval(gains)} ({min(gains):+.1f}, {max(gains):+.1f}) | "
            f"{both[0]} | {both[1]} | {statistics.mean(float(r['wall_seconds']) for r in rs):.0f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Mean and spread per setting: per objective, or per (change, objective) for tuning rows."""
    def setting(r: dict) -> str:
        return f"{r['objective']}, {r['change']}" if r.get("change") else r["objective"]

    lines = ["| setting | seeds | accuracy before | accuracy after | gain, points: mean [95% CI of the mean] "
             "(min, max) | training TFLOP, mean | wall s, mean |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(setting(r) for r in rows):
        rs = [r for r in rows if setting(r) == name]
        gains = [100 * float(r["gain"]) for r in rs]
        lines.append(
            f"| {name} | {len(rs)} | {statistics.mean(float(r['accuracy_before']) for r in rs):.3f} | "
            f"{statistics.mean(float(r['accuracy_after']) for r in rs):.3f} | "
            f"{statistics.mean(gains):+.1f} {mean_interval(gains)} ({min(gains):+.1f}, {max(gains):+.1f}) | "
            f"{_mean_of(rs, 'train_tflops', '.2f')} | {statistics.mean(float(r['wall_seconds']) for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objectives", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                    help="settings to run (objective, or gpo-per-member: gpo with train.beta_per_member)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--task", choices=list(TASKS), default="strict",
                    help="strict: the default 0/1 count reward; graded: partial credit by distance")
    ap.add_argument("--runs", type=Path, help="where the run folders go (default runs/toy-ablation or runs/toy-graded)")
    ap.add_argument("--csv", type=Path, help="default benchmarks/results/toy.csv, or toy_graded.csv for --task graded")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--summarize", action="store_true", help="print the table of the CSV's rows on this machine")
    ap.add_argument("--compute", nargs="+", choices=[*COMPUTE, "all"],
                    help="run (or with --summarize, print) these compute rows: the default and cheaper rollouts, "
                         "rows to benchmarks/results/toy_compute.csv, runs to runs/toy-compute/ROW")
    ap.add_argument("--change", help="a tuning run: name the change the --set overrides make; rows go to "
                                     "benchmarks/results/toy_tuning.csv, runs to runs/toy-tuning/CHANGE")
    args = ap.parse_args(argv)
    if args.compute:
        return compute(args)
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in args.change or "")
    args.csv = args.csv or (TUNING_CSV if args.change else RESULTS / TASKS[args.task]["csv"])
    args.runs = args.runs or (Path("runs/toy-tuning") / tag if args.change else Path(TASKS[args.task]["runs"]))
    fields = ["change", *FIELDS] if args.change else FIELDS
    meta = dict(machine=machine(), threads=torch.get_num_threads(), commit=commit())
    if args.summarize:
        if not args.csv.exists():
            print(f"{args.csv} does not exist yet: run the ablation first")
            return 1
        done = [r for r in csv.DictReader(args.csv.open()) if r["machine"] == meta["machine"]
                and r["objective"] in args.objectives and int(r["seed"]) in args.seeds
                and (args.change is None or r.get("change") == args.change)]
        print(f"{meta['machine']}: {len(done)} rows of {args.csv.name}, commits "
              f"{', '.join(dict.fromkeys(r['commit'] for r in done))}, threads "
              f"{', '.join(dict.fromkeys(r['threads'] for r in done))}\n")
        print(table(sorted(done, key=lambda r: args.objectives.index(r["objective"]))))
        return 0
    rows = []
    for objective in args.objectives:
        for seed in args.seeds:
            out = args.runs / f"{objective}-seed{seed}"
            cfg = load_config(overrides=[*BASE, *SETTINGS[objective], *TASKS[args.task]["overrides"],
                                         f"seed={seed}", f'out="{out}"', *args.overrides])
            s = train(cfg, log=lambda *a: None).summary
            row = dict({"change": args.change} if args.change else {}, **meta, objective=objective, seed=seed,
                       accuracy_before=f"{s['accuracy_before']:.4f}", accuracy_after=f"{s['accuracy_after']:.4f}", gain=f"{s['gain']:.4f}",
                       gain_ci95_low=f"{s['gain_ci95'][0]:.4f}", gain_ci95_high=f"{s['gain_ci95'][1]:.4f}",
                       blank_before=f"{s['blank_before']:.4f}", blank_after=f"{s['blank_after']:.4f}",
                       best_rollout=s["best_rollout"], rollouts=s["rollouts"], wall_seconds=f"{s['wall_seconds']:.0f}",
                       train_tflops=f"{s['flops']['train'] / 1e12:.3f}",
                       rollout_tflops=f"{s['flops']['rollout'] / 1e12:.3f}")
            rows.append(row)
            print(f"{objective:9s} seed {seed}: {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} "
                  f"({100 * s['gain']:+.1f} points) in {s['wall_seconds']:.0f} s", flush=True)
            append_row(args.csv, fields, row)
    print(f"\n{meta['machine']}, {meta['threads']} threads, commit {meta['commit']}\n")
    print(table(rows))
    return 0


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """Append a row to a CSV at once (a run cut short keeps the rows before it): the header `fields` when the file
    is new, else the file's own header (an older CSV keeps its columns; the row's other keys are left out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if new:
        header = fields
    else:
        with path.open() as existing:
            header = next(csv.reader(existing))
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def compute(args) -> int:
    """--compute: the rows of COMPUTE, gpo-per-member on the default, over the seeds."""
    names = list(COMPUTE) if "all" in args.compute else args.compute
    path = args.csv or COMPUTE_CSV
    meta = dict(machine=machine(), threads=torch.get_num_threads(), commit=commit())
    if args.summarize:
        done = [r for r in csv.DictReader(path.open()) if r["machine"] == meta["machine"] and r["change"] in names
                and int(r["seed"]) in args.seeds] if path.exists() else []
        if not done:
            print(f"{path} holds no rows of these settings on this machine yet: run them first")
            return 1
        done.sort(key=lambda r: names.index(r["change"]))
        print(f"{meta['machine']}: {len(done)} rows of {path.name}, commits "
              f"{', '.join(dict.fromkeys(r['commit'] for r in done))}, threads "
              f"{', '.join(dict.fromkeys(r['threads'] for r in done))}\n")
        print(compute_table(done))
        return 0
    setting, default = COMPUTE_BASE
    rows = []
    for name in names:
        for seed in args.seeds:
            out = (args.runs or Path("runs/toy-compute")) / name / f"seed{seed}"
            keys = [*default.split(), *COMPUTE[name], *args.overrides]
            overrides = [*BASE, *SETTINGS[setting], *keys, f"seed={seed}", f'out="{out}"']
            cfg = load_config(overrides=overrides)
            s = train(cfg, log=lambda *a: None).summary
            row = dict(change=name, overrides=" ".join(COMPUTE[name] + args.overrides), **meta, objective=setting,
                       seed=seed, accuracy_before=f"{s['accuracy_before']:.4f}",
                       accuracy_after=f"{s['accuracy_after']:.4f}", gain=f"{s['gain']:.4f}",
                       gain_ci95_low=f"{s['gain_ci95'][0]:.4f}", gain_ci95_high=f"{s['gain_ci95'][1]:.4f}",
                       blank_before=f"{s['blank_before']:.4f}", blank_after=f"{s['blank_after']:.4f}",
                       best_rollout=s["best_rollout"], rollouts=s["rollouts"], wall_seconds=f"{s['wall_seconds']:.0f}",
                       train_tflops=f"{s['flops']['train'] / 1e12:.3f}",
                       rollout_tflops=f"{s['flops']['rollout'] / 1e12:.3f}", **evaluated_both_ways(cfg, overrides, s, out))
            rows.append(row)
            print(f"{name} seed {seed}: {100 * float(row['gain']):+.1f} points (guided {100 * float(row['gain_guided']):+.1f}, "
                  f"unguided {100 * float(row['gain_unguided']):+.1f}), {row['train_tflops']} TFLOP, "
                  f"{row['wall_seconds']} s", flush=True)
            append_row(path, COMPUTE_FIELDS, row)
    print(f"\n{meta['machine']}, {meta['threads']} threads, commit {meta['commit']}\n")
    print(compute_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
