"""One GPO update (gpo_fast.update): group-exact micro-batching, the reference pass, learning, the
loss contract read from the config, the logged statistics."""

import contextlib
import math

import pytest
import torch

from gpo_fast.config import load_config
from gpo_fast.kernels import LossSpec, sample_mse
from gpo_fast.toy.data import render_dots
from gpo_fast.toy.model import ToyModel
from gpo_fast.update import degenerate_fraction, gpo_update, group_noise, implicit_reward_accuracy, loss_spec
from kernels_util import assert_same_gradient

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


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [3, 4], ids=["cutting-groups", "whole-groups"])
@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
def test_group_exact_micro_batching_gives_the_full_batch_gradient(objective, micro_batch):
    model = _lora_model()
    full = _grads(model, 0, objective)
    split = _grads(model, micro_batch, objective)  # 3 cuts through both groups of 4; 4 holds one group
    assert any(g.abs().max() > 0 for g in full.values())
    for name in full:
        assert_same_gradient(split[name], full[name])


@pytest.mark.parametrize("micro_batch, policy_passes, reference_passes", [(0, 1, 1), (4, 2, 2), (3, 6, 3)])
def test_whole_group_micro_batches_need_no_extra_policy_pass(micro_batch, policy_passes, reference_passes,
                                                             monkeypatch):
    """Micro-batches of whole groups run the fused loss per micro-batch: one policy pass per sample, as without
    micro-batching; micro-batches that cut groups need the errors of every sample first (3 + 3 passes)."""
    model = _lora_model()
    real_predict, real_reference, in_reference, policy = model.predict, model.reference, [False], []

    @contextlib.contextmanager
    def reference():
        in_reference[0] = True
        with real_reference() as ref:
            yield ref
        in_reference[0] = False

    def predict(*args):
        policy.append(not in_reference[0])
        return real_predict(*args)

    monkeypatch.setattr(model, "predict", predict)
    monkeypatch.setattr(model, "reference", reference)
    _grads(model, micro_batch)
    assert (sum(policy), len(policy) - sum(policy)) == (policy_passes, reference_passes)


def test_a_micro_batch_of_degenerate_groups_adds_nothing_and_the_gradient_stays_exact():
    model = _lora_model()
    x0, prompts, _ = _batch()
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # the second group is degenerate
    grads = []
    for micro_batch in (0, 4):
        cfg = load_config(overrides=[f"train.micro_batch={micro_batch}", "rollout.group_size=4", "train.beta=50"])
        model.zero_grad(set_to_none=True)
        stats = gpo_update(model, x0, prompts, rewards, cfg, torch.Generator().manual_seed(5))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    for name in grads[0]:
        assert_same_gradient(grads[1][name], grads[0][name])
    model.zero_grad(set_to_none=True)
    cfg = load_config(overrides=["train.micro_batch=4", "rollout.group_size=4"])
    stats = gpo_update(model, x0, prompts, torch.ones(8), cfg, torch.Generator().manual_seed(5))
    assert stats["loss"] == 0 and all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.trainable_parameters())


@pytest.mark.parametrize("micro_batch, degenerate", [(0, False), (4, False), (4, True), (3, False), (3, True)])
def test_the_passes_an_update_reports_are_the_passes_it_runs(micro_batch, degenerate, monkeypatch):
    """gpo_fast.flops counts an update by the samples it reports through a forward alone and through a forward
    and backward: those are the samples predict() saw without and with gradients."""
    model = _lora_model()
    seen = {False: 0, True: 0}
    real_predict = model.predict

    def predict(x, *args):
        seen[torch.is_grad_enabled()] += x.shape[0]
        return real_predict(x, *args)

    monkeypatch.setattr(model, "predict", predict)
    x0, prompts, rewards = _batch()
    if degenerate:
        rewards[4:] = 1.0  # the second group has no loss: with whole groups it is only a forward
    cfg = load_config(overrides=[f"train.micro_batch={micro_batch}", "rollout.group_size=4", "train.beta=50"])
    stats = gpo_update(model, x0, prompts, rewards, cfg, torch.Generator().manual_seed(5))
    assert (stats["forward_samples"], stats["train_samples"]) == (seen[False], seen[True])
    expected_trained = 4 if degenerate and micro_batch == 4 else 8
    assert stats["train_samples"] == expected_trained


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


def test_a_moving_reference_scores_with_the_average_and_trains_the_weights():
    """train.reference_decay: the reference errors come from the moving average of the adapter swapped in, the
    loss and gradient are those of the trained adapter against them, and the adapter is back afterwards."""
    from gpo_fast.objective import loss_from_errors
    from gpo_fast.update import make_ema, swapped_in

    model = _lora_model()
    params = model.trainable_parameters()
    average = make_ema(params, 0.5)  # holds the adapter as it is now
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # the trained adapter moves away from its average
    trained = [p.detach().clone() for p in params]
    cfg = load_config(overrides=["rollout.group_size=4", "train.beta=50"])
    x0, prompts, rewards = _batch()
    got = gpo_update(model, x0, prompts, rewards, cfg, torch.Generator().manual_seed(5),
                     reference=swapped_in(average, params))
    grads = [p.grad.clone() for p in params]
    assert all(torch.equal(p, t) for p, t in zip(params, trained))

    x_s, u, s = group_noise(x0, 4, cfg.train, model.schedule(cfg.rollout.steps), torch.Generator().manual_seed(5))
    embeds = model.encode_prompts(prompts)
    with torch.no_grad(), swapped_in(average, params):
        ref_err = sample_mse(model.predict(x_s, s, embeds), u)
        with model.reference():
            base_err = sample_mse(model.predict(x_s, s, embeds), u)
    assert not torch.allclose(ref_err, base_err)  # the average is not the base: the test can tell them apart
    model.zero_grad(set_to_none=True)
    loss = loss_from_errors(sample_mse(model.predict(x_s, s, embeds), u), ref_err, rewards, loss_spec(cfg))
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for g, p in zip(grads, params):
        assert_same_gradient(g, p.grad)


def test_the_average_is_swapped_in_where_it_is_without_a_copy_to_the_cpu(monkeypatch):
    """swapped_in exchanges the parameters' and the shadows' tensors on their device (EMAModel.store would copy
    every parameter to the CPU); both are as they were after the block, even when it raises."""
    from gpo_fast.update import make_ema, swapped_in

    model = _lora_model()
    params = model.trainable_parameters()
    average = make_ema(params, 0.5)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    trained = [p.detach().clone() for p in params]
    shadows = [s.clone() for s in average.shadow_params]
    monkeypatch.setattr(average, "store", lambda *a: pytest.fail("copied to the CPU"))
    with pytest.raises(RuntimeError, match="inside"), swapped_in(average, params):
        assert all(torch.equal(p, s) for p, s in zip(params, shadows))
        raise RuntimeError("inside")
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    assert all(torch.equal(a, b) for a, b in zip(average.shadow_params, shadows))


@pytest.mark.parametrize("warmup", [True, False])
def test_moving_average_decay_with_and_without_warmup(warmup):
    """make_ema: after the n-th update the average moves by 1 - decay_n toward the weights; decay_1 = 0 (a copy),
    then (1 + n') / (10 + n') up to the cap with warm-up (n' = n - 1, diffusers' EMAModel), the cap itself without."""
    from gpo_fast.update import make_ema

    w = torch.nn.Parameter(torch.zeros(3))
    average = make_ema([w], 0.5, warmup=warmup)
    expected = None
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            w.fill_(value)
        average.step([w])
        decay = 0.0 if n == 1 else (min(0.5, n / (9 + n)) if warmup else 0.5)
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert average.shadow_params[0][0].item() == pytest.approx(expected, rel=1e-6), n


@pytest.mark.slow
def test_gpo_raises_the_implicit_reward_of_high_reward_samples():
    """-d = f - e: after a few seeded updates the policy explains the winners better than the losers."""
    model = _lora_model(perturb=False)
    cfg = load_config(overrides=["rollout.group_size=4", "train.beta=50"])
    x0, prompts, rewards = _batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)

    def margin():
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


def test_the_loss_contract_is_read_from_the_config():
    config = load_config(overrides=["rollout.group_size=6", "train.beta=20", 'train.objective="dpo"',
                                    "train.eps_std=0.01", "train.min_std=0.001", "train.beta_per_member=false"])
    assert loss_spec(config) == LossSpec(group_size=6, beta=20.0, objective="dpo", eps_std=0.01, min_std=0.001)


def test_beta_per_member_divides_beta_by_the_group_size_and_is_a_mean_over_members():
    config = load_config(overrides=["rollout.group_size=8", "train.beta=800", "train.beta_per_member=true"])
    spec = loss_spec(config)
    assert spec.beta == 100.0 and spec.group_size == 8
    # gpo at beta / G is l(beta * mean_i A_i d_i): the same sharpness for a group of 8 or of 24
    from gpo_fast.objective import loss_from_errors, standardize_rewards

    g = torch.Generator().manual_seed(0)
    e, f, r = torch.rand(16, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64), \
        torch.rand(16, generator=g, dtype=torch.float64)
    adv, _ = standardize_rewards(r, spec)
    mean_term = (adv * (e - f).view(2, 8)).mean(dim=1)
    expected = torch.nn.functional.softplus(800.0 * mean_term).mean()
    torch.testing.assert_close(loss_from_errors(e, f, r, spec), expected)
    off = ["rollout.group_size=8", "train.beta=800", "train.beta_per_member=false"]
    assert loss_spec(load_config(overrides=off)).beta == 800.0


def test_group_noise_is_shared_within_a_group_and_differs_between_groups():
    config = load_config()
    x0 = torch.randn(8, 1, 16, 16)
    x_s, u, s = group_noise(x0, 4, config.train, torch.linspace(1, 0, 9), torch.Generator().manual_seed(0))
    eps = u + x0
    assert torch.equal(s[:4], s[:1].expand(4)) and s[0] != s[4]
    torch.testing.assert_close(eps[:4], eps[:1].expand(4, -1, -1, -1))
    assert not torch.allclose(eps[0], eps[4])
    torch.testing.assert_close(x_s, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)
    assert ((s >= config.train.sigma_min) & (s <= config.train.sigma_max)).all()


def test_implicit_reward_accuracy_and_degenerate_fraction_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.3, 0.3, 0.3])  # the second group is degenerate
    d = torch.tensor([-1.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    # pairs of group 1: (0 > 1) preferred, (0 > 2) preferred, (2 > 1) not: 2 of 3; group 2 has no pair
    assert implicit_reward_accuracy(d, rewards, 3) == pytest.approx(2 / 3)
    assert degenerate_fraction(rewards, LossSpec(group_size=3, beta=1.0)) == 0.5
    assert math.isnan(implicit_reward_accuracy(d, torch.full((6,), 0.3), 3))
