"""The GPO loop on the toy model: micro-batching, the reference, learning, the run folder, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpo_fast.config import load_config
from gpo_fast.models import ToyModel
from gpo_fast.toy.data import render_dots
from gpo_fast.train import gpo_update, train

LORA = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _lora_model(seed=0, perturb=True):
    torch.manual_seed(seed)
    model = ToyModel()
    model.add_lora(4, 4.0, LORA)
    if perturb:  # a nonzero adapter, so every LoRA matrix gets a gradient
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = render_dots([1, 2, 3, 2, 3, 3, 1, 2], g)
    prompts = ["two dots"] * 4 + ["three dots"] * 4
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    return x0, prompts, rewards


def _grads(model, micro_batch, objective="gpo"):
    cfg = load_config(overrides=[f"train.micro_batch={micro_batch}", "rollout.group_size=4",
                                 f"train.objective=\"{objective}\"", "train.beta=50"])
    x0, prompts, rewards = _batch()
    model.zero_grad(set_to_none=True)
    gpo_update(model, x0, prompts, rewards, cfg, torch.Generator().manual_seed(5))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
def test_group_exact_micro_batching_gives_the_full_batch_gradient(objective):
    model = _lora_model()
    full = _grads(model, 0, objective)
    split = _grads(model, 3, objective)  # micro-batches of 3 cut through both groups
    assert any(g.abs().max() > 0 for g in full.values())
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=1e-4, atol=1e-5 * full[name].abs().max().item())


def test_reference_pass_is_the_base_model():
    torch.manual_seed(0)
    base = ToyModel()
    model = ToyModel()
    model.load_state_dict(base.state_dict())
    model.add_lora(4, 4.0, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    x = torch.randn(4, 1, 16, 16)
    sigma = torch.tensor(0.4)
    emb = model.encode_prompts(["one dot", "2 dots", "", "five dots"])
    with torch.no_grad():
        expected = base.predict(x, sigma, base.encode_prompts(["one dot", "2 dots", "", "five dots"]))
        policy = model.predict(x, sigma, emb)
        with model.reference():
            ref = model.predict(x, sigma, emb)
    assert not torch.allclose(policy, expected)  # the adapter does change the policy
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    torch.testing.assert_close(model.predict(x, sigma, emb), policy, rtol=0, atol=0)  # adapter back on


def test_gpo_raises_the_implicit_reward_of_high_reward_samples():
    """-d = f - e: after a few seeded updates the policy explains the winners better than the losers."""
    model = _lora_model(perturb=False)
    cfg = load_config(overrides=["rollout.group_size=4", "train.beta=50"])
    x0, prompts, rewards = _batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)

    def margin():
        from gpo_fast.kernels import sample_mse
        from gpo_fast.train import group_noise

        g = torch.Generator().manual_seed(123)
        out = []
        with torch.no_grad():
            for _ in range(8):
                x_s, u, s = group_noise(x0, 4, cfg.train, model.schedule(8), g)
                emb = model.encode_prompts(prompts)
                e = sample_mse(model.predict(x_s, s, emb), u)
                with model.reference():
                    f = sample_mse(model.predict(x_s, s, emb), u)
                out.append(f - e)
        implicit = torch.stack(out).mean(0)
        return (implicit[rewards == 1].mean() - implicit[rewards == 0].mean()).item()

    assert margin() == 0.0  # LoRA starts at B = 0: policy == reference
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        gpo_update(model, x0, prompts, rewards, cfg, gen)
        opt.step()
    assert margin() > 1e-4


def test_two_rollouts_end_to_end_write_the_run_folder(tmp_path):
    cfg = load_config(overrides=[
        f"out=\"{tmp_path / 'run'}\"", "train.rollouts=2", "train.inner_updates=1", "rollout.prompts=2",
        "rollout.group_size=4", "rollout.steps=2", "eval.samples=20", "eval.steps=2", "eval.every=1",
    ])
    result = train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "before_after.png", "reward_curve.png",
                 "adapter/pytorch_lora_weights.safetensors"):
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


GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.lrr=0.1"], "train.lrr"),
    (["--set", "rollout.group_size=abc"], "rollout.group_size"),
    (["--preset", "nope"], "preset"),
    (["does-not-exist.toml"], "does-not-exist.toml"),
])
def test_config_errors_are_one_sentence_exit_2_no_traceback(args, needle, tmp_path):
    out = subprocess.run([GPO_FAST, "train", *args, "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written
