"""The kernel benchmark's CPU behaviour and its summary arithmetic (the timings themselves need a GPU)."""

import csv
import os
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gpo_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_without_a_gpu_it_says_so_and_exits_zero(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert "needs a CUDA GPU" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def _rows():
    rows = []
    for n, (t, e, c) in {8: (1.0, 8.0, 1.5), 64: (2.0, 10.0, 2.0)}.items():
        for prov, ms in (("triton", t), ("eager", e), ("compile", c)):
            for mode in ("forward", "backward", "full"):
                rows.append(dict(gpu="Test GPU", torch="x", triton="y", commit="abc", provider=prov, objective="gpo",
                                 mode=mode, N=n, C=16, H=128, W=128, dtype="bfloat16", median_ms=str(ms),
                                 p20_ms=str(ms), p80_ms=str(ms), peak_mb="1", gbps="1", frac_copy_bw="0.810"))
    return rows


def test_summary_reports_median_and_worst_speedup():
    text = bench.summarize(_rows(), copy_bw=3000.0)
    # vs eager: 8x and 5x -> median 6.5x, min 5x; vs compile: 1.5x and 1.0x -> median 1.25x, min 1.0x
    assert "| gpo | bfloat16 | 6.50x (5.00x) | 1.25x (1.00x) |" in text
    assert "- gpo bfloat16: 0.81" in text
    assert "3000 GB/s" in text


def test_plots_are_written(tmp_path):
    bench.plot(_rows(), tmp_path, "Test-GPU")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernels-backward-Test-GPU.png", "kernels-forward-Test-GPU.png", "kernels-full-Test-GPU.png"]


def test_the_sweep_measures_the_default_objective_in_bf16_first():
    """A --budget-s cut keeps the headline shapes: gpo bf16 at both resolutions, then gpo float32."""
    import torch

    shapes = bench.sweep(quick=False)
    assert len(shapes) == len(set(shapes)) == 3 * 2 * 2 * 4
    assert {s[:2] for s in shapes[:8]} == {("gpo", torch.bfloat16)}
    assert {s[2] for s in shapes[:8]} == {64, 128} and (("gpo", torch.bfloat16, 128, 64) in shapes[:8])
    assert {s[:2] for s in shapes[8:16]} == {("gpo", torch.float32)}
    assert bench.sweep(quick=True) == [("gpo", torch.bfloat16, 64, n) for n in (8, 16, 32, 64)]


def test_the_summary_survives_a_provider_that_failed():
    rows = [r for r in _rows() if not (r["provider"] == "compile" and r["N"] == 8)]
    text = bench.summarize(rows, copy_bw=3000.0)
    assert "| gpo | bfloat16 | 6.50x (5.00x) | 1.00x (1.00x) |" in text  # compile: only N=64 left
    text = bench.summarize([r for r in _rows() if r["provider"] != "compile"], copy_bw=3000.0)
    assert "| gpo | bfloat16 | 6.50x (5.00x) | not measured |" in text


def test_the_compiled_baseline_allows_the_backward_only_mode():
    """measure() times `loss.backward(retain_graph=True)`; torch.compile's donated buffers (torch >= 2.6)
    refuse that unless configure_compile() turned them off. Same sequence as measure(), on the CPU."""
    import torch

    bench.configure_compile()
    fn = bench.make_providers("gpo")["compile"]
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 16, 8, 8, generator=g).bfloat16()
    pred = (target + 0.1 * torch.randn(8, 16, 8, 8, generator=g).bfloat16()).requires_grad_(True)
    ref = target + 0.1 * torch.randn(8, 16, 8, 8, generator=g).bfloat16()
    rewards = torch.randn(8, generator=g)
    fn(pred, ref, target, rewards)  # the forward-only mode runs first
    loss = fn(pred, ref, target, rewards)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    eager = bench.make_providers("gpo")["eager"](pred, ref, target, rewards)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def _toy_ablation():
    spec = importlib.util.spec_from_file_location("toy_ablation", ROOT / "benchmarks" / "toy_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_toy_ablation_summarizes_its_csv_by_objective_with_the_interval_of_the_mean(tmp_path, capsys):
    ablation = _toy_ablation()
    rows = [dict(machine=ablation.machine(), threads="1", commit="abc1234", objective=o, seed=str(s),
                 accuracy_before="0.2730", accuracy_after=f"{0.273 + g:.4f}", gain=f"{g:.4f}", gain_ci95_low="0",
                 gain_ci95_high="0", blank_before="0.1", blank_after="0.1", best_rollout="20", rollouts="60",
                 wall_seconds="200")
            for o, gains in (("dpo", [0.10, 0.12, 0.14]), ("gpo", [0.20, 0.20, 0.26])) for s, g in enumerate(gains)]
    for r, tflops in zip(rows[3:], ("8.0", "8.2", "8.1")):  # gpo's rows counted their compute, dpo's predate it
        r["train_tflops"] = tflops
    path = tmp_path / "t.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ablation.FIELDS)
        w.writeheader()
        w.writerows(rows + [dict(rows[0], machine="elsewhere", gain="0.9")])  # another machine: left out
    assert ablation.main(["--csv", str(path), "--summarize", "--objectives", "gpo", "dpo"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| gpo") or line.startswith("| dpo")]
    assert lines[0].startswith("| gpo | 3 |") and lines[1].startswith("| dpo | 3 |")  # in the order asked
    # gpo: mean +22.0, sd 3.46, t(0.975, 2) = 4.303: half-width 8.6
    assert "+22.0 [+13.4, +30.6] (+20.0, +26.0)" in lines[0] and "+12.0 [+7.0, +17.0] (+10.0, +14.0)" in lines[1]
    assert lines[0].endswith("| 8.10 | 200 |") and lines[1].endswith("| - | 200 |")  # mean training TFLOP
    assert ablation.mean_interval([1.0]) == "[-]"


def test_the_toy_default_is_the_ablation_row_it_was_chosen_by():
    ablation = _toy_ablation()
    setting, change = ablation.DEFAULT
    chosen = load_config(overrides=[*ablation.BASE, *ablation.SETTINGS[setting], *change.split()])
    assert chosen.model_dump() == load_config().model_dump()
    # and the rows' base is not the default: without the change the ablation runs something else
    assert load_config(overrides=[*ablation.BASE, *ablation.SETTINGS[setting]]).model_dump() != chosen.model_dump()
    # the compute rows chose it: their base plus the guidance-free row's keys is the default, their base is not
    setting, base = ablation.COMPUTE_BASE
    rows_base = [*ablation.BASE, *ablation.SETTINGS[setting], *base.split()]
    assert load_config(overrides=[*rows_base, *ablation.COMPUTE["no-guidance"]]).model_dump() == chosen.model_dump()
    assert load_config(overrides=rows_base).model_dump() != chosen.model_dump()


def test_the_toy_ablation_summarizes_one_tuning_change_from_its_csv(tmp_path, capsys):
    ablation = _toy_ablation()
    base = dict(machine=ablation.machine(), threads="1", commit="abc1234", objective="gpo-per-member",
                accuracy_before="0.2730", gain_ci95_low="0", gain_ci95_high="0", blank_before="0.1",
                blank_after="0.1", best_rollout="20", rollouts="60", wall_seconds="200")
    rows = [dict(base, change=c, seed=str(s), accuracy_after=f"{0.273 + g:.4f}", gain=f"{g:.4f}")
            for c, gains in (("train.lr=1e-3", [0.10, 0.20]), ("rollout.steps=12", [0.30, 0.30]))
            for s, g in enumerate(gains)]
    path = tmp_path / "tuning.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["change", *ablation.FIELDS])
        w.writeheader()
        w.writerows(rows)
    assert ablation.main(["--csv", str(path), "--summarize", "--change", "train.lr=1e-3",
                          "--objectives", "gpo-per-member"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| gpo-per-member"))
    assert line.startswith("| gpo-per-member, train.lr=1e-3 | 2 |") and "+15.0" in line  # that change's rows
    assert ablation.main(["--csv", str(path), "--summarize", "--objectives", "gpo-per-member"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| gpo-per-member")]
    assert [x.split(" | ")[0:2] for x in lines] == [["| gpo-per-member, train.lr=1e-3", "2"],
                                                    ["| gpo-per-member, rollout.steps=12", "2"]]  # one per change


def _toy_summary(before: list[float], after: list[float]) -> dict:
    return {"eval_before": {"accuracy_per_n": {str(n): a for n, a in enumerate(before, 1)}},
            "eval_after": {"accuracy_per_n": {str(n): a for n, a in enumerate(after, 1)}}}


def test_the_toy_ceiling_puts_each_prompt_beside_its_captions(tmp_path, capsys):
    import json

    spec = importlib.util.spec_from_file_location("toy_ceiling", ROOT / "benchmarks" / "toy_ceiling.py")
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    before = [0.3, 0.1, 0.2, 0.3, 0.3]
    for i, five in enumerate((0.2, 0.4)):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "summary.json").write_text(json.dumps(_toy_summary(before, [0.6, 0.4, 0.5, 0.4, five])))
    assert ceiling.main([str(tmp_path / "r0"), str(tmp_path / "r1")]) == 0
    out = capsys.readouterr().out
    # the shipped model's captions (noise 0.5): right 2/3 at the ends, 2/5 for two and four, 1/2 for three
    assert "| five dots | 66.7% | 30.0% | 30.0% (20.0-40.0) | 0.45 |" in out
    assert "| two dots | 40.0% | 10.0% | 40.0% (40.0-40.0) | 1.00 |" in out
    assert "| **mean of the 5 prompts** | 52.7% | 24.0% | 44.0% | 0.84 |" in out
    (tmp_path / "empty").mkdir()
    assert ceiling.main([str(tmp_path / "empty")]) == 2
    assert "summary.json does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_check_never_runs_past_its_limit_and_says_what_it_skipped(tmp_path):
    """benchmarks/gpu_check.sh with a stand-in python whose every step hangs: the first step is cut at the
    limit, the rest are skipped and named, the status is 1, and the script ends within its limit."""
    import subprocess
    import time

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$1" in -m) [ "$2" = pip ] && exit 0;; -c) exit 0;; esac\nsleep 60\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake), "GPU_CHECK_LIMIT_S": "14", "OUT": str(tmp_path)})
    took = time.monotonic() - t0
    log = (tmp_path / "gpu_check.log").read_text()
    assert out.returncode == 1 and took < 20
    assert "== parity tests on CUDA (at most" in log
    for later in ("step benchmark", "cuda-marked tests", "rollout benchmark", "kernel benchmark", "compiled denoiser"):
        assert f"== {later}" in log and "skipped, the 14 s limit is reached" in log.split(f"== {later}")[1].splitlines()[0]
    assert "gpu_check done" in log
