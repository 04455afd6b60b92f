"""The GPO objective family in plain PyTorch: the spec in code.

Reads next to ``shared/design/method.md``. The fused Triton kernels in ``gpo_fast.kernels`` are
tested against these functions, and they are what ``gpo_fast.gpo_loss`` runs where Triton does not.

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

All math is float32 whatever the input dtype (float64 inputs stay float64, for gradcheck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OBJECTIVES = ("gpo", "gpo-pairs", "dpo")
DEFAULT_EPS_STD = 1e-6
DEFAULT_MIN_STD = 1e-6


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dims, shape (N,), float32 (or float64)."""
    dt = _math_dtype(pred)
    diff = pred.to(dt) - target.to(dt)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def standardize_rewards(
    rewards: torch.Tensor,
    group_size: int,
    eps_std: float = DEFAULT_EPS_STD,
    min_std: float = DEFAULT_MIN_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-standardized rewards A (P, G) and the mask of non-degenerate groups (P,).

    Members with a non-finite reward are excluded: the statistics are over the finite ones, their A is 0."""
    r = rewards.to(_math_dtype(rewards)).reshape(-1, group_size)
    ok = torch.isfinite(r)
    count = ok.sum(dim=1, keepdim=True).clamp(min=1).to(r.dtype)
    mu = torch.where(ok, r, 0.0).sum(dim=1, keepdim=True) / count
    centered = torch.where(ok, r - mu, 0.0)
    std = (centered.pow(2).sum(dim=1, keepdim=True) / count).sqrt()
    valid = std.squeeze(1) >= min_std  # min_std > 0: fewer than two finite members is degenerate
    # zero in degenerate groups (with eps_std = 0 they would be 0/0, and NaN survives a masked backward)
    advantages = torch.where(valid[:, None], centered / (std + eps_std), 0.0)
    return advantages, valid


def _l(z: torch.Tensor, beta: float) -> torch.Tensor:
    return F.softplus(beta * z)  # = -logsigmoid(-beta * z), stable for large |beta * z|


def group_losses(
    d: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor, beta: float, objective: str
) -> torch.Tensor:
    """Per-group loss L_p (P,) from log-ratios d (P, G), raw rewards (P, G) and advantages (P, G)."""
    if objective == "gpo":
        return _l((advantages * d).sum(dim=1), beta)
    if objective == "gpo-pairs":
        # pair (i, j) counts when r_i > r_j, weighted by A_i - A_j (> 0 there); NaN compares False
        ok = torch.isfinite(rewards)
        better = ok[:, :, None] & ok[:, None, :] & (rewards[:, :, None] > rewards[:, None, :])
        weight = torch.where(better, advantages[:, :, None] - advantages[:, None, :], 0.0)
        pair_loss = _l(d[:, :, None] - d[:, None, :], beta)
        total_weight = weight.sum(dim=(1, 2))
        # a degenerate group has no pair: keep its (masked-out) value finite
        return (weight * pair_loss).sum(dim=(1, 2)) / torch.where(total_weight > 0, total_weight, 1.0)
    if objective == "dpo":
        # argmax/argmin return the first index of the extreme value: lowest index on ties;
        # an excluded member is never the extreme of a non-degenerate group
        ok = torch.isfinite(rewards)
        best = torch.where(ok, rewards, -math.inf).argmax(dim=1, keepdim=True)
        worst = torch.where(ok, rewards, math.inf).argmin(dim=1, keepdim=True)
        z = d.gather(1, best) - d.gather(1, worst)
        return _l(z.squeeze(1), beta)
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")


def reference_gpo_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_err: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    beta: float,
    objective: str = "gpo",
    eps_std: float = DEFAULT_EPS_STD,
    min_std: float = DEFAULT_MIN_STD,
) -> torch.Tensor:
    """The GPO loss as method.md writes it, differentiable by autograd. Scalar float32."""
    check_gpo_args(
        pred, target, ref_err, rewards, group_size, beta, objective, eps_std, min_std,
        pred_dtypes=KERNEL_DTYPES + (torch.float64,),
    )
    return loss_from_errors(
        sample_mse(pred, target), ref_err, rewards,
        group_size=group_size, beta=beta, objective=objective, eps_std=eps_std, min_std=min_std,
    )


def loss_from_errors(
    policy_err: torch.Tensor,
    ref_err: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    beta: float,
    objective: str = "gpo",
    eps_std: float = DEFAULT_EPS_STD,
    min_std: float = DEFAULT_MIN_STD,
) -> torch.Tensor:
    """The loss from per-sample errors e (N,) and f (N,). Its gradient in e is c = dL/dd (method.md)."""
    dt = _math_dtype(policy_err)
    r = rewards.to(dt).reshape(-1, group_size)
    # an excluded member's d is never used; zero it so that a non-finite one cannot leak in as 0 * NaN
    d = torch.where(torch.isfinite(r), (policy_err.to(dt) - ref_err.to(dt)).reshape(-1, group_size), 0.0)
    advantages, valid = standardize_rewards(r, group_size, eps_std, min_std)
    losses = group_losses(d, r, advantages, beta, objective)
    n_valid = valid.sum().clamp(min=1)
    # torch.where (not a product) so a non-finite value of a degenerate group cannot leak in
    return torch.where(valid, losses, 0.0).sum() / n_valid


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_pred_target(pred, target, pred_dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> None:
    """ValueError naming the argument when pred / target are not same-shape float tensors on one device."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in pred_dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in pred_dtypes)
            raise ValueError(f"{name} has unsupported dtype {t.dtype}; use one of {allowed}")
    if pred.dim() < 1 or pred.numel() == 0:
        raise ValueError(f"pred must be non-empty with the batch on dim 0; got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match pred shape {tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")


def check_gpo_args(
    pred, target, ref_err, rewards, group_size, beta, objective, eps_std, min_std,
    pred_dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES,
) -> None:
    """Raise a ValueError naming the argument that is wrong. Host-side metadata only: no sync."""
    check_pred_target(pred, target, pred_dtypes)
    for name, t in (("ref_err", ref_err), ("rewards", rewards)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype} (convert with .float())")
    n = pred.shape[0]
    for name, t in (("ref_err", ref_err), ("rewards", rewards)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) (one value per sample); got {tuple(t.shape)}")
    for name, t in (("ref_err", ref_err), ("rewards", rewards)):
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device} but pred is on {pred.device}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2; got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the batch size N={n} (N = prompts * group_size)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0; got {beta!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if not isinstance(eps_std, (int, float)) or not math.isfinite(eps_std) or eps_std < 0:
        raise ValueError(f"eps_std must be a finite number >= 0; got {eps_std!r}")
    if not isinstance(min_std, (int, float)) or not math.isfinite(min_std) or min_std <= 0:
        raise ValueError(f"min_std must be a finite number > 0; got {min_std!r}")
