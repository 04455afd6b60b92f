"""The step benchmark's code path on a tiny transformer on the CPU: it writes its rows, and gpo-fast's
step trains the same trajectory as the eager step (same optimizer in --tiny), so the losses agree."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_step_tiny_rows_and_parity(tmp_path):
    out = tmp_path / "step.csv"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--tiny", "--group-sizes", "4",
                          "--trains", "lora", "--steps", "3", "--warmup", "1", "--csv", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    for column in ("gpu", "commit", "resolution", "group_size", "base", "train", "impl", "step_ms_median",
                   "peak_alloc_gb", "peak_reserved_gb", "status"):
        assert column in rows[0]
    assert [r["impl"] for r in rows] == ["eager", "ours"] and all(r["status"] == "ok" for r in rows)
    assert all(r["resolution"] == "64" and r["group_size"] == "4" and r["train"] == "lora" for r in rows)
    assert all(float(r["step_ms_median"]) > 0 for r in rows)
    eager, ours = (float(r["loss_last"]) for r in rows)
    assert abs(eager - 0.6931472) > 1e-3  # after 3 updates the loss has left softplus(0) = ln 2
    # the same noise, the same optimizer (torch AdamW in --tiny): checkpointing, freeing the reference and the
    # fused loss (Triton, interpreted here) against float32 torch ops change the float rounding only
    assert abs(ours - eager) <= 1e-3 * abs(eager)


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the benchmark runs")
def test_bench_step_without_a_gpu_says_so_and_exits_0(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--csv", str(tmp_path / "s.csv")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "needs a CUDA GPU" in run.stdout and not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_bench_rollout_tiny_matches_the_pipeline(tmp_path):
    out = tmp_path / "rollout.csv"
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics")}  # the detector from its yaml, offline
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_rollout.py"), "--tiny", "--steps", "2",
                          "--repeats", "1", "--group-size", "2", "--prompts", "2", "--csv", str(out)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["output"], r["impl"]) for r in rows] == [("latent", "pipeline"), ("latent", "ours"),
                                                        ("images", "pipeline"), ("images", "ours"),
                                                        ("scored", "ours-serial"), ("scored", "ours-overlap")]
    assert float(rows[4]["max_abs_diff"]) == 0.0  # overlapping the scoring changes no reward
    assert all(float(r["images_per_s"]) > 0 and r["group_size"] == "2" and r["steps"] == "2" for r in rows)
    # the same components, noise, steps and guidance: the trainer's sampler draws the pipeline's latents, and
    # its decoded rollout images are the pipeline's "pt" images
    assert float(rows[0]["max_abs_diff"]) == 0.0
    assert float(rows[2]["max_abs_diff"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the benchmark runs")
def test_bench_rollout_without_a_gpu_says_so_and_exits_0(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_rollout.py"), "--csv", str(tmp_path / "r.csv")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "needs a CUDA GPU" in run.stdout and not (tmp_path / "r.csv").exists()


@pytest.mark.slow
def test_the_planned_peak_beside_a_gpu_row_is_the_planners():
    """What gpu_check.sh puts beside each measured row: the planner's update peak for that row, without the VAE;
    an nf4 base plans below a bf16 one by most of the transformer's weights."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    bf16 = float(bench_step.planned_update_gb(256, 2, "bf16", "lora", 0))
    nf4 = float(bench_step.planned_update_gb(256, 2, "nf4", "lora", 0))
    assert 4.5 < bf16 < 8 and bf16 - nf4 > 2.5  # SD3.5-M: 4.2 GiB of bf16 weights, 1.2 in nf4
    assert bench_step.ratio({"peak_alloc_gb": "6.0", "planned_gb": "5.0"}) == "1.200"
    assert bench_step.ratio({"peak_alloc_gb": "", "planned_gb": "5.0"}) == "-"
