"""The fused GPO loss: policy error, log-ratio, group standardization, loss and gradient coefficients.

Forward, two launches (the group-wide reduction sits between them, docs/method.md "Gradient"):
  1. _sq_err_partials_kernel, grid (N, n_chunks): the one pass over pred and target; each program
     writes the float32 partial sum of (pred - target)^2 of its chunk.
  2. _gpo_finalize_kernel, one program: adds the partials of each sample in a fixed order (e = sum/D),
     d = e - ref_err, standardizes the rewards of each group (a non-finite reward excludes its
     member), computes every group's loss, the mean over non-degenerate groups and the per-sample
     coefficients c = dL/dd. It reads N * n_chunks + 2N floats: nothing beside the pass over pred
     and target.
Backward, one launch: grad = c[n] * (2 / D) * (pred - target) * grad_output, in pred's dtype
(_scaled_diff_kernel). Saved for backward: c (N floats), and pred and target, which exist anyway.

No host synchronisation anywhere (no .item(), no branch on data in Python), so the loss can be captured
in a CUDA graph; no atomics, so the result is bit-identical from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpo_fast.objective import LossSpec

from .mse import device_of, scaled_diff, squared_error_partials

OBJECTIVE_IDS = {"gpo": 0, "gpo-pairs": 1, "dpo": 2}


@triton.jit
def _log1p_unit(e):
    # log1p(e) for 0 <= e <= 1 as 2 atanh(s), s = e / (2 + e) <= 1/3: the odd series to s^17 leaves < 2e-10
    # relative, and there is no log of a number near 1 (whose rounding cost up to 5e-4 relative before)
    s = e / (2.0 + e)
    s2 = s * s
    q = 1.0 / 17.0
    q = q * s2 + 1.0 / 15.0
    q = q * s2 + 1.0 / 13.0
    q = q * s2 + 1.0 / 11.0
    q = q * s2 + 1.0 / 9.0
    q = q * s2 + 1.0 / 7.0
    q = q * s2 + 1.0 / 5.0
    q = q * s2 + 1.0 / 3.0
    q = q * s2 + 1.0
    return 2.0 * s * q


@triton.jit
def _softplus(x):
    # = -log(sigmoid(-x)) = max(x, 0) + log1p(exp(-|x|)); exp of -|x| only, so no overflow
    return tl.maximum(x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _standardize(rewards_ptr, n, member, is_group, eps_std, min_std):
    """Rewards r, the finite-reward mask ok, advantages A = (r - mean) / (std + eps_std) over the ok
    members, and the non-degenerate mask of a tile. A member with a non-finite reward is excluded."""
    # in float64 (N scalars): near-tied rewards keep advantages that sum to zero (float32's mean does not)
    r = tl.load(rewards_ptr + n, mask=member, other=0.0).to(tl.float64)
    ok = member & (tl.abs(r) < float("inf"))  # False for NaN and +-inf
    r = tl.where(ok, r, 0.0)
    count = tl.maximum(tl.sum(ok.to(tl.float64), axis=1), 1.0)
    mu = tl.sum(r, axis=1) / count
    centered = tl.where(ok, r - mu[:, None], 0.0)
    std = tl.sqrt(tl.sum(centered * centered, axis=1) / count)
    valid = (std >= min_std) & is_group  # min_std > 0: fewer than two ok members is degenerate
    # zero advantages in degenerate groups: with eps_std = 0 they would be 0/0
    denom = tl.where(valid, std + eps_std, 1.0)
    adv = tl.where(valid[:, None], centered / denom[:, None], 0.0).to(tl.float32)
    return r, ok, adv, valid, mu, denom


@triton.jit
def _gpo_finalize_kernel(
    partial_ptr, ref_err_ptr, rewards_ptr, loss_ptr, coef_ptr, err_ptr,
    P, NC, D, beta, eps_std, min_std,
    G: tl.constexpr, OBJECTIVE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # tiles of BLOCK_P groups x BLOCK_G members; the groups are walked in blocks so that the tiles
    # (BLOCK_P * BLOCK_G^2 elements for gpo-pairs) stay small for any number of groups
    g = tl.arange(0, BLOCK_G)[None, :]
    c3 = tl.arange(0, BLOCK_C)[None, None, :]

    # pass 1: how many groups are non-degenerate (the loss is their mean); reads only the rewards
    valid_count = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        member = (p[:, None] < P) & (g < G)
        valid = _standardize(rewards_ptr, p[:, None] * G + g, member, p < P, eps_std, min_std)[3]
        valid_count += valid.to(tl.float32)
    n_valid = tl.maximum(tl.sum(valid_count, axis=0), 1.0)

    # pass 2: errors, log-ratios, group losses and the coefficients c = dL/dd
    loss_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        member = (p[:, None] < P) & (g < G)
        n = p[:, None] * G + g

        # policy error e[n]: the partial sums of the sample, added in a fixed order
        acc = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)
        for c0 in range(0, NC, BLOCK_C):
            mask = member[:, :, None] & (c0 + c3 < NC)
            acc += tl.sum(tl.load(partial_ptr + n[:, :, None] * NC + c0 + c3, mask=mask, other=0.0), axis=2)
        e = acc / D
        f = tl.load(ref_err_ptr + n, mask=member, other=0.0).to(tl.float32)
        r, ok, adv, valid, mu, denom = _standardize(rewards_ptr, n, member, p < P, eps_std, min_std)
        d = tl.where(ok, e - f, 0.0)  # an excluded member's d never enters, even when not finite
        tl.store(err_ptr + n, e, mask=member)

        if OBJECTIVE == 0:  # gpo: l(sum_i A_i d_i)
            z = beta * tl.sum(adv * d, axis=1)
            group_loss = _softplus(z)
            dl_dd = (beta * _sigmoid(z))[:, None] * adv
        elif OBJECTIVE == 1:  # gpo-pairs: sum over r_i > r_j of (A_i - A_j) l(d_i - d_j), normalised
            # the pair tile is walked BLOCK_I rows i at a time (BLOCK_P x BLOCK_I x BLOCK_G elements), so a group of
            # 256 needs no 256 x 256 tile (its layout changes would take 256 KB of shared memory); the rows' values
            # come from memory: e from err_ptr, just written (the barrier makes it visible to every thread)
            tl.debug_barrier()
            i_ = tl.arange(0, BLOCK_I)[None, :]
            w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
            loss_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
            as_i = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)  # sum_j m_ij, for each member i
            as_j = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)  # sum_i m_ij, for each member j
            for i0 in range(0, BLOCK_G, BLOCK_I):
                row = (p[:, None] < P) & (i0 + i_ < G)
                ni = p[:, None] * G + i0 + i_
                ri = tl.load(rewards_ptr + ni, mask=row, other=0.0).to(tl.float64)  # as _standardize reads them
                oki = row & (tl.abs(ri) < float("inf"))
                ri = tl.where(oki, ri, 0.0)
                advi = tl.where(valid[:, None] & oki, (ri - mu[:, None]) / denom[:, None], 0.0).to(tl.float32)
                ei = tl.load(err_ptr + ni, mask=row, other=0.0)
                fi = tl.load(ref_err_ptr + ni, mask=row, other=0.0).to(tl.float32)
                di = tl.where(oki, ei - fi, 0.0)
                better = oki[:, :, None] & ok[:, None, :] & (ri[:, :, None] > r[:, None, :])
                w = tl.where(better, advi[:, :, None] - adv[:, None, :], 0.0)
                zij = beta * (di[:, :, None] - d[:, None, :])
                w_sum += tl.sum(tl.sum(w, axis=2), axis=1)
                loss_sum += tl.sum(tl.sum(w * _softplus(zij), axis=2), axis=1)
                m = w * (beta * _sigmoid(zij))
                # the row sums of this block, put at their members' places in the group
                at = (i0 + i_)[:, :, None] == g[:, None, :]
                as_i += tl.sum(tl.where(at, tl.sum(m, axis=2)[:, :, None], 0.0), axis=1)
                as_j += tl.sum(m, axis=1)
            w_sum = tl.where(w_sum > 0, w_sum, 1.0)
            group_loss = loss_sum / w_sum
            dl_dd = (as_i - as_j) / w_sum[:, None]  # as the i of a pair, minus as its j
        else:  # dpo: l(d_best - d_worst), lowest index on ties
            r_max = tl.max(tl.where(ok, r, float("-inf")), axis=1)
            r_min = tl.min(tl.where(ok, r, float("inf")), axis=1)
            best = tl.min(tl.where(ok & (r == r_max[:, None]), g, BLOCK_G), axis=1)
            worst = tl.min(tl.where(ok & (r == r_min[:, None]), g, BLOCK_G), axis=1)
            is_best = g == best[:, None]
            is_worst = g == worst[:, None]
            z = beta * (tl.sum(tl.where(is_best, d, 0.0), axis=1) - tl.sum(tl.where(is_worst, d, 0.0), axis=1))
            group_loss = _softplus(z)
            dl_dd = (beta * _sigmoid(z))[:, None] * (is_best.to(tl.float32) - is_worst.to(tl.float32))

        loss_acc += tl.where(valid, group_loss, 0.0)
        tl.store(coef_ptr + n, tl.where(valid[:, None] & member, dl_dd / n_valid, 0.0), mask=member)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / n_valid)


# Largest tile (elements) one finalize step holds; tests lower it to walk several group blocks.
FINALIZE_TILE = 4096
PAIR_TILE = 2048  # gpo-pairs' block of pairs (BLOCK_I x BLOCK_G), benchmarks/compile_kernels.py: no spill to G = 256


def finalize_warps(tile: int) -> int:
    """Warps for a finalize program whose largest tile holds `tile` elements (BLOCK_P * BLOCK_G, or BLOCK_P *
    BLOCK_I * BLOCK_G for gpo-pairs' block of pairs; at most FINALIZE_TILE): 4 up to 256, then 8 (16 elements of
    a 4096 tile per thread), which with PAIR_TILE keeps every variant free of register spills on sm_80-sm_90 for
    groups up to 256 (benchmarks/compile_kernels.py). A larger tile would take up to 32 warps, a block's most."""
    if tile <= 256:
        return 4
    return min(32, max(8, triton.next_power_of_2(tile) // 512))


def gpo_forward(
    pred2d: torch.Tensor, target2d: torch.Tensor, ref_err: torch.Tensor, rewards: torch.Tensor, spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (), c = dL/dd (N,), policy error e (N,)), float32, from contiguous (N, D) inputs."""
    n, d = pred2d.shape
    group_size = spec.group_size
    n_groups = n // group_size
    partials = squared_error_partials(pred2d, target2d)
    n_chunks = partials.shape[1]
    loss = torch.empty((), device=pred2d.device, dtype=torch.float32)
    coef = torch.empty(n, device=pred2d.device, dtype=torch.float32)
    policy_err = torch.empty(n, device=pred2d.device, dtype=torch.float32)
    block_g = triton.next_power_of_2(group_size)
    # gpo-pairs walks its pair tile in blocks of rows (a whole group's when it fits PAIR_TILE): several pair
    # tiles are alive at once, and with the float64 rewards a 4096-element one spilled at G = 128
    block_i = min(block_g, max(1, PAIR_TILE // block_g)) if spec.objective == "gpo-pairs" else 1
    per_group = block_i * block_g if spec.objective == "gpo-pairs" else block_g
    block_p = max(1, min(triton.next_power_of_2(n_groups), FINALIZE_TILE // per_group))
    block_c = max(1, min(triton.next_power_of_2(n_chunks), FINALIZE_TILE // (block_p * block_g)))
    warps = finalize_warps(block_p * per_group)
    # one program: occupancy does not matter, registers do; without a cap ptxas aims at 32 registers on sm_90 and
    # spills a few bytes in some variants (benchmarks/compile_kernels.py), with one it takes what the block allows
    _gpo_finalize_kernel[(1,)](
        partials, ref_err, rewards, loss, coef, policy_err,
        n_groups, n_chunks, d, float(spec.beta), float(spec.eps_std), float(spec.min_std),
        G=group_size, OBJECTIVE=OBJECTIVE_IDS[spec.objective],
        BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_I=block_i,
        num_warps=warps, maxnreg=min(255, 65536 // (32 * warps)),
    )
    return loss, coef, policy_err


class _GPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, ref_err, rewards, spec):
        n = pred.shape[0]
        pred2d = pred.contiguous().view(n, -1)
        target2d = target.contiguous().view(n, -1)
        loss, coef, policy_err = gpo_forward(pred2d, target2d, ref_err.contiguous(), rewards.contiguous(), spec)
        ctx.save_for_backward(pred2d, target2d, coef)
        ctx.pred_shape = pred.shape
        ctx.mark_non_differentiable(policy_err)
        return loss, policy_err

    @staticmethod
    def backward(ctx, grad_loss, _grad_policy_err):
        pred2d, target2d, coef = ctx.saved_tensors
        # autograd's engine runs CUDA backward on a thread already set to the tensors' device
        grad = scaled_diff(pred2d, target2d, coef, 2.0 / pred2d.shape[1], scalar_grad=grad_loss.contiguous())
        return grad.view(ctx.pred_shape), None, None, None, None


def gpo_loss_triton(pred, target, ref_err, rewards, spec: LossSpec):
    """(loss, policy_err) from the Triton kernels; arguments already checked by the caller."""
    with device_of(pred):  # Triton launches on the current CUDA device, not the tensor's
        return _GPOLoss.apply(pred, target, ref_err, rewards, spec)
