"""The GPO self-improvement loop (shared/design/method.md, steps 1-6), top to bottom.

    for each rollout:
        P prompts -> G images each from the current policy (Euler ODE, CFG) -> rewards
        for each inner update:
            one noise level s_p and one noise eps_p per group, shared by its G members
            x_s = (1 - s) x0 + s eps, u = eps - x0
            ref_err = sample_mse(reference(x_s), u)      under no_grad, adapter disabled, freed at once
            loss = gpo_loss(policy(x_s), u, ref_err, rewards)   -> backward -> clip -> optimizer step
    evaluate on held-out seeds before, every `eval.every` rollouts (on validation seeds, to keep the
    best adapter) and after (the best adapter on the held-out seeds).

Group-exact micro-batching (train.micro_batch < N): all policy errors first without grad, the
coefficients c = dL/dd from them, then forward + backward per micro-batch on sum(c * e) with c
detached: the same gradient as the whole batch at once, for one extra forward.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpo_fast.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gpo_fast.components import build_model, build_prompts, build_reward, resolve_device
from gpo_fast.config import Config, dump_config, resume_conflicts
from gpo_fast.distributed import Dist
from gpo_fast.evaluate import evaluate_prompts, evaluate_toy
from gpo_fast.kernels import gpo_loss, sample_mse
from gpo_fast.models.base import DiffusionModel
from gpo_fast.objective import loss_from_errors, standardize_rewards
from gpo_fast.prompts import write_jsonl
from gpo_fast.sampling import rollout


class TrainingDiverged(RuntimeError):
    """Too many non-finite updates in a row; the message says what to do."""


@dataclass
class RunResult:
    summary: dict
    history: list[dict] = field(default_factory=list)
    model: object = None  # the trained policy (the kept adapter loaded)


def draw_sigmas(n: int, cfg, schedule: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n,) noise levels in [sigma_min, sigma_max] from the configured distribution; `schedule` is the
    sampler's (steps + 1,) noise levels, used by sigma_dist = "schedule"."""
    if cfg.sigma_dist == "logit-normal":
        s = torch.sigmoid(torch.randn(n, generator=generator))
    elif cfg.sigma_dist == "uniform":
        s = torch.rand(n, generator=generator)
    else:  # the sampler's own noise levels
        grid = schedule[:-1].float().cpu()
        s = grid[torch.randint(0, len(grid), (n,), generator=generator)]
    return s.clamp(cfg.sigma_min, cfg.sigma_max)


def group_noise(x0: torch.Tensor, group_size: int, cfg, schedule: torch.Tensor, generator: torch.Generator,
                shard: tuple[int, int] = (0, 1)):
    """x_s, u and s per sample, with s and eps shared within each group (members differ only by x0).
    shard = (rank, world): x0 holds this rank's groups; all ranks draw every group's noise, keep theirs."""
    rank, world = shard
    n_groups = x0.shape[0] // group_size
    every_s = draw_sigmas(n_groups * world, cfg, schedule, generator)
    every_eps = torch.randn((n_groups * world, *x0.shape[1:]), generator=generator)
    mine = slice(rank * n_groups, (rank + 1) * n_groups)
    s = every_s[mine].repeat_interleave(group_size).to(x0.device)
    eps = every_eps[mine].repeat_interleave(group_size, 0).to(x0.device)
    s_ = s.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s_) * x0 + s_ * eps, eps - x0, s


def implicit_reward_accuracy(d: torch.Tensor, rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of ordered pairs r_i > r_j within groups where the policy prefers i (d_i < d_j)."""
    d, r = d.view(-1, group_size), rewards.view(-1, group_size)
    ok = torch.isfinite(r)  # an excluded member is in no pair
    better = ok[:, :, None] & ok[:, None, :] & (r[:, :, None] > r[:, None, :])
    n = better.sum().item()
    return float("nan") if n == 0 else ((d[:, :, None] < d[:, None, :]) & better).sum().item() / n


def make_optimizer(params, cfg):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def make_schedule(opt, cfg, total_updates: int):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_updates) if cfg.warmup_updates else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_updates) / total_updates))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def gpo_update(model: DiffusionModel, x0, prompts: list[str], rewards, config: Config, generator, dist=None) -> dict:
    """One inner update's forward and backward (no optimizer step). Returns per-update stats.

    With several processes (`dist`), the loss is scaled by this rank's share of the non-degenerate
    groups, so that gradients summed across ranks are those of the one-process loss."""
    t, r = config.train, config.rollout
    shard = (dist.rank, dist.world) if dist is not None else (0, 1)
    x_s, u, s = group_noise(x0, r.group_size, t, model.schedule(r.steps), generator, shard)
    scale = 1.0
    if dist is not None and dist.world > 1:
        valid = standardize_rewards(rewards, r.group_size, t.eps_std, t.min_std)[1].sum().float()
        scale = (valid / dist.sum(valid).clamp(min=1.0)).item()
    embeds = model.encode_prompts(prompts)
    loss_kw = dict(group_size=r.group_size, beta=t.beta, objective=t.objective, eps_std=t.eps_std, min_std=t.min_std)
    n = x0.shape[0]
    mb = t.micro_batch if 0 < t.micro_batch < n else n
    with torch.no_grad(), model.reference() as reference:  # each reference prediction dies at once
        ref_err = torch.cat([sample_mse(reference.predict(x_s[i:i + mb], s[i:i + mb], embeds[i:i + mb]), u[i:i + mb])
                             for i in range(0, n, mb)])
    if mb == n:
        loss, policy_err = gpo_loss(model.predict(x_s, s, embeds), u, ref_err, rewards, return_policy_err=True,
                                    **loss_kw)
        (loss * scale).backward()
    else:
        with torch.no_grad():
            policy_err = torch.cat([sample_mse(model.predict(x_s[i:i + mb], s[i:i + mb], embeds[i:i + mb]),
                                               u[i:i + mb]) for i in range(0, n, mb)])
        e = policy_err.clone().requires_grad_(True)
        loss = loss_from_errors(e, ref_err, rewards, **loss_kw)
        (coef,) = torch.autograd.grad(loss, e)
        for i in range(0, n, mb):
            pred = model.predict(x_s[i:i + mb], s[i:i + mb], embeds[i:i + mb])
            (scale * coef[i:i + mb] * sample_mse(pred, u[i:i + mb])).sum().backward()
    d = policy_err - ref_err
    return {"loss": loss.item() * scale, "mean_abs_d": d.abs().mean().item(),
            "implicit_acc": implicit_reward_accuracy(d, rewards, r.group_size)}


# the loop's guard counters, carried in checkpoints so that a resumed run counts on
COUNTERS = ("skipped_updates", "bad_updates_in_a_row", "degenerate_streak")


def degenerate_fraction(rewards: torch.Tensor, group_size: int, min_std: float) -> float:
    """Fraction of groups without loss: all finite rewards equal (or fewer than two finite)."""
    return (~standardize_rewards(rewards, group_size, min_std=min_std)[1]).float().mean().item()


def train(config: Config, log=print, progress=None, on_update=None, resume: Path | None = None) -> RunResult:
    """Run GPO as configured; writes the run folder and returns the summary.

    progress(row) is called after each rollout with its metrics row; on_update(done) after each update.
    resume: a checkpoint folder (run/checkpoints/rollout-N) to continue from exactly.
    """
    from torch.utils.tensorboard import SummaryWriter

    out = Path(config.out)
    start = time.time()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    dist = Dist.from_env()  # one process, or one per GPU under `accelerate launch`
    main = dist.is_main
    if config.rollout.prompts % dist.world:
        raise ValueError(f"rollout.prompts ({config.rollout.prompts}) must be a multiple of the number of "
                         f"processes ({dist.world}): each process takes whole groups")
    device = dist.device(resolve_device(config))
    # bf16 autocast on a GPU; float32 on the CPU
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    # what can fail on bad input (a checkpoint, a prompt file, weights, the model path) fails before anything
    # is written
    if resume is not None:
        ck = load_checkpoint(resume)
        if "config" in ck:  # config.toml edited by hand since the checkpoint was written
            conflicts = resume_conflicts(Config.model_validate(ck["config"]), config)
            if conflicts:
                raise CheckpointError(f"checkpoint {resume} was written with other values of {', '.join(conflicts)}, "
                                      "which change the training's math; put them back in config.toml or start a "
                                      "new run")
    train_prompts, eval_prompts = build_prompts(config)  # a prompt file is checked against the COCO classes
    reward_fn = build_reward(config, device)
    if hasattr(reward_fn, "load"):  # missing detector / OCR weights: say so now
        reward_fn.load()
    classes = list(getattr(reward_fn, "names", {}).values()) or None  # a prompt's class must be the detector's
    if classes and config.data.prompts not in ("toy", "counting", "text"):
        train_prompts, eval_prompts = build_prompts(config, classes=classes)
    model = build_model(config, device, prompts=[p.text for p in train_prompts + eval_prompts])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "config.toml", dump_config(config))
    if main and config.model.kind != "toy":  # the prompts of this run, for the record
        write_jsonl(train_prompts + eval_prompts, out / "prompts.jsonl",
                    ["train"] * len(train_prompts) + ["eval"] * len(eval_prompts))
    params = model.trainable_parameters()
    opt = make_optimizer(params, config.train)
    total_updates = config.train.rollouts * config.train.inner_updates
    sched = make_schedule(opt, config.train, total_updates)
    ev, ro = config.eval, config.rollout

    def evaluate(seed: int):
        model.eval()
        with amp():
            if config.model.kind == "toy":
                return evaluate_toy(model, n_samples=ev.samples, steps=ev.steps, cfg_scale=ev.cfg_scale, seed=seed)
            return evaluate_prompts(model, reward_fn, eval_prompts, n_samples=ev.samples, steps=ev.steps,
                                    cfg_scale=ev.cfg_scale, seed=seed, batch_size=ro.batch_size)

    select_seed = ev.seed + 1  # validation seeds pick the best adapter; ev.seed measures it
    history, updates, first = [], 0, 1
    if resume is not None:  # every piece of state as it was after the checkpoint's rollout
        _load_trained_state(model, ck["trainable"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"], gen)
        updates, first = ck["updates"], ck["rollout"] + 1
        before, before_images, best = ck["before"], ck["before_images"], ck["best"]
        history = _metrics_until(out / "metrics.jsonl", ck["rollout"]) if main else []
        log(f"resumed from {resume} (rollout {ck['rollout']}, {updates} updates)")
    if main:  # rank 0 evaluates and writes; the others wait at the next collective
        if resume is None:
            before, before_images = evaluate(ev.seed)
            before_images = before_images[:50]  # all a grid shows; the rest would sit in memory all run
            log(f"before: accuracy {before['accuracy']:.3f} +- {before['accuracy_stderr']:.3f} on {ev.samples} "
                "held-out samples")
            best = _snapshot(model, 0, evaluate(select_seed)[0]["accuracy"]) if ev.every else None
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=first)  # a resumed run drops later events
        metrics_file = (out / "metrics.jsonl").open("a" if resume is not None else "w")
    mine = dist.shard(ro.prompts)  # this process's groups
    rnd = first - 1
    skipped = bad_in_a_row = degenerate_streak = 0
    if resume is not None:  # a resumed run goes on counting
        counters = ck.get("counters", {})
        skipped, bad_in_a_row, degenerate_streak = (counters.get(k, 0) for k in COUNTERS)
        if main and ev.every and best is None:  # validation switched on at the resume: start from here
            best = _snapshot(model, ck["rollout"], evaluate(select_seed)[0]["accuracy"])
    for rnd in range(first, config.train.rollouts + 1):
        t0 = time.time()
        # every process draws the global prompts and noise (same generator), then keeps its groups
        idx = torch.randint(0, len(train_prompts), (ro.prompts,), generator=gen)
        noise = torch.randn((ro.prompts * ro.group_size, *model.latent_shape), generator=gen)
        prompts = [train_prompts[i] for i in idx][mine]
        noise = noise[mine.start * ro.group_size:mine.stop * ro.group_size]
        per_sample = [p for p in prompts for _ in range(ro.group_size)]
        texts = [p.text for p in per_sample]
        model.eval()
        with amp():
            _, x0, images = rollout(model, [p.text for p in prompts], ro.group_size, steps=ro.steps,
                                    cfg_scale=ro.cfg_scale, generator=gen, batch_size=ro.batch_size, noise=noise)
        x0 = x0.float()
        scored = reward_fn.measure(images.float().cpu(), per_sample)
        failed = int(dist.sum((~torch.isfinite(scored.reward)).sum()))
        # a NaN reward (the engine failed on that image) excludes its member from its group in the loss
        rewards = scored.reward.float().to(x0.device)
        del images
        stats = []
        for _ in range(config.train.inner_updates):
            opt.zero_grad(set_to_none=True)
            model.train()
            with amp():
                stats.append(gpo_update(model, x0, texts, rewards, config, gen, dist))
            dist.sum_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip).item()
            if not (math.isfinite(stats[-1]["loss"]) and math.isfinite(grad_norm)):
                # a non-finite loss or gradient: skip the update (the weights and optimizer stay as they were)
                opt.zero_grad(set_to_none=True)
                skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row >= config.train.max_bad_updates:
                    raise TrainingDiverged(
                        f"the loss or gradient was not finite in {bad_in_a_row} updates in a row (rollout {rnd}); the "
                        f"weights were not changed by them and the checkpoints in {out / 'checkpoints'} are intact: "
                        "lower train.lr or train.beta and resume or restart")
                continue
            bad_in_a_row = 0
            opt.step()
            sched.step()
            updates += 1
            if on_update is not None:
                on_update(updates)
        every_reward = dist.gather(rewards.float().cpu())
        finite = every_reward[torch.isfinite(every_reward)]  # the members scored
        row = {
            "rollout": rnd, "updates": updates,
            "loss": float(dist.sum(torch.tensor(sum(s["loss"] for s in stats) / len(stats)))),
            "reward_mean": finite.mean().item() if finite.numel() else math.nan,
            "reward_std": finite.std(unbiased=False).item() if finite.numel() else math.nan,
            "accuracy": dist.gather(scored.correct.float().cpu()).mean().item(),
            "degenerate_fraction": degenerate_fraction(every_reward, ro.group_size, config.train.min_std),
            "implicit_acc": _nanmean([s["implicit_acc"] for s in stats]),
            "mean_abs_d": sum(s["mean_abs_d"] for s in stats) / len(stats),
            "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], "step_seconds": time.time() - t0,
            "reward_failures": failed, "skipped_updates": skipped,
        }
        history.append(row)
        degenerate_streak = degenerate_streak + 1 if row["degenerate_fraction"] >= 0.9 else 0
        if degenerate_streak == 5 and failed:
            log(f"warning: for 5 rollouts at least 90% of the groups had no loss, and the reward engine failed on "
                f"{failed} of the {len(every_reward)} images of rollout {rnd}: check the engine with `gpo-fast doctor`")
        elif degenerate_streak == 5:
            log(f"warning: for 5 rollouts at least 90% of the groups had all-equal rewards (degenerate: no loss, no "
                "gradient); the model gets every image right or every image wrong on these prompts: use easier or "
                "harder prompts, a larger rollout.group_size, or reward.partial_credit")
        if main:
            if ev.every and rnd % ev.every == 0:
                metrics, val_images = evaluate(select_seed)
                acc = row["val_accuracy"] = metrics["accuracy"]
                _save_grid(val_images[:50], out / "samples" / f"rollout-{rnd:05d}.png")
                if acc > best["accuracy"]:
                    best = _snapshot(model, rnd, acc)
            metrics_file.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                                           for k, v in row.items()}) + "\n")
            metrics_file.flush()
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, rnd)
            if progress is not None:
                progress(row)
            every = config.train.checkpoint_every
            if every and rnd % every == 0 and rnd < config.train.rollouts:
                save_checkpoint(out, rnd, {
                    "rollout": rnd, "updates": updates,
                    "trainable": {k: v for k, v in model.named_parameters() if v.requires_grad},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(gen),
                    "before": before, "before_images": before_images, "best": best,
                    "config": config.model_dump(mode="json"),
                    "counters": dict(zip(COUNTERS, (skipped, bad_in_a_row, degenerate_streak))),
                }, keep=config.train.keep_checkpoints)
        over = main and bool(config.train.time_budget_s) and time.time() - start > config.train.time_budget_s
        if dist.sum(torch.tensor(float(over))) > 0:  # every process stops after the same rollout
            log(f"time budget of {config.train.time_budget_s:.0f} s reached after {rnd} rollouts")
            break
    if not main:  # rank 0 keeps the best weights, saves and measures them
        dist.barrier()
        return RunResult({}, history, model)
    metrics_file.close()

    if ev.every:  # a last look at the final weights, then keep the best on the validation seeds
        acc = evaluate(select_seed)[0]["accuracy"]
        if acc > best["accuracy"]:
            best = _snapshot(model, rnd, acc)
        _load_trained_state(model, best["state"])
    else:  # no validation: the final weights
        best = {"rollout": rnd}
    if config.lora.enabled:
        model.save_adapter(out / "adapter")
    else:
        model.save_pretrained(out / "model")
    after, after_images = evaluate(ev.seed)
    gain = after["accuracy"] - before["accuracy"]
    gain_se = math.sqrt(before["accuracy_stderr"] ** 2 + after["accuracy_stderr"] ** 2)
    summary = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "gain": gain, "gain_ci95": [gain - 1.96 * gain_se, gain + 1.96 * gain_se],
        "best_rollout": best["rollout"], "rollouts": rnd, "steps": updates,
        "wall_seconds": time.time() - start, "objective": config.train.objective, "seed": config.seed,
        "eval_samples": ev.samples, "eval_before": before, "eval_after": after,
    }
    if config.model.kind == "toy":  # the toy world also reports the lenient counter and blank images
        summary.update({
            "accuracy_lenient_before": before["accuracy_lenient"], "accuracy_lenient_after": after["accuracy_lenient"],
            "blank_before": before["blank_fraction"], "blank_after": after["blank_fraction"]})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    _save_plots(out, before_images, after_images, history)
    dist.barrier()
    return RunResult(summary, history, model)


def _metrics_until(path: Path, rollout: int) -> list[dict]:
    """The metrics rows up to `rollout`, and the file cut back to them (a resumed run rewrites the rest)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if r["rollout"] <= rollout]
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _write_atomic(path: Path, text: str) -> None:
    """Replace path's content so that a kill at any moment leaves the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _nanmean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _snapshot(model, rollout: int, accuracy: float) -> dict:
    """A copy of the trained weights (the adapter, or the transformer when fully fine-tuned)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters() if v.requires_grad}  # off the GPU
    return {"rollout": rollout, "accuracy": accuracy, "state": state}


def _load_trained_state(model, state: dict) -> None:
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in state:
                v.copy_(state[k])


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """Images in [-1, 1] as a 10-wide grid of thumbnails: tiny images upscaled (nearest, so single
    pixels stay visible), large ones shrunk to 128 px."""
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.detach().float().cpu() + 1) / 2
    side = x.shape[-1]
    if side < 64:
        x = torch.nn.functional.interpolate(x, scale_factor=64 // side, mode="nearest")
    elif side > 128:
        x = torch.nn.functional.interpolate(x, size=(128, 128), mode="area")
    save_image(make_grid(x, nrow=10, pad_value=0.5), path)


def _save_plots(out: Path, before_images, after_images, history) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(50, before_images.shape[0])
    _save_grid(torch.cat([before_images[:k], torch.zeros_like(before_images[:10]), after_images[:k]]),
               out / "before_after.png")  # before, a gray row, after
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["rollout"] for h in history], [h["reward_mean"] for h in history], label="rollout reward")
    val = [(h["rollout"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation accuracy")
    ax.set_xlabel("rollout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=110)
    plt.close(fig)
