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


def test_the_model_card_front_matter_is_what_the_hub_reads(tmp_path):
    from huggingface_hub import ModelCard

    from gpo_fast.card import write_model_card
    from gpo_fast.config import load_config

    config = load_config(preset="sd35m-counting", overrides=["lora.rank=16"])
    summary = {"accuracy_before": 0.41, "accuracy_after": 0.58, "gain": 0.17, "gain_ci95": [0.10, 0.24],
               "eval_samples": 400, "best_rollout": 250, "rollouts": 300, "steps": 600,
               "validation": "the val split (38 prompts, disjoint from eval)"}
    grid = tmp_path / "before_after.png"
    grid.write_bytes(b"\x89PNG fake")
    folder = tmp_path / "adapter"
    folder.mkdir()
    card = ModelCard.load(write_model_card(folder, config, summary, grid))
    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-3.5-medium" and data["library_name"] == "diffusers"
    assert {"lora", "gpo"} <= set(data["tags"]) and data["license"] == "other"
    assert data["license_name"] == "stabilityai-ai-community"
    assert "+17.0 points, 95% interval [+10.0, +24.0]" in card.text and "rollout 250" in card.text
    assert "![the same prompts and seeds, before and after](before_after.png)" in card.text
    assert (folder / "before_after.png").read_bytes() == grid.read_bytes()
    assert 'pipe.load_lora_weights("' in card.text and "LoRA rank 16" in card.text
    toy = ModelCard.load(write_model_card(folder, load_config(), summary, None)).data.to_dict()
    assert toy["license"] == "apache-2.0" and "base_model" not in toy
