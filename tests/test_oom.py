"""Out of memory, retried (gpo_fast.train): a CUDA out-of-memory error in an update halves train.micro_batch and
redoes that update with the same noise; in a rollout it halves rollout.batch_size and draws the rollout again.
The run ends as one started at the smaller size; the size is logged and kept. Injected on the CPU: the model's
forward (the toy model's, or the tiny SD3's as the SD3.5 presets configure it) raises torch.cuda.OutOfMemoryError
above a batch size."""

import json

import pytest
import torch
from safetensors.torch import load_file

import gpo_fast.train as train_module
from gpo_fast.config import load_config
from gpo_fast.toy.model import ToyModel
from gpo_fast.train import train
from sd3_util import BrightnessReward

BASE = ["train.rollouts=3", "train.inner_updates=2", "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2",
        "rollout.cfg_scale=1", "eval.samples=20", "eval.steps=2", "eval.every=0", 'log.report_to=["none"]',
        'train.optimizer="adamw"']


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run):
    return load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))


def _out_of_memory_above(monkeypatch, limit: int, where: str, model_class=ToyModel):
    """The model's forward raises a CUDA out-of-memory error on more than `limit` samples: in the policy's
    training passes (where = "update": after the reference errors, in the middle of an update), or while a
    rollout is drawn (where = "rollout")."""
    real_predict, real_rollout, drawing = model_class.predict, train_module.rollout, []

    def predict(self, latents, sigmas, embeds):
        busy = (torch.is_grad_enabled() and self.training) if where == "update" else bool(drawing)
        if busy and latents.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {latents.shape[0]} > {limit})")
        return real_predict(self, latents, sigmas, embeds)

    def rollout(*args, **kwargs):
        drawing.append(1)
        try:
            return real_rollout(*args, **kwargs)
        finally:
            drawing.pop()

    monkeypatch.setattr(model_class, "predict", predict)
    monkeypatch.setattr(train_module, "rollout", rollout)


@pytest.mark.slow
@pytest.mark.parametrize("where, key, start, limit, kept", [
    ("update", "micro_batch", 8, 2, 2),  # 8 -> 4 (one group) -> 2 (below a group: the two-pass path)
    ("rollout", "rollout_batch", 0, 4, 4),  # all 8 at once -> 4
])
def test_an_out_of_memory_error_is_retried_at_half_and_ends_as_a_run_at_that_size(where, key, start, limit, kept,
                                                                                   tmp_path, monkeypatch):
    config_key = {"micro_batch": "train.micro_batch", "rollout_batch": "rollout.batch_size"}[key]
    lines = []
    _out_of_memory_above(monkeypatch, limit, where)
    retried = train(load_config(overrides=[*BASE, f'out="{tmp_path / "retried"}"', f"{config_key}={start}"]),
                    log=lines.append).summary
    monkeypatch.undo()
    smaller = train(load_config(overrides=[*BASE, f'out="{tmp_path / "smaller"}"', f"{config_key}={kept}"]),
                    log=lambda *a: None).summary
    assert any(f"out of GPU memory at {config_key}" in line and f"retrying at {kept}" in line for line in lines)
    assert [r[key] for r in _rows(tmp_path / "retried")] == [kept] * 3  # logged, and kept for the rest of the run
    a, b = _adapter(tmp_path / "retried"), _adapter(tmp_path / "smaller")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert retried["accuracy_after"] == pytest.approx(smaller["accuracy_after"], abs=0.051)
    for r, s in zip(_rows(tmp_path / "retried"), _rows(tmp_path / "smaller")):
        assert r["reward_mean"] == pytest.approx(s["reward_mean"], abs=1e-6) and r["flops"] == s["flops"]


def test_one_sample_that_does_not_fit_stops_with_the_error(tmp_path, monkeypatch):
    _out_of_memory_above(monkeypatch, 0, "update")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train(load_config(overrides=[*BASE, f'out="{tmp_path / "r"}"', "train.micro_batch=2"]), log=lambda *a: None)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from gpo_fast.models.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.mark.slow
@pytest.mark.parametrize("where, key, start, limit, kept", [
    ("update", "micro_batch", 8, 2, 2),
    ("rollout", "rollout_batch", 8, 8, 4),  # the preset's guidance doubles each sampler batch: 16 -> 8 latents
])
def test_the_tiny_sd3_retries_as_the_toy_world_does(where, key, start, limit, kept, tiny_sd3, tmp_path, monkeypatch):
    """The SD3.5 preset's path (its loop, LoRA targets and optimizer settings, float32 here for a tight
    comparison) on the tiny SD3: the retried run ends with the adapter of a run started at the smaller size."""
    from gpo_fast import components
    from gpo_fast.models.sd3 import SD3Model
    from gpo_fast.models.testing import IMAGE_SIZE

    monkeypatch.setattr(components, "build_reward", lambda config, device: BrightnessReward())
    config_key = {"micro_batch": "train.micro_batch", "rollout_batch": "rollout.batch_size"}[key]
    common = [f'model.path="{tiny_sd3}"', f"model.resolution={IMAGE_SIZE}", 'model.t5="off"', 'model.dtype="float32"',
              "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "rollout.batch_size=8",
              "train.rollouts=2", "train.inner_updates=2", "train.lr=0.01", "train.warmup_updates=0",
              "train.micro_batch=8", 'train.optimizer="adamw"', "eval.samples=10", "eval.steps=1", "eval.every=0",
              'log.report_to=["none"]']

    def run(name, size):
        return train(load_config(preset="sd35m-counting", overrides=[
            *common, f'out="{tmp_path / name}"', f"{config_key}={size}"]), log=lines.append)

    lines = []
    with monkeypatch.context() as m:
        _out_of_memory_above(m, limit, where, SD3Model)
        run("retried", start)
    run("smaller", kept)
    said = [line for line in lines if f"out of GPU memory at {config_key}" in line]
    assert f"= {start} " in said[0] and said[-1].endswith(f"retrying at {kept}, kept for the rest of the run")
    assert [r[key] for r in _rows(tmp_path / "retried")] == [kept] * 2
    a, b = _adapter(tmp_path / "retried"), _adapter(tmp_path / "smaller")
    assert a.keys() == b.keys() and any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    for r, s in zip(_rows(tmp_path / "retried"), _rows(tmp_path / "smaller")):
        assert r["reward_mean"] == pytest.approx(s["reward_mean"], abs=1e-6) and r["flops"] == s["flops"]
