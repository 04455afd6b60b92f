"""Reporting (gpo_fast.report): the gain interval, atomic writes, grids and plots that open."""

import json

import pytest
import torch
from PIL import Image

from gpo_fast.report import (describe_gain, gain_interval, save_accuracy_bars, save_before_after, save_grid,
                             save_reward_curve, write_atomic, write_json)


def test_gain_interval_by_hand():
    before, after = {"accuracy": 0.3, "accuracy_stderr": 0.03}, {"accuracy": 0.5, "accuracy_stderr": 0.04}
    out = gain_interval(before, after)
    assert out["gain"] == pytest.approx(0.2)
    assert out["gain_ci95"] == pytest.approx([0.2 - 1.96 * 0.05, 0.2 + 1.96 * 0.05])
    assert describe_gain(out) == "gain +20.0 points, 95% CI [+10.2, +29.8]"


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    write_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_grids_are_ten_wide_and_tiny_images_are_upscaled(tmp_path):
    images = torch.rand(23, 1, 16, 16) * 2 - 1
    save_grid(images, tmp_path / "sub" / "grid.png")
    width, height = Image.open(tmp_path / "sub" / "grid.png").size
    assert (width, height) == (10 * 64 + 11 * 2, 3 * 64 + 4 * 2)  # 16 px -> 64 px tiles, 2 px padding
    save_before_after(images[:20], images[:20], tmp_path / "ba.png")
    assert Image.open(tmp_path / "ba.png").size[1] == 5 * 64 + 6 * 2  # two rows before, a gray row, two after


def test_plots_are_written(tmp_path):
    history = [{"rollout": i, "reward_mean": i / 10} for i in range(1, 6)]
    history[-1]["val_accuracy"] = 0.4
    save_reward_curve(history, tmp_path / "curve.png")
    report = {"base": {"accuracy": 0.3, "accuracy_stderr": 0.02}, "tuned": {"accuracy": 0.5, "accuracy_stderr": 0.02}}
    save_accuracy_bars(report, ["base", "tuned"], tmp_path / "bars.png")
    for name in ("curve.png", "bars.png"):
        assert min(Image.open(tmp_path / name).size) > 100
