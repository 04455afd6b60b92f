"""Numerical guards: a non-finite update is skipped and counted, several in a row stop the run with
one sentence, and a reward engine failing on one image excludes that member from its group."""

import json
import math

import pytest
import torch

from gpo_fast import components
from gpo_fast import train as train_module
from gpo_fast.config import load_config
from gpo_fast.train import TrainingDiverged

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


def test_a_failed_reward_excludes_its_member_and_is_counted(monkeypatch, tmp_path):
    """The reward engine fails on member 1 of every group: the run goes on, the loss gets the NaN (which
    excludes the member, tests/test_objective.py), the failures are counted and the model still learns."""
    real_build, seen = components.build_reward, []

    def build_reward(config, device):
        reward = real_build(config, device)
        real_measure = reward.measure

        def measure(images, prompts):
            res = real_measure(images, prompts)
            res.reward.view(-1, 4)[:, 1] = math.nan
            return res

        reward.measure = measure
        return reward

    real_update = train_module.gpo_update

    def update(model, x0, prompts, rewards, *args, **kwargs):
        seen.append(rewards.clone())
        return real_update(model, x0, prompts, rewards, *args, **kwargs)

    monkeypatch.setattr(components, "build_reward", build_reward)
    monkeypatch.setattr(train_module, "gpo_update", update)
    result = train_module.train(load_config(overrides=[*ARGS, "train.rollouts=3", f'out="{tmp_path}"']),
                                log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_failures"] for r in rows] == [2, 2, 2]
    assert all(r["skipped_updates"] == 0 and math.isfinite(r["loss"]) for r in rows)
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["reward_std"]) for r in rows)
    assert all(torch.isnan(r.view(-1, 4)[:, 1]).all() and torch.isfinite(r.view(-1, 4)[:, [0, 2, 3]]).all()
               for r in seen)
    assert result.summary["steps"] == 3
    assert all(torch.isfinite(p).all() for p in result.model.trainable_parameters())
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]  # zero at the start
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 1e-5  # the other members still trained it


@pytest.mark.slow
def test_the_bad_update_streak_continues_across_a_resume(monkeypatch, tmp_path):
    """Updates 2 and 3 fail, the checkpoint after rollout 3 is resumed, and the first update after it fails
    too: three in a row, as in the uninterrupted run, so the run stops."""
    cfg = load_config(overrides=[*ARGS, "train.rollouts=5", "train.max_bad_updates=3", "train.checkpoint_every=1",
                                 "train.keep_checkpoints=5", f'out="{tmp_path}"'])
    _poison(monkeypatch, {2, 3})
    train_module.train(cfg, log=lambda *a: None)  # updates 4 and 5 succeed: the streak ends at 2
    (tmp_path / "summary.json").unlink()
    monkeypatch.undo()
    _poison(monkeypatch, {1})
    with pytest.raises(TrainingDiverged, match="3 updates in a row"):
        train_module.train(cfg, log=lambda *a: None, resume=tmp_path / "checkpoints" / "rollout-000003")
