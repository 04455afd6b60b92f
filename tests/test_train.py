"""The GPO loop (gpo_fast.train) on the toy model: the run folder, full fine-tuning, the loop state."""

import json

import pytest
import torch

from gpo_fast.config import load_config
from gpo_fast.toy.model import ToyModel
from gpo_fast.train import train


def test_two_rollouts_end_to_end_write_the_run_folder(tmp_path):
    cfg = load_config(overrides=[
        f"out=\"{tmp_path / 'run'}\"", "train.rollouts=2", "train.inner_updates=1", "rollout.prompts=2",
        "rollout.group_size=4", "rollout.steps=2", "eval.samples=20", "eval.steps=2", "eval.every=1",
    ])
    result = train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "before_after.png", "reward_curve.png",
                 "adapter/pytorch_lora_weights.safetensors", "adapter/README.md", "adapter/before_after.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rows] == [1, 2]
    for key in ("loss", "reward_mean", "reward_std", "accuracy", "degenerate_fraction", "implicit_acc",
                "grad_norm", "lr", "step_seconds"):
        assert key in rows[0]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "steps", "wall_seconds", "objective", "seed"):
        assert key in summary
    assert summary["steps"] == 2 and result.summary["objective"] == "gpo"
    # the toy world has no val split: validation samples the eval counts on other seeds, and says so
    assert summary["prompts"]["val"] == 0 and summary["prompts"]["train"] > 0 and summary["prompts"]["eval"] > 0
    assert "other seeds" in summary["validation"]
    assert summary["watch"]["warning"] is None and set(summary["watch"]["max_drift"]) >= {"brightness", "contrast"}
    assert load_config(run / "config.toml") == cfg  # the resolved config reloads to the same thing


def test_full_fine_tuning_with_checkpointing_trains_against_a_frozen_copy(tmp_path):
    cfg = load_config(overrides=[
        f"out=\"{tmp_path / 'run'}\"", "lora.enabled=false", "train.gradient_checkpointing=true",
        "train.optimizer=\"adamw\"", "train.rollouts=1", "train.inner_updates=2", "rollout.prompts=2",
        "rollout.group_size=4", "rollout.steps=2", "eval.samples=20", "eval.steps=2", "eval.every=0",
        "reward.partial_credit=true",  # dense rewards: no degenerate group, so the weights move
    ])
    train(cfg, log=lambda *a: None)
    base, tuned = ToyModel.from_pretrained(), ToyModel.from_pretrained(tmp_path / "run" / "model")
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert moved and all(k.startswith("transformer.") for k in moved)  # the prompt table stays frozen


@pytest.mark.slow
def test_a_run_with_scoring_overlapped_is_the_run_without(tmp_path):
    """rollout.overlap_scoring changes when the rewards are computed, not what they are: the same metrics row
    for row (timings aside) and the same adapter."""
    def run(overlap):
        cfg = load_config(overrides=[
            f"out=\"{tmp_path / str(overlap)}\"", "train.rollouts=2", "train.inner_updates=1", "rollout.prompts=3",
            "rollout.group_size=4", "rollout.steps=2", "rollout.batch_size=4", f"rollout.overlap_scoring={str(overlap).lower()}",
            "reward.partial_credit=true", "eval.samples=20", "eval.steps=2", "eval.every=0"])
        return train(cfg, log=lambda *a: None)

    on, off = run(True), run(False)
    def same(row):  # NaN (no pair in a rollout) compares equal through JSON
        return json.dumps({k: v for k, v in row.items() if k != "step_seconds"}, sort_keys=True)

    assert len(on.history) == 2 and [same(r) for r in on.history] == [same(r) for r in off.history]
    assert [r["loss"] for r in on.history] and on.summary["accuracy_after"] == off.summary["accuracy_after"]
    for (name, p), (_, q) in zip(on.model.named_parameters(), off.model.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_the_moving_average_is_what_validation_scores_and_what_is_kept(tmp_path, monkeypatch):
    """train.ema_decay: the rollouts and updates are those of the run without it (the average is only read), each
    validation scores the average of the weights after the updates so far (decay (1 + n) / (10 + n) up to
    ema_decay), and the adapter kept is the average that validated best."""
    import gpo_fast.train as loop

    def run(decay, monkeypatch):
        raw, seen = [], {}  # the trained weights after each update; the weights each validation scored
        update, validate = loop.update, loop.Run.validate

        def spy_update(r, batch, on_update=None):
            out = update(r, batch, on_update)
            raw.append([p.detach().clone() for p in r.params])
            return out

        def spy_validate(r):
            seen[r.state.rollout] = [p.detach().clone() for p in r.params]
            return validate(r)

        monkeypatch.setattr(loop, "update", spy_update)
        monkeypatch.setattr(loop.Run, "validate", spy_validate)
        cfg = load_config(overrides=[
            f"out=\"{tmp_path / str(decay)}\"", "train.rollouts=3", "train.inner_updates=1", "rollout.prompts=2",
            "rollout.group_size=4", "rollout.steps=2", "eval.samples=20", "eval.steps=2", "eval.every=1",
            "reward.partial_credit=true", f"train.ema_decay={decay}"])
        return train(cfg, log=lambda *a: None), raw, seen

    plain, plain_raw, _ = run(0.0, monkeypatch)
    averaged, raw, seen = run(0.5, monkeypatch)
    same = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds" and not k.startswith(("val_", "watch_"))}
                         for r in rows]  # what validation measures differs; the training does not
    assert json.dumps(same(averaged.history)) == json.dumps(same(plain.history))
    assert all(torch.equal(a, b) for ra, rb in zip(raw, plain_raw) for a, b in zip(ra, rb))

    expected, average = {0: seen[0]}, None
    for n, weights in enumerate(raw, start=1):
        decay = 0.0 if n == 1 else min(0.5, n / (9 + n))  # diffusers' EMAModel: (1 + step) / (10 + step), step = n - 1
        average = [w.clone() for w in weights] if average is None else [
            decay * a + (1 - decay) * w for a, w in zip(average, weights)]
        expected[n] = average
    assert set(seen) == {0, 1, 2, 3}
    for rollout, weights in seen.items():
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(weights, expected[rollout])), rollout
    assert not all(torch.equal(a, b) for a, b in zip(expected[3], raw[-1]))  # the average is not the last weights
    kept = [p.detach() for p in averaged.model.trainable_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(kept, seen[averaged.summary["best_rollout"]]))


@pytest.mark.slow
def test_each_rollout_is_validated_once(tmp_path, monkeypatch):
    """Validation runs on the base, then every eval.every rollouts; the end looks again only when the last
    rollout was not validated (a run stopped early by its time budget, or one whose length is no multiple)."""
    import gpo_fast.train as loop

    validate, seen = loop.Run.validate, []

    def spy_validate(r):
        seen.append(r.state.rollout)
        return validate(r)

    monkeypatch.setattr(loop.Run, "validate", spy_validate)
    for rollouts, every, expected in ((4, 2, [0, 2, 4]), (3, 2, [0, 2, 3])):
        seen.clear()
        cfg = load_config(overrides=[
            f"out=\"{tmp_path / str(rollouts)}\"", f"train.rollouts={rollouts}", "train.inner_updates=1",
            "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "eval.samples=20", "eval.steps=2",
            f"eval.every={every}", "reward.partial_credit=true"])
        result = train(cfg, log=lambda *a: None)
        assert seen == expected
        assert result.summary["best_rollout"] in expected


def test_rollout_and_eval_solvers_reach_the_sampler_and_the_training_noise_levels(tmp_path, monkeypatch):
    """rollout.solver draws the rollouts, eval.solver the evaluations, and sigma_dist = "schedule" trains on the
    rollout solver's own noise levels."""
    import gpo_fast.sampling as sampling
    import gpo_fast.update as update

    used, schedules, real_solve, real_group_noise = [], [], sampling._solve, update.group_noise

    def solve(model, prompts, x, steps, cfg_scale, solver="euler"):
        used.append((steps, solver))
        return real_solve(model, prompts, x, steps, cfg_scale, solver)

    def group_noise(x0, group_size, train, schedule, *args, **kwargs):
        schedules.append(schedule)
        return real_group_noise(x0, group_size, train, schedule, *args, **kwargs)

    monkeypatch.setattr(sampling, "_solve", solve)
    monkeypatch.setattr(update, "group_noise", group_noise)
    cfg = load_config(overrides=[
        f"out=\"{tmp_path / 'run'}\"", "train.rollouts=1", "train.inner_updates=1", "rollout.prompts=2",
        "rollout.group_size=4", "rollout.steps=3", 'rollout.solver="dpm++2m"', "eval.samples=20", "eval.steps=5",
        'eval.solver="euler"', "eval.every=0", 'train.sigma_dist="schedule"', 'log.report_to=["none"]'])
    train(cfg, log=lambda *a: None)
    assert set(used) == {(3, "dpm++2m"), (5, "euler")}
    torch.testing.assert_close(schedules[0], ToyModel().schedule(3, "dpm++2m"))


@pytest.mark.slow
def test_a_guidance_free_run_measures_the_base_with_guidance_too(tmp_path, monkeypatch):
    """rollout.cfg_scale = eval.cfg_scale = 1: the base is also evaluated at eval.base_cfg_scale (what a
    guidance-free adapter has to beat), once, shown first in before_after.png and kept through a resume."""
    import gpo_fast.report as report
    from gpo_fast.tuned import run_eval

    titles = []
    real = report.save_panels
    monkeypatch.setattr(report, "save_panels", lambda panels, path, **kw: (titles.append([t for t, _ in panels]),
                                                                           real(panels, path, **kw)))
    overrides = [f"out=\"{tmp_path / 'run'}\"", "train.rollouts=2", "train.inner_updates=1", "rollout.prompts=2",
                 "rollout.group_size=4", "rollout.steps=2", "rollout.cfg_scale=1", "eval.cfg_scale=1",
                 "eval.samples=30", "eval.steps=3", "eval.every=0", "train.checkpoint_every=1", 'log.report_to=["none"]']
    summary = train(load_config(overrides=overrides), log=lambda *a: None).summary
    guided = run_eval(load_config(overrides=[*overrides, "eval.cfg_scale=2"]), None, tmp_path / "eval2",
                      log=lambda *a: None)["base"]
    assert summary["base_cfg_scale"] == 2.0
    assert summary["accuracy_base_guided"] == guided["accuracy"]
    assert summary["gain_over_guided_base"] == summary["accuracy_after"] - guided["accuracy"]
    assert summary["eval_before"]["image_stats"] != guided["image_stats"]  # the base without guidance differs
    assert titles[-1][0].startswith("base, guidance 2: accuracy") and titles[-1][1].startswith("base, no guidance")
    assert titles[-1][2].startswith("tuned, no guidance")
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"| base, guidance 2 | {guided['accuracy']:.3f} |" in card and "| base, no guidance |" in card

    # resumed from rollout 1: the guided base comes from the checkpoint, not evaluated again
    again = train(load_config(overrides=overrides), log=lambda *a: None,
                  resume=tmp_path / "run" / "checkpoints" / "rollout-000001").summary
    assert again["accuracy_base_guided"] == summary["accuracy_base_guided"]
    assert again["flops"]["eval"] == summary["flops"]["eval"]
    # with guidance in the evaluations there is nothing more to compare with
    plain = train(load_config(overrides=[*overrides[:-1], f"out=\"{tmp_path / 'plain'}\"", "eval.cfg_scale=2",
                                         'log.report_to=["none"]']), log=lambda *a: None).summary
    assert "accuracy_base_guided" not in plain and titles[-1] == [t for t in titles[-1] if t.startswith(("before", "after"))]
