"""The plain-PyTorch reference (gpo_fast.objective) against docs/method.md written out by hand."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dpo_literals import diffusers_dpo, original_diffusion_dpo
from gpo_fast.objective import LossSpec, loss_from_errors, reference_gpo_loss, standardize_rewards


def _by_hand(e, f, r, group_size, beta, objective, eps_std=1e-6, min_std=1e-6):
    """docs/method.md step 3-6 with Python loops over groups and pairs, float64."""
    e, f, r = (t.double().tolist() for t in (e, f, r))
    sp = lambda z: float(F.softplus(torch.tensor(beta * z, dtype=torch.float64)))  # noqa: E731
    losses = []
    for p in range(len(e) // group_size):
        idx = range(p * group_size, (p + 1) * group_size)
        rs = [r[i] for i in idx]
        ds = [e[i] - f[i] for i in idx]
        mu = sum(rs) / group_size
        sd = (sum((x - mu) ** 2 for x in rs) / group_size) ** 0.5
        if sd < min_std:
            continue
        a = [(x - mu) / (sd + eps_std) for x in rs]
        if objective == "gpo":
            losses.append(sp(sum(ai * di for ai, di in zip(a, ds))))
        elif objective == "gpo-pairs":
            num = den = 0.0
            for i, j in itertools.permutations(range(group_size), 2):
                if rs[i] > rs[j]:
                    num += (a[i] - a[j]) * sp(ds[i] - ds[j])
                    den += a[i] - a[j]
            losses.append(num / den)
        else:
            best = rs.index(max(rs))
            worst = rs.index(min(rs))
            losses.append(sp(ds[best] - ds[worst]))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
@pytest.mark.parametrize("group_size", [2, 3, 4, 8])
def test_reference_matches_method_written_by_hand(objective, group_size):
    g = torch.Generator().manual_seed(group_size)
    n = 3 * group_size
    e, f = torch.rand(n, generator=g), torch.rand(n, generator=g)
    r = torch.randint(0, 3, (n,), generator=g).float()  # ties, and likely a degenerate group
    r[:group_size] = 1.0  # certainly one all-equal group
    got = loss_from_errors(e, f, r, group_size=group_size, beta=2.5, objective=objective)
    assert got.item() == pytest.approx(_by_hand(e, f, r, group_size, 2.5, objective), rel=1e-5, abs=1e-7)


def test_gpo_with_two_members_is_diffusion_dpo():
    """G=2, rewards (1, 0): gpo is -logsigmoid(beta * ((f_w - f_l) - (e_w - e_l))), averaged over pairs."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 4, 5, 5, generator=g)
    ref_pred = target + 0.9 * torch.randn(6, 4, 5, 5, generator=g)
    rewards = torch.tensor([1.0, 0.0] * 3)
    beta = 7.0
    e = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    f = ((ref_pred - target) ** 2).mean(dim=(1, 2, 3))
    e_w, e_l, f_w, f_l = e[0::2], e[1::2], f[0::2], f[1::2]
    dpo = -F.logsigmoid(beta * ((f_w - f_l) - (e_w - e_l))).mean()
    got = reference_gpo_loss(pred, target, f, rewards, group_size=2, beta=beta)
    torch.testing.assert_close(got, dpo, rtol=1e-5, atol=1e-7)
    # and the dpo objective is the same thing here
    got_dpo = reference_gpo_loss(pred, target, f, rewards, group_size=2, beta=beta, objective="dpo")
    torch.testing.assert_close(got_dpo, dpo, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beta_is_diffusers_beta_and_half_the_original_diffusion_dpo_beta(objective, dtype):
    """At G = 2 with rewards (1, 0) every objective is DPO: equal to the diffusers example at the same beta and to
    the original Diffusion-DPO code at twice it, on the errors of bf16 or fp32 predictions."""
    g = torch.Generator().manual_seed(3)
    pred, target = (torch.randn(8, 4, 6, 6, generator=g).to(dtype) for _ in range(2))
    ref_pred = (target.float() + 0.8 * torch.randn(8, 4, 6, 6, generator=g)).to(dtype)
    e = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # the errors both sides compute, in float32
    f = ((ref_pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    rewards = torch.tensor([1.0, 0.0] * 4)
    beta = 50.0
    ours = reference_gpo_loss(pred, target, f, rewards, group_size=2, beta=beta, objective=objective,
                              eps_std=0.0)
    torch.testing.assert_close(ours, diffusers_dpo(e, f, beta), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours, original_diffusion_dpo(e, f, 2 * beta), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, original_diffusion_dpo(e, f, beta), rtol=1e-3)  # the factor is real


def test_standardization_population_stats_and_degenerate_mask():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, valid = standardize_rewards(r, LossSpec(group_size=4, beta=1.0))
    # group 0: mean 0.25, population std sqrt(3)/4
    expected = (torch.tensor([1.0, 0.0, 0.0, 0.0]) - 0.25) / (3**0.5 / 4 + 1e-6)
    torch.testing.assert_close(adv[0], expected)
    assert valid.tolist() == [True, False]


@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
def test_all_degenerate_gives_zero_loss_and_zero_gradient(objective):
    pred = torch.randn(8, 3, 4, requires_grad=True)
    target = torch.randn(8, 3, 4)
    loss = reference_gpo_loss(pred, target, torch.rand(8), torch.full((8,), 0.3), group_size=4, beta=5.0,
                              objective=objective)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
def test_reference_gradcheck_float64(objective):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(6, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randn(6, 2, 3, dtype=torch.float64, generator=g)
    ref_err = torch.rand(6, dtype=torch.float64, generator=g) + 1.0
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.3, 0.3], dtype=torch.float64)  # 2nd group degenerate
    fn = lambda p: reference_gpo_loss(p, target, ref_err, rewards, group_size=3, beta=0.7,  # noqa: E731
                                      objective=objective)
    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6)


def test_gpo_gradient_coefficient_matches_method():
    """c = beta * sigmoid(beta * S) * A / n_groups (docs/method.md, Gradient)."""
    e = torch.rand(6, dtype=torch.float64, requires_grad=True)
    f = torch.rand(6, dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.9], dtype=torch.float64)
    beta = 3.0
    loss_from_errors(e, f, r, group_size=3, beta=beta).backward()
    adv, _ = standardize_rewards(r, LossSpec(group_size=3, beta=beta))
    s = (adv * (e - f).detach().view(2, 3)).sum(1, keepdim=True)
    expected = (beta * torch.sigmoid(beta * s) * adv / 2).flatten()
    torch.testing.assert_close(e.grad, expected)


# A failed reward (NaN) excludes its member: the loss is that of the groups without it.
NAN = float("nan")
EXCLUDED_REWARDS = [0.2, NAN, 0.9, 0.4, 0.7,    # one member out: a group of 4
                    NAN, 1.0, 0.0, 0.0, 0.5,    # the first member out, ties left
                    NAN, 0.3, NAN, NAN, NAN]    # one finite reward left: degenerate


@pytest.mark.parametrize("objective", ["gpo", "gpo-pairs", "dpo"])
def test_a_nan_reward_excludes_its_member_exactly(objective):
    g = torch.Generator().manual_seed(4)
    e = torch.rand(15, dtype=torch.float64, generator=g).requires_grad_(True)
    f = torch.rand(15, dtype=torch.float64, generator=g)
    r = torch.tensor(EXCLUDED_REWARDS, dtype=torch.float64)
    loss = loss_from_errors(e, f, r, group_size=5, beta=2.5, objective=objective)
    loss.backward()
    kept = torch.isfinite(r)
    kept[10:] = False  # the degenerate group contributes nothing either way
    e2 = e.detach()[kept].clone().requires_grad_(True)
    expected = loss_from_errors(e2, f[kept], r[kept], group_size=4, beta=2.5, objective=objective)
    expected.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(e.grad[kept], e2.grad)
    assert torch.equal(e.grad[~kept], torch.zeros_like(e.grad[~kept]))
    # and by hand, group by group
    assert loss.item() == pytest.approx(_by_hand(e2.detach(), f[kept], r[kept], 4, 2.5, objective), rel=1e-9)


def test_standardization_skips_nan_members():
    adv, valid = standardize_rewards(torch.tensor([1.0, NAN, 0.0, 0.0, NAN, NAN]), LossSpec(group_size=3, beta=1.0))
    expected = (torch.tensor([1.0, 0.0]) - 0.5) / (0.5 + 1e-6)
    torch.testing.assert_close(adv[0, [0, 2]], expected)
    assert adv[0, 1] == 0 and torch.isfinite(adv).all()
    assert valid.tolist() == [True, False]
