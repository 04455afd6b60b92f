"""Loop settings that change a run (gpo_fast.update, gpo_fast.train), each checked against a value computed here:
the warm-up and cosine learning-rate schedules, the noise-level distributions, gradient clipping, the time budget,
and the watched reward."""

import json
import math

import pytest
import torch

import gpo_fast.train as train_module
from gpo_fast.config import load_config
from gpo_fast.update import draw_sigmas, make_schedule

RUN = ["train.inner_updates=1", "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "eval.samples=10",
       "eval.steps=1", "eval.every=0", 'log.report_to=["none"]', 'train.optimizer="adamw"']


def _lrs(train, total, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched, out = make_schedule(opt, train, total), []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule, warmup", [("constant", 0), ("constant", 4), ("cosine", 0), ("cosine", 4)])
def test_the_learning_rate_warms_up_linearly_and_decays_on_a_cosine(schedule, warmup):
    train = load_config(overrides=[f'train.lr_schedule="{schedule}"', f"train.warmup_updates={warmup}",
                                   "train.lr=0.01"]).train
    total = 10
    got = _lrs(train, total, total + 2)
    for step, lr in enumerate(got):
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0  # update k (from 0) at (k + 1) / warmup of lr
        decay = 0.5 * (1 + math.cos(math.pi * min(step, total) / total)) if schedule == "cosine" else 1.0
        assert lr == pytest.approx(0.01 * warm * decay, rel=1e-9, abs=1e-15), step
    if warmup:
        assert got[0] == pytest.approx(0.01 / warmup) and got[warmup - 1] > got[0]
    if schedule == "cosine":
        assert got[total] == pytest.approx(0.0, abs=1e-15)  # the last update's lr is zero, and stays there


def test_the_sd35_presets_warm_up_over_20_updates():
    train = load_config(preset="sd35m-counting").train
    total = train.rollouts * train.inner_updates
    got = _lrs(train, total, 21)
    decay = [0.5 * (1 + math.cos(math.pi * k / total)) if train.lr_schedule == "cosine" else 1.0 for k in range(21)]
    assert train.warmup_updates == 20
    assert got == pytest.approx([train.lr * min(1.0, (k + 1) / 20) * decay[k] for k in range(21)], rel=1e-9)
    assert got[0] == pytest.approx(train.lr / 20 * decay[0])


@pytest.mark.parametrize("dist", ["uniform", "schedule", "logit-normal"])
def test_noise_levels_follow_their_distribution_within_the_clip(dist):
    train = load_config(overrides=[f'train.sigma_dist="{dist}"', "train.sigma_min=0.1", "train.sigma_max=0.9"]).train
    grid = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0])  # a sampler's levels; the last (0) is never drawn
    s = draw_sigmas(20000, train, grid, torch.Generator().manual_seed(0))
    assert s.min() >= 0.1 and s.max() <= 0.9
    if dist == "schedule":  # the sampler's own levels, clipped: 1 -> 0.9; each about a quarter of the draws
        values, counts = s.unique(return_counts=True)
        assert values.tolist() == pytest.approx([0.3, 0.5, 0.8, 0.9])
        assert ((counts / 20000 - 0.25).abs() < 0.02).all()
    elif dist == "uniform":  # flat: a tenth of the mass in each tenth of [0, 1], the clipped ends at the bounds
        assert (s == 0.1).float().mean() == pytest.approx(0.1, abs=0.01)
        assert ((s > 0.4) & (s <= 0.5)).float().mean() == pytest.approx(0.1, abs=0.01)
    else:  # sigmoid of a standard normal: median 0.5, more mass in the middle than uniform's 0.1
        assert s.median() == pytest.approx(0.5, abs=0.01)
        assert ((s > 0.45) & (s <= 0.55)).float().mean() > 0.15


def test_gradients_are_clipped_to_grad_clip(tmp_path, monkeypatch):
    """The optimizer steps with the gradient scaled to norm grad_clip when it is larger; the logged grad_norm is
    the norm before clipping."""
    clipped = []
    real = torch.nn.utils.clip_grad_norm_

    def watch(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real(params, max_norm, *args, **kwargs)
        clipped.append((before.item(), torch.cat([p.grad.reshape(-1) for p in params]).norm().item(), max_norm))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", watch)
    train_module.train(load_config(overrides=[*RUN, "train.rollouts=2", "train.grad_clip=1e-6", "train.beta=5000",
                                              f'out="{tmp_path}"']), log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(clipped) == 2 and all(m == 1e-6 for _, _, m in clipped)
    for (before, after, _), row in zip(clipped, rows):
        assert before > 1e-6 and after == pytest.approx(1e-6, rel=1e-3)  # scaled down to the limit
        assert row["grad_norm"] == pytest.approx(before)


@pytest.mark.slow
def test_the_time_budget_stops_after_the_rollout_that_spends_it(tmp_path, monkeypatch):
    """train.time_budget_s: the run stops rolling out after the rollout during which the budget ran out, and
    still validates, keeps and evaluates what it has."""
    import itertools
    import types

    clock = itertools.count(0, 10)  # the loop's clock: each reading 10 s after the one before
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(time=lambda: next(clock)))
    lines = []
    result = train_module.train(load_config(overrides=[*RUN, "train.rollouts=50", "train.time_budget_s=250",
                                                       f'out="{tmp_path}"']), log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(rows) < 50 and result.summary["rollouts"] == len(rows)
    assert any(f"time budget of 250 s reached after {len(rows)} rollouts" in line for line in lines)
    assert (tmp_path / "summary.json").is_file()


def test_the_watched_reward_is_measured_at_evaluations_and_never_trained_on(tmp_path, monkeypatch):
    """eval.watch_reward: another reward measured on the evaluation images (val_watch_reward in metrics.jsonl),
    never on the rollouts: it is called once per evaluation, no more."""
    from gpo_fast import components

    calls, real = [], components.build_task

    def build_task(config, device):
        task = real(config, device)
        measure = task.watch.measure

        def counted(images, prompts):
            calls.append(len(images))
            return measure(images, prompts)

        task.watch.measure = counted
        return task

    monkeypatch.setattr(train_module, "build_task", build_task)
    train_module.train(load_config(overrides=[*RUN, "train.rollouts=2", "eval.every=1", 'eval.watch_reward="toy-count"',
                                              "reward.partial_credit=true", f'out="{tmp_path}"']), log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["val_watch_reward"] <= 1 and r["val_watch_reward"] != r["val_accuracy"] for r in rows)
    # before (without guidance, and the base with guidance 2 once), the first validation, the two rollouts'
    # validations, after: 10 images each; never a rollout's 8
    assert calls == [10] * 6
