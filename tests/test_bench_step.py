"""The step benchmark's code path on a tiny transformer on the CPU: it writes its rows, and gpo-fast's
step trains the same trajectory as the eager step (same optimizer in --tiny), so the losses agree."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_step_tiny_rows_and_parity(tmp_path):
    out = tmp_path / "step.csv"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--tiny", "--group-sizes", "4",
                          "--trains", "lora", "--steps", "3", "--warmup", "1", "--csv", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["impl"] for r in rows] == ["eager", "ours"] and all(r["status"] == "ok" for r in rows)
    eager, ours = (float(r["loss_last"]) for r in rows)
    assert abs(eager - 0.6931472) > 1e-4  # after 3 updates the loss has left softplus(0) = ln 2
    # checkpointing and the fused loss are the same math; the loss is exp(beta * z) small here, so float
    # differences in z of ~1e-6 show as ~0.2% in it
    assert abs(ours - eager) <= 1e-2 * abs(eager)


def test_bench_step_without_a_gpu_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--csv", str(tmp_path / "s.csv")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "needs a CUDA GPU" in run.stdout and not (tmp_path / "s.csv").exists()


def test_bench_rollout_tiny_matches_the_pipeline(tmp_path):
    out = tmp_path / "rollout.csv"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_rollout.py"), "--tiny", "--steps", "2",
                          "--repeats", "1", "--group-size", "2", "--csv", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["impl"] for r in rows] == ["pipeline", "ours"] and float(rows[1]["images_per_s"]) > 0
    assert float(rows[0]["max_abs_diff"]) == 0.0  # the trainer's sampler draws the pipeline's latents
