"""Reporting (gpo_fast.report): the gain interval, atomic writes, grids and plots that open."""

import json

import pytest
import torch
from PIL import Image

from gpo_fast.report import (BORDER, GAP, LABEL_H, RIGHT, TITLE_H, UNKNOWN, WRONG, describe_gain, gain_interval,
                             render_panels, reward_curve_figure, save_accuracy_bars, save_before_after, save_grid,
                             save_reward_curve, smoothed, write_atomic, write_json)


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


def _tiles(n, correct=None, side=16, value=0.0):
    from gpo_fast.evaluate import Tiles

    images = torch.full((n, 1, side, side), -1.0)
    images[:, :, side // 2, side // 2] = value  # one dot in the middle
    labels = [str(1 + i % 7) for i in range(n)]
    return Tiles(images, labels, correct if correct is not None else [i % 2 == 0 for i in range(n)])


def test_tiles_are_bordered_by_the_rewards_verdict_and_labelled():
    tiles = _tiles(4, correct=[True, False, None, True])
    tiles.labels[0], tiles.labels[3] = "40 dots", ""  # a long label; no label: nothing drawn under it
    canvas, boxes = render_panels([("", tiles)])
    px = canvas.load()
    assert canvas.size[0] == GAP + 10 * (64 + 2 * BORDER + GAP)  # 16 px -> 64 px tiles, ten a row
    for box, colour in zip(boxes[0], [RIGHT, WRONG, UNKNOWN, RIGHT]):
        left, top, right, bottom = box
        assert right - left == bottom - top == 64 + 2 * BORDER
        for x, y in [(left, top), (right - 1, bottom - 1), (left + 1, (top + bottom) // 2)]:
            assert px[x, y] == colour
        assert px[left + BORDER + 1, top + BORDER + 1] == (0, 0, 0)  # the image: black background...
        assert px[(left + right) // 2 + 1, (top + bottom) // 2 + 1] == (128, 128, 128)  # ...its dot at 0.0
    def inked(box):  # dark pixels in the label strip under a tile
        left, _, right, bottom = box
        return sum(px[x, y][0] < 100 for x in range(left, right) for y in range(bottom + 1, bottom + LABEL_H))
    assert inked(boxes[0][0]) > 5 and inked(boxes[0][3]) == 0


def test_before_and_after_put_the_same_sample_at_the_same_place_under_titles(tmp_path):
    before, after = _tiles(12), _tiles(12, correct=[True] * 12, value=1.0)
    canvas, boxes = render_panels([("before", before), ("after", after)], ncol=5)
    assert len(boxes) == 2 and len(boxes[0]) == len(boxes[1]) == 12
    shift = boxes[1][0][0] - boxes[0][0][0]
    assert shift > 5 * 64 and all(b[0] + shift == a[0] and b[1] == a[1] for b, a in zip(boxes[0], boxes[1]))
    px = canvas.load()
    for b in (boxes[0][0], boxes[1][0]):  # a title over each panel
        assert sum(px[x, y][0] < 100 for x in range(b[0], b[0] + 40) for y in range(0, TITLE_H)) > 10
    assert px[boxes[0][1][0], boxes[0][1][1]] == WRONG and px[boxes[1][1][0], boxes[1][1][1]] == RIGHT
    save_before_after(before, after, tmp_path / "ba.png", {"accuracy": 0.25, "n_samples": 12},
                      {"accuracy": 1.0, "n_samples": 12})
    assert Image.open(tmp_path / "ba.png").size == canvas.size
    save_grid(before, tmp_path / "sub" / "grid.png", "rollout 3")
    assert Image.open(tmp_path / "sub" / "grid.png").size[0] == canvas.size[0] - 3 * GAP  # ten a row, one panel


def test_the_evaluators_tiles_carry_the_asked_count_and_the_strict_verdict():
    from gpo_fast.toy.evaluate import ToyEvaluator
    from gpo_fast.toy.model import ToyModel
    from gpo_fast.toy.reward import count_dots

    torch.manual_seed(0)
    metrics, tiles = ToyEvaluator(samples=30, steps=2, cfg_scale=2.0, keep_images=12)(ToyModel(), seed=5)
    assert len(tiles) == 12 and tiles.labels == [str(1 + i % 5) for i in range(12)]
    assert tiles.correct == [int(c) == 1 + i % 5 for i, c in enumerate(count_dots(tiles.images))]


def test_the_reward_curve_shows_the_run():
    history = [{"rollout": i, "reward_mean": 0.2 + i / 20, "degenerate_fraction": 0.5 - i / 20} for i in range(1, 7)]
    history[2]["val_accuracy"], history[5]["val_accuracy"] = 0.35, 0.4
    history[3]["reward_mean"] = None  # an all-failed rollout
    fig = reward_curve_figure(history, val_start=0.3, before=0.28, after=0.41, kept_rollout=3)
    ax, right = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    val = lines["validation accuracy"]
    assert list(val.get_xdata()) == [0, 3, 6] and list(val.get_ydata()) == [0.3, 0.35, 0.4]
    assert list(lines["held-out before 28.0%"].get_ydata()) == [0.28, 0.28]
    assert list(lines["held-out after 41.0%"].get_ydata()) == [0.41, 0.41]
    assert list(lines["kept adapter (rollout 3)"].get_xdata()) == [3, 3]
    smooth = list(lines["rollout reward, smoothed"].get_ydata())
    assert smooth[0] == pytest.approx(0.25) and smooth[3] == smooth[2] and smooth[-1] < 0.5
    assert [line.get_label() for line in right.get_lines()] == ["degenerate groups (right axis)"]
    assert right.get_ylim() == (0, 1)
    assert len(ax.get_legend().get_texts()) == 7


def test_smoothing_is_debiased_and_skips_gaps():
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    out = smoothed([0.0, float("nan"), 1.0], weight=0.5)
    assert out[0] == 0.0 and out[1] == 0.0 and out[2] == pytest.approx(0.5 / 0.75)


def test_plots_are_written(tmp_path):
    history = [{"rollout": i, "reward_mean": i / 10, "degenerate_fraction": 0.1} for i in range(1, 6)]
    history[-1]["val_accuracy"] = 0.4
    save_reward_curve(history, tmp_path / "curve.png", val_start=0.3, kept_rollout=5)
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
    assert "against the frozen base" in card.text  # the SD3.5 presets keep the paper's reference
    assert "partial credit" not in card.text  # and its exact-count reward
    toy_card = ModelCard.load(write_model_card(folder, load_config(), summary, None))
    toy = toy_card.data.to_dict()
    assert toy["license"] == "apache-2.0" and "base_model" not in toy
    assert "against a moving average of its own weights (train.reference_decay 0.95)" in toy_card.text
    assert "rewarded with partial credit for a count near the asked one" in toy_card.text  # the toy preset's reward
    assert "num_inference_steps=28, guidance_scale=4.5" in card.text and "without classifier-free" not in card.text
    free = load_config(preset="sd35m-counting", overrides=["rollout.cfg_scale=1", "eval.cfg_scale=1",
                                                           'eval.solver="dpm++2m"', "eval.steps=10"])
    free_card = ModelCard.load(write_model_card(folder, free, summary, None)).text
    assert "meant to be used without guidance" in free_card and "measured without guidance too" in free_card
    guided_eval = ModelCard.load(write_model_card(folder, load_config(
        preset="sd35m-counting", overrides=["rollout.cfg_scale=1"]), summary, None)).text
    assert "measured at guidance 4.5, as the snippet below samples" in guided_eval
    assert "meant to be used without guidance" not in guided_eval
    assert "num_inference_steps=10, guidance_scale=1)" in free_card and "10 sampler steps (euler), CFG 1.0" in free_card
    assert "pipe.scheduler = DPMSolverMultistepScheduler(" in free_card and "use_flow_sigmas=True" in free_card
    compile(free_card.split("```python\n")[1].split("```")[0], "the card's snippet", "exec")  # valid Python
