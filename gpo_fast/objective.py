"""The GPO objective family in plain PyTorch: the spec in code, and the loss contract (`LossSpec`).

docs/method.md writes the method out. The fused Triton kernels in ``gpo_fast.kernels`` are tested
against these functions, and they are what ``gpo_fast.gpo_loss`` runs where Triton does not.

Notation (flow matching; for epsilon prediction read "target" as eps):
    pred, target      (N, ...) the model's prediction and the regression target, N = P * G,
                      the G members of each of the P groups contiguous along dim 0
    e[n]              mean over the D elements of (pred - target)^2         (policy error)
    f[n]              the same error of the frozen reference                (ref_err)
    d[n] = e - f      log-ratio proxy: negative = the policy explains this image better
    A[p, i]           rewards standardized within the group (population std):
                      (r - mean_p) / (std_p + eps_std); a group with std_p < min_std is
                      degenerate and adds no loss and no gradient
    excluded members  a non-finite reward (NaN: the reward engine failed on that image) takes the
                      member out of its group: mean_p and std_p are over the other members, its
                      A is 0, it is in no pair and never best or worst, and its gradient is 0.
                      A group with fewer than two finite rewards is degenerate.
    l(z)              -log sigmoid(-beta * z) = softplus(beta * z)

Objectives, per non-degenerate group p:
    gpo        L_p = l( sum_i A_i d_i )
    gpo-pairs  L_p = sum_{r_i > r_j} (A_i - A_j) l(d_i - d_j) / sum_{r_i > r_j} (A_i - A_j)
    dpo        L_p = l(d_best - d_worst), best/worst = arg max/min reward, lowest index on ties
Total: the mean of L_p over non-degenerate groups; 0 (and a zero gradient) when there are none.

All math is float32 whatever the input dtype (float64 inputs stay float64, for gradcheck), except the reward
standardization and the comparisons of rewards, which are float64 (N scalars).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("gpo", "gpo-pairs", "dpo")
DEFAULT_EPS_STD = 1e-6
DEFAULT_MIN_STD = 1e-6




@dataclass(frozen=True)
class LossSpec:
    """What defines the loss, beside the tensors: one object from the config to the kernel.

    group_size  G, the members of a group contiguous along dim 0 (N = P * G)
    beta        the sharpness of l(z) = softplus(beta * z) (docs/method.md states its convention)
    objective   "gpo", "gpo-pairs" or "dpo"
    eps_std     added to a group's reward std before dividing
    min_std     a group whose reward std is below this is degenerate (no loss, no gradient)
    """

    group_size: int
    beta: float
    objective: str = "gpo"
    eps_std: float = DEFAULT_EPS_STD
    min_std: float = DEFAULT_MIN_STD

    def __post_init__(self):
        """ValueError naming the field that is wrong."""
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2:
            raise ValueError(f"group_size must be an integer >= 2; got {g!r}")
        b = self.beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"beta must be a finite number > 0; got {b!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not isinstance(self.eps_std, (int, float)) or not math.isfinite(self.eps_std) or self.eps_std < 0:
            raise ValueError(f"eps_std must be a finite number >= 0; got {self.eps_std!r}")
        if not isinstance(self.min_std, (int, float)) or not math.isfinite(self.min_std) or self.min_std <= 0:
            raise ValueError(f"min_std must be a finite number > 0; got {self.min_std!r}")

    @staticmethod
    def of(spec: "LossSpec | None", keywords: dict) -> "LossSpec":
        """The spec passed, or one made from keywords (group_size=..., beta=...): a call gives one of the two."""
        if spec is None:
            return LossSpec(**keywords)
        if keywords:
            raise TypeError(f"pass a LossSpec or keywords, not both (got {', '.join(keywords)} beside the spec)")
        if not isinstance(spec, LossSpec):
            raise TypeError(f"spec must be a LossSpec; got {type(spec).__name__}")
        return spec


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dims, shape (N,), float32 (or float64)."""
    dt = _math_dtype(pred)
    diff = pred.to(dt) - target.to(dt)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def standardize_rewards(rewards: torch.Tensor, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-standardized rewards A (P, G) and the mask of non-degenerate groups (P,).

    In float64 (N scalars): near-tied rewards such as (0.69970, 0.69973) keep A = (-s, +s) with a zero sum, which
    float32's rounding of the mean breaks; A is returned in the math dtype (float32, or float64 for float64 in).
    Members with a non-finite reward are excluded: the statistics are over the finite ones, their A is 0."""
    by_group = rewards.to(torch.float64).reshape(-1, spec.group_size)
    ok = torch.isfinite(by_group)
    count = ok.sum(dim=1, keepdim=True).clamp(min=1).to(by_group.dtype)
    mu = torch.where(ok, by_group, 0.0).sum(dim=1, keepdim=True) / count
    centered = torch.where(ok, by_group - mu, 0.0)
    std = (centered.pow(2).sum(dim=1, keepdim=True) / count).sqrt()
    valid = std.squeeze(1) >= spec.min_std  # min_std > 0: fewer than two finite members is degenerate
    # zero in degenerate groups (with eps_std = 0 they would be 0/0, and NaN survives a masked backward)
    advantages = torch.where(valid[:, None], centered / (std + spec.eps_std), 0.0)
    return advantages.to(_math_dtype(rewards)), valid


def _l(z: torch.Tensor, beta: float) -> torch.Tensor:
    return F.softplus(beta * z)  # = -logsigmoid(-beta * z), stable for large |beta * z|


def group_losses(d: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-group loss L_p (P,) from log-ratios d (P, G), raw rewards (P, G) and advantages (P, G)."""
    if spec.objective == "gpo":
        return _l((advantages * d).sum(dim=1), spec.beta)
    if spec.objective == "gpo-pairs":
        # pair (i, j) counts when r_i > r_j, weighted by A_i - A_j (> 0 there); NaN compares False
        ok = torch.isfinite(rewards)
        better = ok[:, :, None] & ok[:, None, :] & (rewards[:, :, None] > rewards[:, None, :])
        weight = torch.where(better, advantages[:, :, None] - advantages[:, None, :], 0.0)
        pair_loss = _l(d[:, :, None] - d[:, None, :], spec.beta)
        total_weight = weight.sum(dim=(1, 2))
        # a degenerate group has no pair: keep its (masked-out) value finite
        return (weight * pair_loss).sum(dim=(1, 2)) / torch.where(total_weight > 0, total_weight, 1.0)
    if spec.objective != "dpo":
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {spec.objective!r}")
    # dpo: argmax/argmin return the first index of the extreme value: lowest index on ties;
    # an excluded member is never the extreme of a non-degenerate group
    ok = torch.isfinite(rewards)
    best = torch.where(ok, rewards, -math.inf).argmax(dim=1, keepdim=True)
    worst = torch.where(ok, rewards, math.inf).argmin(dim=1, keepdim=True)
    z = d.gather(1, best) - d.gather(1, worst)
    return _l(z.squeeze(1), spec.beta)


def reference_gpo_loss(pred: torch.Tensor, target: torch.Tensor, ref_err: torch.Tensor, rewards: torch.Tensor,
                       spec: LossSpec | None = None, **keywords) -> torch.Tensor:
    """The GPO loss as docs/method.md writes it, differentiable by autograd; scalar float32 (float64 in,
    float64 out). The spec, or its fields as keywords (group_size=..., beta=..., objective=...)."""
    if pred.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match pred shape {tuple(pred.shape)}")
    return loss_from_errors(sample_mse(pred, target), ref_err, rewards, LossSpec.of(spec, keywords))


def loss_from_errors(policy_err: torch.Tensor, ref_err: torch.Tensor, rewards: torch.Tensor,
                     spec: LossSpec | None = None, **keywords) -> torch.Tensor:
    """The loss from per-sample errors e (N,) and f (N,). Its gradient in e is c = dL/dd (docs/method.md)."""
    spec = LossSpec.of(spec, keywords)
    if policy_err.shape[0] % spec.group_size:
        raise ValueError(f"group_size {spec.group_size} does not divide the batch size N={policy_err.shape[0]}")
    dt = _math_dtype(policy_err)
    by_group = rewards.to(torch.float64).reshape(-1, spec.group_size)  # compared and standardized in float64
    # an excluded member's d is never used; zero it so that a non-finite one cannot leak in as 0 * NaN
    d = torch.where(torch.isfinite(by_group), (policy_err.to(dt) - ref_err.to(dt)).reshape(-1, spec.group_size), 0.0)
    advantages, valid = standardize_rewards(by_group, spec)
    advantages = advantages.to(dt)
    losses = group_losses(d, by_group, advantages, spec)
    n_valid = valid.sum().clamp(min=1)
    # torch.where (not a product) so a non-finite value of a degenerate group cannot leak in
    return torch.where(valid, losses, 0.0).sum() / n_valid
