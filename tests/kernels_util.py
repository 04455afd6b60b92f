"""Shared test inputs for the kernel tests."""

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
