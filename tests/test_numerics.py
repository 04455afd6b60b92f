"""Exact numerics of the loss, in the reference (gpo_fast.objective) and the kernels (interpreted on a CPU, native
on CUDA): the reward standardization in float64, the kernel's softplus to 1e-6 relative over beta * z in
[-40, 40], and the per-sample coefficients c = dL/dd against a formula written independently here, in float64,
with a degenerate group and an excluded member present."""

import math

import pytest
import torch
import triton
import triton.language as tl

from gpo_fast.kernels import loss_coefficients
from gpo_fast.kernels.gpo import _softplus, gpo_forward
from gpo_fast.objective import LossSpec, standardize_rewards

OBJECTIVES = ["gpo", "gpo-pairs", "dpo"]


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, _softplus(tl.load(x_ptr + i, mask=i < N, other=0.0)), mask=i < N)


def test_the_kernels_softplus_is_accurate_to_1e6_relative_from_minus_40_to_40(kernel_device):
    x = torch.linspace(-40.0, 40.0, 8001, dtype=torch.float32)
    y = torch.empty_like(x)
    xd, yd = x.to(kernel_device), y.to(kernel_device)
    _softplus_kernel[(1,)](xd, yd, x.numel(), BLOCK=8192)
    exact = torch.nn.functional.softplus(x.double())  # of the same float32 inputs, in float64
    relative = ((yd.cpu().double() - exact).abs() / exact)
    assert relative.max().item() < 1e-6, x[relative.argmax()].item()


def _by_hand(e, f, r, G, beta, objective, eps_std=1e-6, min_std=1e-6):
    """c[n] = dL/dd[n] from docs/method.md ("The gradient"), float64, loops; a non-finite reward excludes its member."""
    n = len(e)
    stats = []
    for p in range(n // G):
        idx = [i for i in range(p * G, (p + 1) * G) if math.isfinite(r[i])]
        mu = sum(r[i] for i in idx) / max(len(idx), 1)
        sd = math.sqrt(sum((r[i] - mu) ** 2 for i in idx) / max(len(idx), 1))
        stats.append((idx, mu, sd, sd >= min_std))
    n_valid = max(sum(valid for *_, valid in stats), 1)
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    c = [0.0] * n
    for idx, mu, sd, valid in stats:
        if not valid:
            continue
        a = {i: (r[i] - mu) / (sd + eps_std) for i in idx}
        d = {i: e[i] - f[i] for i in idx}
        if objective == "gpo":
            s = sum(a[i] * d[i] for i in idx)
            for i in idx:
                c[i] = beta * sig(beta * s) * a[i] / n_valid
        elif objective == "gpo-pairs":
            pairs = [(i, j) for i in idx for j in idx if r[i] > r[j]]
            w = sum(a[i] - a[j] for i, j in pairs)
            for i, j in pairs:
                m = (a[i] - a[j]) * beta * sig(beta * (d[i] - d[j])) / w
                c[i] += m / n_valid
                c[j] -= m / n_valid
        else:
            best = max(idx, key=lambda i: (r[i], -i))
            worst = min(idx, key=lambda i: (r[i], i))
            z = d[best] - d[worst]
            c[best] += beta * sig(beta * z) / n_valid
            c[worst] -= beta * sig(beta * z) / n_valid
    return torch.tensor(c, dtype=torch.float64)


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(12, generator=g) * 0.1 + 0.5
    f = torch.rand(12, generator=g) * 0.1 + 0.5
    r = torch.tensor([0.9, 0.1, 0.4, 0.4,     # ties in a group
                      0.3, 0.3, 0.3, 0.3,     # degenerate: no loss, c = 0
                      0.2, math.nan, 0.8, 0.5])  # an excluded member
    return e, f, r


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_coefficients_of_the_reference_equal_the_independent_formula(objective):
    e, f, r = _case(0)
    spec = LossSpec(group_size=4, beta=30.0, objective=objective)
    _, c = loss_coefficients(e, f, r, spec)
    expected = _by_hand(e.double().tolist(), f.double().tolist(), r.double().tolist(), 4, 30.0, objective)
    torch.testing.assert_close(c.double(), expected, rtol=2e-5, atol=1e-6)
    assert c[4:8].eq(0).all() and c[9] == 0 and c.abs().max() > 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_coefficients_of_the_kernel_equal_the_independent_formula(kernel_device, objective):
    """The kernel's c (gpo_forward) from (pred, target) whose per-sample errors are e, against the same formula."""
    e, f, r = _case(1)
    spec = LossSpec(group_size=4, beta=30.0, objective=objective)
    target = torch.zeros(12, 16)
    pred = e.sqrt()[:, None].expand(12, 16).contiguous()  # mean of pred^2 over a row = e
    _, c, err = gpo_forward(pred.to(kernel_device), target.to(kernel_device), f.to(kernel_device),
                            r.to(kernel_device), spec)
    expected = _by_hand(err.cpu().double().tolist(), f.double().tolist(), r.double().tolist(), 4, 30.0, objective)
    torch.testing.assert_close(c.cpu().double(), expected, rtol=2e-5, atol=1e-6)
    assert c[4:8].eq(0).all() and c[9] == 0 and c.abs().max() > 0


NEAR_TIE = [0.69970, 0.69973]


def test_near_tied_rewards_standardize_to_a_zero_sum_in_the_reference():
    adv, valid = standardize_rewards(torch.tensor(NEAR_TIE), LossSpec(group_size=2, beta=1.0))
    r = torch.tensor(NEAR_TIE).double()  # the float32 rewards, standardized in float64 by hand
    sd = (r[1] - r[0]).abs() / 2
    expected = torch.stack([-sd, sd]) / (sd + 1e-6)
    torch.testing.assert_close(adv[0].double(), expected, rtol=1e-6, atol=0)
    assert adv.sum().abs().item() < 1e-7 and bool(valid[0])


def test_near_tied_rewards_give_opposite_coefficients_in_the_kernel(kernel_device):
    spec = LossSpec(group_size=2, beta=10.0)
    pred = torch.tensor([[1.0, 2.0], [1.5, 0.5]], device=kernel_device)
    target = torch.zeros(2, 2, device=kernel_device)
    _, c, _ = gpo_forward(pred, target, torch.tensor([1.0, 1.0], device=kernel_device),
                          torch.tensor(NEAR_TIE, device=kernel_device), spec)
    # gpo's c is beta * sigmoid(beta * S) * A / n_valid: opposite in a two-member group when A sums to zero
    assert abs(c[0].item() + c[1].item()) <= 1e-6 * abs(c[0].item())
