"""Shared test inputs for the kernel tests, and the check that two float32 gradients are the same."""

import torch


def make_batch(n, shape, dtype, device, seed):
    """pred, target (n, *shape) in dtype; ref_err and rewards (n,) float32, distinct rewards."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, *shape, generator=g)
    pred = target + 0.5 * torch.randn(n, *shape, generator=g)
    ref_pred = target + 0.5 * torch.randn(n, *shape, generator=g)
    ref_err = (ref_pred - target).pow(2).reshape(n, -1).mean(1)
    rewards = torch.rand(n, generator=g)
    return dict(pred=pred.to(dtype).to(device), target=target.to(dtype).to(device),
                ref_err=ref_err.to(device), rewards=rewards.to(device))


def assert_same_gradient(actual, expected):
    """Two float32 gradients of the same loss taken in different batch splits: equal up to float sums in
    another order. CPU matmuls block differently by batch size, and the loss's log-ratio (policy error minus
    reference error) cancels most digits, so a split moves a gradient by up to ~2e-5 of its largest entry
    (measured on an AMD EPYC and an Intel Xeon); a wrong split or weight moves it by a large fraction."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item() + 1e-12)
