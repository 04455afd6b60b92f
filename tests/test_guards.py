"""Numerical guards: a non-finite update is skipped and counted, several in a row stop the run with
one sentence, and a reward engine failing on one image only neutralises that member."""

import json
import math

import pytest
import torch

from gpo_fast import train as train_module
from gpo_fast.config import load_config
from gpo_fast.train import TrainingDiverged, fill_failed

ARGS = ["train.inner_updates=1", "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "eval.samples=10",
        "eval.steps=1", "eval.every=0", "reward.partial_credit=true", 'train.optimizer="adamw"']


def _poison(monkeypatch, bad_updates: set):
    """gpo_update as usual, but the gradient of the listed updates (1-based) turns NaN."""
    real, calls = train_module.gpo_update, [0]

    def update(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_updates:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(math.nan)
        return stats

    monkeypatch.setattr(train_module, "gpo_update", update)


def test_a_non_finite_update_is_skipped_and_counted(monkeypatch, tmp_path):
    _poison(monkeypatch, {2})
    result = train_module.train(load_config(overrides=[*ARGS, "train.rollouts=3", f'out="{tmp_path}"']),
                                log=lambda *a: None)
    assert result.summary["steps"] == 2  # three updates tried, one skipped
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in result.model.trainable_parameters())


def test_non_finite_updates_in_a_row_stop_the_run_in_one_sentence(monkeypatch, tmp_path):
    _poison(monkeypatch, {2, 3, 4})
    cfg = load_config(overrides=[*ARGS, "train.rollouts=6", "train.max_bad_updates=3", f'out="{tmp_path}"'])
    with pytest.raises(TrainingDiverged, match="3 updates in a row"):
        train_module.train(cfg, log=lambda *a: None)
    assert not (tmp_path / "summary.json").exists()


def test_a_failed_reward_neutralises_only_its_member():
    r = torch.tensor([1.0, math.nan, 0.0, 1.0, math.nan, math.nan, math.nan, math.nan])
    filled = fill_failed(r, 4).view(2, 4)
    assert torch.isfinite(filled).all()
    assert filled[0, 1] == pytest.approx(2 / 3)  # the mean of its group: advantage 0
    assert torch.equal(filled[0, [0, 2, 3]], torch.tensor([1.0, 0.0, 1.0]))
    assert filled[1].std() == 0  # nothing finite: a degenerate group, no loss and no gradient
