"""One GPO update: noise shared within each group, the reference's errors, the policy pass, the fused loss,
backward (docs/method.md). The optimizer and its learning-rate schedule are made here too.

    one noise level s_p and one noise eps_p per group, shared by its G members
    x_s = (1 - s) x0 + s eps, u = eps - x0
    ref_err = sample_mse(reference(x_s), u)      under no_grad, adapter disabled, freed at once
    loss = gpo_loss(policy(x_s), u, ref_err, rewards, spec)   -> backward

Group-exact micro-batching (train.micro_batch < N), the same gradient as the whole batch at once:
- micro-batches of whole groups (micro_batch a multiple of G): the fused loss per micro-batch, weighted by
  its share of the non-degenerate groups; one policy pass per sample, as without micro-batching;
- micro-batches that cut through groups: all policy errors first without grad, the coefficients
  c = dL/de from them (gpo_fast.kernels.loss_coefficients), then forward + backward per micro-batch on
  sum(c * e) with c fixed: one extra policy forward.
"""

from __future__ import annotations

import contextlib
import math

import torch

from gpo_fast.config import Config, TrainSection
from gpo_fast.kernels import LossSpec, gpo_loss, loss_coefficients, sample_mse, valid_groups
from gpo_fast.models.base import DiffusionModel


def loss_spec(config: Config) -> LossSpec:
    """The loss contract of a config: every key that defines the loss, in one object."""
    t = config.train
    g = config.rollout.group_size
    return LossSpec(group_size=g, beta=t.beta / g if t.beta_per_member else t.beta, objective=t.objective,
                    eps_std=t.eps_std, min_std=t.min_std)


def draw_sigmas(n: int, train: TrainSection, schedule: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n,) noise levels in [sigma_min, sigma_max] from the configured distribution; `schedule` is the
    sampler's (steps + 1,) noise levels, used by sigma_dist = "schedule"."""
    if train.sigma_dist == "logit-normal":
        s = torch.sigmoid(torch.randn(n, generator=generator))
    elif train.sigma_dist == "uniform":
        s = torch.rand(n, generator=generator)
    else:  # the sampler's own noise levels
        grid = schedule[:-1].float().cpu()
        s = grid[torch.randint(0, len(grid), (n,), generator=generator)]
    return s.clamp(train.sigma_min, train.sigma_max)


def group_noise(x0: torch.Tensor, group_size: int, train: TrainSection, schedule: torch.Tensor,
                generator: torch.Generator, shard: tuple[int, int] = (0, 1)):
    """x_s, u and s per sample, with s and eps shared within each group (members differ only by x0).
    shard = (rank, world): x0 holds this rank's groups; all ranks draw every group's noise, keep theirs."""
    rank, world = shard
    n_groups = x0.shape[0] // group_size
    every_s = draw_sigmas(n_groups * world, train, schedule, generator)
    every_eps = torch.randn((n_groups * world, *x0.shape[1:]), generator=generator)
    mine = slice(rank * n_groups, (rank + 1) * n_groups)
    s = every_s[mine].repeat_interleave(group_size).to(x0.device)
    eps = every_eps[mine].repeat_interleave(group_size, 0).to(x0.device)
    s_ = s.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s_) * x0 + s_ * eps, eps - x0, s


def implicit_reward_accuracy(d: torch.Tensor, rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of ordered pairs r_i > r_j within groups where the policy prefers i (d_i < d_j)."""
    d, rewards = d.view(-1, group_size), rewards.view(-1, group_size)
    ok = torch.isfinite(rewards)  # an excluded member is in no pair
    better = ok[:, :, None] & ok[:, None, :] & (rewards[:, :, None] > rewards[:, None, :])
    n = better.sum().item()
    return float("nan") if n == 0 else ((d[:, :, None] < d[:, None, :]) & better).sum().item() / n


def degenerate_fraction(rewards: torch.Tensor, spec: LossSpec) -> float:
    """Fraction of groups without loss: all finite rewards equal (or fewer than two finite)."""
    return (~valid_groups(rewards, spec)).float().mean().item()


def make_optimizer(params, train: TrainSection):
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0)


def make_ema(params, decay: float, warmup: bool = True):
    """diffusers' EMAModel of the trained weights, or None for decay 0. With warmup its decay after the n-th
    update is (1 + n) / (10 + n) up to `decay` (diffusers' default); without, `decay` from the second update on
    (the first copies the weights)."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, min_decay=0.0 if warmup else decay)


@contextlib.contextmanager
def swapped_in(ema, params):
    """Inside the block `params` hold the moving average `ema` keeps of them; after it, their own values.

    The tensors are swapped where they are, not copied: diffusers' EMAModel.store copies every parameter to the
    CPU and restore() back (about 10 GB per update for a full fine-tune of SD3.5 Medium). A shadow of another
    shape, dtype or device than its parameter (none is, as make_ema builds them) is copied on the device instead."""
    params = list(params)
    pairs = list(zip(params, ema.shadow_params))
    swap = all(s.shape == p.shape and s.dtype == p.dtype and s.device == p.device for p, s in pairs)
    saved = None
    if swap:
        for p, s in pairs:
            p.data, s.data = s.data, p.data
    else:
        saved = [p.detach().clone() for p in params]
        ema.copy_to(params)
    try:
        yield
    finally:
        if swap:
            for p, s in pairs:
                p.data, s.data = s.data, p.data
        else:
            for p, v in zip(params, saved):
                p.data.copy_(v)


def make_schedule(opt, train: TrainSection, total_updates: int):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / train.warmup_updates) if train.warmup_updates else 1.0
        if train.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_updates) / total_updates))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def gpo_update(model: DiffusionModel, x0, prompts: list[str], rewards, config: Config, generator, dist=None,
               reference=None) -> dict:
    """One inner update's forward and backward (no optimizer step). Returns per-update stats.

    reference: a context manager inside which the model predicts as the reference (train.reference_decay: the
    moving average of the trained weights swapped in); None: the frozen base, `model.reference()`.

    With several processes (`dist`), the loss is scaled by this rank's share of the non-degenerate
    groups, so that gradients summed across ranks are those of the one-process loss."""
    spec = loss_spec(config)
    shard = (dist.rank, dist.world) if dist is not None else (0, 1)
    schedule = model.schedule(config.rollout.steps, config.rollout.solver)  # sigma_dist = "schedule" draws from it
    x_s, u, s = group_noise(x0, spec.group_size, config.train, schedule, generator, shard)
    valid = valid_groups(rewards, spec)  # known from the rewards, before any forward
    scale = 1.0
    if dist is not None and dist.world > 1:
        n_valid = valid.sum().float()
        scale = (n_valid / dist.sum(n_valid).clamp(min=1.0)).item()
    embeds = model.encode_prompts(prompts)
    loss, policy_err, ref_err, passes = forward_backward(model, x_s, s, u, embeds, rewards, spec,
                                                         config.train.micro_batch, scale, valid.tolist(), reference)
    d = policy_err - ref_err
    return {"loss": loss.item() * scale, "mean_abs_d": d.abs().mean().item(),
            "implicit_acc": implicit_reward_accuracy(d, rewards, spec.group_size), **passes}


def forward_backward(model: DiffusionModel, x_s, s, u, embeds, rewards, spec: LossSpec, micro_batch: int,
                     scale: float, valid: list[bool], reference=None):
    """The reference errors, the policy passes and the backward of one update: (loss, policy errors, reference
    errors, passes); `passes` counts the samples through a forward alone (`forward_samples`) and through a forward
    and backward (`train_samples`), for gpo_fast.flops. Every branch is on Python values (`valid`: the
    non-degenerate groups), none on tensor data, so gpo_fast.plan runs this same code on fake tensors."""
    n = x_s.shape[0]
    mb = micro_batch if 0 < micro_batch < n else n
    chunks = [slice(i, i + mb) for i in range(0, n, mb)]
    with torch.no_grad(), (model.reference() if reference is None else reference):  # each prediction dies at once
        ref_err = torch.cat([sample_mse(model.predict(x_s[c], s[c], embeds[c]), u[c]) for c in chunks])
    if mb % spec.group_size == 0:  # whole groups per pass (the whole batch included): the fused loss per chunk
        loss, policy_err, trained = _whole_group_passes(model, x_s, s, u, embeds, ref_err, rewards, spec, chunks,
                                                        scale, valid)
        passes = {"forward_samples": 2 * n - trained, "train_samples": trained}
    else:  # a pass cuts through groups: every policy error first, then the coefficients of the whole batch
        with torch.no_grad():
            policy_err = torch.cat([sample_mse(model.predict(x_s[c], s[c], embeds[c]), u[c]) for c in chunks])
        loss, coef = loss_coefficients(policy_err, ref_err, rewards, spec)
        for c in chunks:
            pred = model.predict(x_s[c], s[c], embeds[c])
            (scale * coef[c] * sample_mse(pred, u[c])).sum().backward()
        passes = {"forward_samples": 2 * n, "train_samples": n}
    return loss, policy_err, ref_err, passes


def _whole_group_passes(model, x_s, s, u, embeds, ref_err, rewards, spec: LossSpec, chunks: list[slice], scale: float,
                        valid: list[bool]):
    """The loss over micro-batches that hold whole groups: a group's loss needs only its own members, so each
    chunk runs the fused loss once, weighted by its share of the non-degenerate groups (known from the rewards
    before any forward). A chunk without a non-degenerate group has no gradient: its errors are taken under
    no_grad (for the logged statistics) and nothing is kept for a backward. Same gradient as the whole batch
    (a zero one, as before, when no group has a loss). Returns (loss, policy errors, samples trained on)."""
    n_valid = max(sum(valid), 1)
    loss, errors, trained = torch.zeros((), device=ref_err.device), [], 0
    for c in chunks:
        in_chunk = sum(valid[c.start // spec.group_size:c.stop // spec.group_size])
        share = in_chunk / n_valid
        if not in_chunk:
            with torch.no_grad():
                errors.append(sample_mse(model.predict(x_s[c], s[c], embeds[c]), u[c]))
            continue
        chunk_loss, err = gpo_loss(model.predict(x_s[c], s[c], embeds[c]), u[c], ref_err[c], rewards[c], spec,
                                   return_policy_err=True)
        (chunk_loss * (share * scale)).backward()
        loss = loss + chunk_loss.detach() * share
        errors.append(err)
        trained += x_s[c].shape[0]
    if not any(valid):  # no group has a loss: a zero gradient, as a backward of the zero loss would give
        for p in model.trainable_parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    return loss, torch.cat(errors), trained
