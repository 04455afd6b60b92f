"""The GPO self-improvement loop, top to bottom (docs/method.md).

    setup       build everything; whatever can fail on bad input fails here, before anything is written
    begin       the base model's held-out accuracy (and its validation accuracy, the first "best"), or
                the state of the checkpoint a resumed run continues from
    for each rollout:
        sample and score   P prompts -> G images each from the current policy -> rewards
        update             `inner_updates` x (gpo_update -> clip -> optimizer step -> moving average, if
                           train.ema_decay); a non-finite update is skipped and counted, several in a row
                           stop the run
        record             metrics.jsonl and TensorBoard; validation every `eval.every` rollouts keeps
                           the best adapter (the moving average of the weights, if train.ema_decay)
        checkpoint         every `train.checkpoint_every` rollouts, the whole LoopState and the weights
    finish      the best adapter saved, measured on the held-out seeds; summary.json and plots

One GPO update (noise, reference errors, the fused loss) is gpo_fast.update; evaluation is
gpo_fast.evaluate (built by gpo_fast.components), pictures and intervals gpo_fast.report. With several
processes (gpo_fast.distributed) every rank runs every phase on its own groups and its share of each
evaluation's samples; rank 0 alone logs, writes and keeps the best weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gpo_fast.card import write_model_card
from gpo_fast.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gpo_fast.components import Task, autocast_for, build_evaluator, build_model, build_task, resolve_device
from gpo_fast.config import VALIDATION_SEED_OFFSET, Config, dump_config, resume_conflicts
from gpo_fast.distributed import Dist
from gpo_fast.errors import InputError, UserError
from gpo_fast.evaluate import Evaluator, Tiles
from gpo_fast.flops import UnitFlops, measure_unit_flops
from gpo_fast.prompts import write_jsonl
from gpo_fast.rewards.base import RewardResult
from gpo_fast.report import gain_interval, save_before_after, save_grid, save_reward_curve, write_atomic, write_json
from gpo_fast.sampling import rollout
from gpo_fast.stop import RunStopped, StopNow, StopRequests
from gpo_fast.tracking import Trackers, check_trackers
from gpo_fast.update import (degenerate_fraction, gpo_update, loss_spec, make_ema, make_optimizer, make_schedule,
                             swapped_in)
from gpo_fast.watch import DriftWatch, reward_climbing

FLOP_KINDS = ("rollout", "update", "eval")  # sampling the rollouts; the updates; evaluations and validations
DEGENERATE_WARN_AFTER = 5  # rollouts in a row with >= 90% degenerate groups before the loop says so


class TrainingDiverged(UserError):
    """Too many non-finite updates in a row; the message says what to do."""


@dataclass
class RunResult:
    summary: dict
    history: list[dict] = field(default_factory=list)
    model: object = None  # the trained policy (the kept adapter loaded)


@dataclass
class LoopState:
    """What the loop carries from rollout to rollout; a checkpoint saves and restores it whole."""

    generator: torch.Generator  # every random draw of the loop: prompts, starting noise, noise levels
    rollout: int = 0  # the rollout under way (the last one done, between rollouts)
    updates: int = 0
    skipped_updates: int = 0
    bad_updates_in_a_row: int = 0
    degenerate_streak: int = 0
    before: dict | None = None  # the base model's held-out metrics
    before_tiles: Tiles | None = None  # the first held-out samples of the base model, for before_after.png
    before_guided: dict | None = None  # a guidance-free run's base evaluated with guidance (eval.base_cfg_scale)
    before_guided_tiles: Tiles | None = None
    val_start: float | None = None  # the base model's validation accuracy (rollout 0 of reward_curve.png)
    best: dict | None = None  # {"rollout", "accuracy" (validation), "state" (the trained weights)}
    history: list[dict] = field(default_factory=list)  # the metrics rows so far
    watch: DriftWatch | None = None  # the reward-hacking watch, from the base model's validation
    flops: dict = field(default_factory=lambda: dict.fromkeys(FLOP_KINDS, 0))  # cumulative, all processes
    micro_batch: int | None = None  # train.micro_batch after an out-of-memory retry halved it (None: the config's)
    rollout_batch: int | None = None  # rollout.batch_size after an out-of-memory retry halved it (None: the config's)


@dataclass
class Batch:
    """One rollout, scored: this rank's groups."""

    x0: torch.Tensor  # (N, *latent_shape) float32 latents
    texts: list[str]  # the prompt of every sample
    rewards: torch.Tensor  # (N,) float32, NaN where the reward engine failed
    correct: torch.Tensor  # (N,) bool
    failed: int  # reward failures over all ranks


@dataclass
class Run:
    """Everything the phases share."""

    config: Config
    out: Path
    dist: Dist
    task: Task
    evaluator: Evaluator
    model: object
    opt: torch.optim.Optimizer
    sched: object
    state: LoopState
    log: Callable
    precision: Callable  # bf16 autocast on a GPU
    trackers: Trackers | None = None  # log.report_to (TensorBoard by default), rank 0
    metrics_file: object = None  # metrics.jsonl, rank 0
    validator: Evaluator | None = None  # the val prompts' evaluator; None: the evaluator on the validation seed
    ema: object = None  # diffusers' EMAModel of the trained weights (train.ema_decay), or None
    reference_ema: object = None  # the moving reference (train.reference_decay), or None: the frozen base
    unit_flops: UnitFlops | None = None  # the model's unit FLOPs (gpo_fast.flops), measured at setup

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.model.trainable_parameters()

    def validate(self) -> tuple[dict, torch.Tensor]:
        self._count_evaluation()
        return (self.validator or self.evaluator)(self.model, self.config.eval.seed + VALIDATION_SEED_OFFSET,
                                                  self.dist)

    def held_out(self) -> tuple[dict, torch.Tensor]:
        """The held-out evaluation (eval.seed): the gain is measured on it."""
        self._count_evaluation()
        return self.evaluator(self.model, self.config.eval.seed, self.dist)

    @property
    def guided_base_scale(self) -> float | None:
        """The guidance the base is also evaluated at: a run evaluated without guidance, eval.base_cfg_scale > 1."""
        ev = self.config.eval
        return ev.base_cfg_scale if ev.cfg_scale == 1.0 and ev.base_cfg_scale > 1.0 else None

    def held_out_guided(self) -> tuple[dict, torch.Tensor]:
        """The held-out evaluation at guided_base_scale (the same prompts and seeds)."""
        scale = self.guided_base_scale
        self._count_evaluation(scale)
        return build_evaluator(self.config, self.task, self.model.device, cfg_scale=scale)(
            self.model, self.config.eval.seed, self.dist)

    def _count_evaluation(self, cfg_scale: float | None = None) -> None:
        ev = self.config.eval
        self.state.flops["eval"] += self.unit_flops.sampling(ev.samples, ev.steps, cfg_scale or ev.cfg_scale)

    def _kept(self, best: dict | None) -> dict | None:
        """The best so far as this process keeps it: rank 0 with its weights, the others without (rank 0 sends
        them for the final evaluation), so a full fine-tune's copy is not held once per GPU."""
        if best is None or self.main:
            return best
        return {k: v for k, v in best.items() if k != "state"}

    def new_best(self, accuracy: float) -> None:
        """The trained weights become the best so far, at this rollout and validation accuracy: copied off the GPU
        by rank 0 alone (the others record which rollout and accuracy, and get the weights in `finish`)."""
        st = self.state
        st.best = (_snapshot(self.model, st.rollout, accuracy) if self.main
                   else {"rollout": st.rollout, "accuracy": accuracy})

    @contextlib.contextmanager
    def averaged(self):
        """Inside the block the model holds the moving average of the trained weights (train.ema_decay; the
        trained weights themselves when it is off); after it, the trained weights again."""
        with swapped_in(self.ema, self.params) if self.ema is not None else contextlib.nullcontext():
            yield

    def save_checkpoint(self) -> None:
        st = self.state
        save_checkpoint(self.out, st.rollout, {
            "rollout": st.rollout, "updates": st.updates,
            "trainable": {k: v for k, v in self.model.named_parameters() if v.requires_grad},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng_state(st.generator),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "reference_ema": None if self.reference_ema is None else self.reference_ema.state_dict(),
            "before": st.before, "best": st.best, "val_start": st.val_start,
            "before_tiles": None if st.before_tiles is None else st.before_tiles.state(),
            "before_guided": st.before_guided,
            "before_guided_tiles": None if st.before_guided_tiles is None else st.before_guided_tiles.state(),
            "config": self.config.model_dump(mode="json"),
            "watch": None if st.watch is None else {"base": st.watch.base, "warning": st.watch.warning,
                                                    "max_drift": st.watch.max_drift},
            "counters": {"skipped_updates": st.skipped_updates, "bad_updates_in_a_row": st.bad_updates_in_a_row,
                         "degenerate_streak": st.degenerate_streak, "flops": dict(st.flops),
                         "micro_batch": st.micro_batch, "rollout_batch": st.rollout_batch},
        }, keep=self.config.train.keep_checkpoints)

    def restore(self, ck: dict) -> None:
        """Every piece of state as it was after the checkpoint's rollout."""
        _load_trained_state(self.model, ck["trainable"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        for name, average in (("ema", self.ema), ("reference_ema", self.reference_ema)):
            if average is not None:
                average.load_state_dict(ck[name])
                average.to(self.model.device)  # the checkpoint's tensors come back on the CPU
        st = self.state
        set_rng_state(ck["rng"], st.generator)
        st.rollout, st.updates = ck["rollout"], ck["updates"]
        st.before, st.best, st.val_start = ck["before"], self._kept(ck["best"]), ck.get("val_start")
        st.before_tiles = Tiles.from_state(ck.get("before_tiles", ck.get("before_images")))
        st.before_guided = ck.get("before_guided")
        st.before_guided_tiles = Tiles.from_state(ck.get("before_guided_tiles"))
        counters = ck.get("counters", {})
        st.skipped_updates = counters.get("skipped_updates", 0)
        st.bad_updates_in_a_row = counters.get("bad_updates_in_a_row", 0)
        st.degenerate_streak = counters.get("degenerate_streak", 0)
        st.flops = {**dict.fromkeys(FLOP_KINDS, 0), **counters.get("flops", {})}
        st.micro_batch, st.rollout_batch = counters.get("micro_batch"), counters.get("rollout_batch")
        st.history = _metrics_until(self.out / "metrics.jsonl", st.rollout) if self.main else []
        if ck.get("watch"):
            st.watch = DriftWatch(ck["watch"]["base"], self.config.eval.watch_multiple)
            st.watch.warning, st.watch.max_drift = ck["watch"]["warning"], ck["watch"]["max_drift"]


def train(config: Config, log=print, progress=None, on_update=None, resume: Path | None = None) -> RunResult:
    """Run GPO as configured; writes the run folder and returns the summary.

    progress(row) is called after each rollout with its metrics row; on_update(done) after each update.
    resume: a checkpoint folder (run/checkpoints/rollout-N) to continue from exactly.
    SIGTERM, SIGINT or SIGUSR1 during the rollouts: a checkpoint, then RunStopped (gpo_fast.stop).
    """
    start = time.time()
    run = setup(config, log, resume)
    begin(run, resume)
    every = config.train.checkpoint_every
    with StopRequests(interrupt_sampling=run.dist.world == 1) as stop:
        for rollout_index in range(run.state.rollout + 1, config.train.rollouts + 1):
            run.state.rollout = rollout_index
            t0 = time.time()
            at_start = (rng_state(run.state.generator), dict(run.state.flops))  # a stop during sampling goes back here
            try:
                stop.sampling = True
                batch = sample_and_score(run)
            except StopNow:
                batch = None
            finally:
                stop.sampling = False
            if batch is None or _any_rank(run, stop.requested is not None):  # stopped while sampling: the state as of this rollout's start
                set_rng_state(at_start[0], run.state.generator)
                run.state.flops, run.state.rollout = at_start[1], rollout_index - 1
                _stop(run, stop, saved=False)
            stats, grad_norm = update(run, batch, on_update)
            row = record(run, batch, stats, grad_norm, time.time() - t0)
            if progress is not None and run.main:
                progress(row)
            saved = bool(every and rollout_index % every == 0 and rollout_index < config.train.rollouts)
            if run.main and saved:
                run.save_checkpoint()
            if _any_rank(run, stop.requested is not None):  # stopped during the updates: the state as of this rollout's end
                _stop(run, stop, saved=saved)
            if out_of_time(run, start):
                break
    return finish(run, start)


def _any_rank(run: Run, flag: bool) -> bool:
    """Whether the flag is set on any rank (every rank gets the same answer: one all-reduce)."""
    if run.dist.world == 1:
        return flag
    return bool(run.dist.sum(torch.tensor([float(flag)])).item() > 0)


def _halved(run: Run, key: str, size: int, group: int, error: BaseException | None) -> int:
    """After an out-of-memory error: the next size to try, half of `size` (whole groups while a group fits, then
    below a group), freed memory first and a line said; when one sample did not fit, the error again (on every
    rank; the CLI names the next smaller --vram preset)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if size <= 1:
        raise error or torch.cuda.OutOfMemoryError(f"another process ran out of GPU memory at {key} = 1")
    half = size // 2
    smaller = half // group * group if half >= group else half
    run.log(f"out of GPU memory at {key} = {size} (rollout {run.state.rollout}); retrying at {smaller}, kept for the "
            "rest of the run")
    return smaller


def _stop(run: Run, stop: StopRequests, saved: bool) -> None:
    """Write the checkpoint of state.rollout (unless just written), close the records, raise RunStopped."""
    st = run.state
    if run.main:
        if not saved:
            run.save_checkpoint()
        run.metrics_file.close()
        if run.trackers is not None:
            run.trackers.finish()
    run.dist.barrier()
    raise RunStopped(f"stopped on request ({stop.requested or 'another process'}) with rollout {st.rollout} of "
                     f"{run.config.train.rollouts} checkpointed; continue exactly where it stopped with: "
                     f"gpo-fast train --resume {run.out}")


# ---------------------------------------------------------------------------------------------- phases


def setup(config: Config, log, resume: Path | None) -> Run:
    """Seeds, devices, the checkpoint to resume, prompts, reward, model, optimizer; then the run folder."""
    check_trackers(config)  # a tracker whose package is missing fails here, before anything is written
    torch.manual_seed(config.seed)
    dist = Dist.from_env()  # one process, or one per GPU under `accelerate launch`
    if config.rollout.prompts % dist.world:
        raise InputError(f"rollout.prompts ({config.rollout.prompts}) must be a multiple of the number of "
                         f"processes ({dist.world}): each process takes whole groups")
    if config.eval.samples < dist.world:
        raise InputError(f"eval.samples ({config.eval.samples}) must be at least the number of processes "
                         f"({dist.world}): each process evaluates a share of the samples")
    device = dist.device(resolve_device(config))
    checkpoint = _read_checkpoint(resume, config) if resume is not None else None
    task = build_task(config, device)
    model = build_model(config, device, prompts=[p.text for p in task.train_prompts + task.val_prompts
                                                 + task.eval_prompts])
    opt = make_optimizer(model.trainable_parameters(), config.train)
    sched = make_schedule(opt, config.train, config.train.rollouts * config.train.inner_updates)
    run = Run(config, Path(config.out), dist, task, build_evaluator(config, task, device), model, opt, sched,
              LoopState(torch.Generator().manual_seed(config.seed)), log, autocast_for(device),
              validator=build_evaluator(config, task, device, split="val") if task.val_prompts else None,
              ema=make_ema(model.trainable_parameters(), config.train.ema_decay),
              reference_ema=make_ema(model.trainable_parameters(), config.train.reference_decay, warmup=False),
              unit_flops=measure_unit_flops(model, task.train_prompts[0].text, autocast_for(device)))
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_atomic(run.out / "config.toml", dump_config(config))
        write_jsonl(task.train_prompts + task.val_prompts + task.eval_prompts, run.out / "prompts.jsonl",  # the record
                    ["train"] * len(task.train_prompts) + ["val"] * len(task.val_prompts)
                    + ["eval"] * len(task.eval_prompts))
        if config.eval.every:
            log(f"the best adapter is chosen on {task.validation}; the gain is measured on the eval prompts "
                f"(seed {config.eval.seed})")
    if checkpoint is not None:
        run.restore(checkpoint)
        log(f"resumed from {resume} (rollout {run.state.rollout}, {run.state.updates} updates)")
    if run.main:  # before the first evaluation: a tracker that cannot start stops the run at once
        run.trackers = Trackers(config, run.out, resume_step=None if checkpoint is None else run.state.rollout)
    return run


def begin(run: Run, resume: Path | None) -> None:
    """The base model's held-out accuracy and the first best (a fresh run), then the records (rank 0). Every rank
    evaluates its share."""
    st, ev = run.state, run.config.eval
    say = run.log if run.main else (lambda *a: None)
    if resume is None:
        st.before, tiles = run.held_out()
        st.before_tiles = tiles.head(50)  # all a grid shows
        say(f"before: accuracy {st.before['accuracy']:.3f} +- {st.before['accuracy_stderr']:.3f} on "
            f"{ev.samples} held-out samples")
    if run.guided_base_scale and st.before_guided is None:  # fresh, or a resume of a run from before the key
        st.before_guided, tiles = run.held_out_guided()
        st.before_guided_tiles = tiles.head(50)
        say(f"before, with guidance {run.guided_base_scale:g}: accuracy {st.before_guided['accuracy']:.3f} "
            f"+- {st.before_guided['accuracy_stderr']:.3f} (the base as it is usually sampled)")
    if ev.every and st.best is None:  # a fresh run, or validation switched on at the resume: start from here
        with run.averaged():
            metrics, _ = run.validate()
            run.new_best(metrics["accuracy"])
        st.val_start = metrics["accuracy"] if st.rollout == 0 else st.val_start
        st.watch = DriftWatch(metrics["image_stats"], ev.watch_multiple)
    if run.main:
        run.metrics_file = (run.out / "metrics.jsonl").open("a" if resume is not None else "w")


def sample_and_score(run: Run) -> Batch:
    """This rank's groups of one rollout, drawn by the current policy and scored."""
    ro, gen = run.config.rollout, run.state.generator
    mine = run.dist.part(ro.prompts)  # whole groups: prompts divide by the process count (setup)
    # every process draws the global prompts and noise (same generator), then keeps its groups
    idx = torch.randint(0, len(run.task.train_prompts), (ro.prompts,), generator=gen)
    noise = torch.randn((ro.prompts * ro.group_size, *run.model.latent_shape), generator=gen)
    prompts = [run.task.train_prompts[i] for i in idx][mine]
    noise = noise[mine.start * ro.group_size:mine.stop * ro.group_size]
    per_sample = [p for p in prompts for _ in range(ro.group_size)]
    run.model.eval()
    reward = run.task.reward

    def score(images, start):  # one finished batch, in a worker thread while the next is drawn (overlap_scoring)
        return reward.measure(images, per_sample[start:start + len(images)])

    while True:  # an out-of-memory error on any rank: every rank draws its rollout again at half the batch
        batch_size = run.state.rollout_batch or ro.batch_size
        try:
            with run.precision():
                _, x0, _, parts = rollout(run.model, [p.text for p in prompts], ro.group_size, steps=ro.steps,
                                          cfg_scale=ro.cfg_scale, generator=gen, batch_size=batch_size, noise=noise,
                                          solver=ro.solver, score=score, overlap=ro.overlap_scoring)
            out_of_memory = None
        except torch.cuda.OutOfMemoryError as e:
            out_of_memory = e
        if not _any_rank(run, out_of_memory is not None):
            break
        x0 = parts = None
        run.state.rollout_batch = _halved(run, "rollout.batch_size", batch_size or len(per_sample), ro.group_size,
                                          out_of_memory)
    run.state.flops["rollout"] += run.unit_flops.sampling(ro.prompts * ro.group_size, ro.steps, ro.cfg_scale)
    scored = RewardResult(torch.cat([s.reward.float() for s in parts]), torch.cat([s.correct for s in parts]),
                          [d for s in parts for d in s.details])
    failed = int(run.dist.sum((~torch.isfinite(scored.reward)).sum()))
    # a NaN reward (the engine failed on that image) excludes its member from its group in the loss
    x0 = x0.float()
    return Batch(x0, [p.text for p in per_sample], scored.reward.float().to(x0.device), scored.correct, failed)


def update(run: Run, batch: Batch, on_update=None) -> tuple[list[dict], float]:
    """`inner_updates` optimizer steps on one rollout; a non-finite loss or gradient is skipped (weights and
    optimizer untouched) and counted. Returns each update's stats and the last gradient norm."""
    config, st, params = run.config, run.state, run.params
    stats, grad_norm = [], math.nan
    for _ in range(config.train.inner_updates):
        at_start = rng_state(st.generator)  # a retry draws the same noise levels and noise
        while True:  # an out-of-memory error on any rank: every rank redoes this update at half the micro-batch
            run.opt.zero_grad(set_to_none=True)
            run.model.train()
            micro_batch = st.micro_batch or config.train.micro_batch
            sized = config if micro_batch == config.train.micro_batch else config.model_copy(
                update={"train": config.train.model_copy(update={"micro_batch": micro_batch})})
            try:
                with run.precision():
                    reference = None if run.reference_ema is None else swapped_in(run.reference_ema, params)
                    result = gpo_update(run.model, batch.x0, batch.texts, batch.rewards, sized, st.generator,
                                        run.dist, reference)
                out_of_memory = None
            except torch.cuda.OutOfMemoryError as e:
                out_of_memory = e
            if not _any_rank(run, out_of_memory is not None):
                break
            run.opt.zero_grad(set_to_none=True)
            set_rng_state(at_start, st.generator)
            n = batch.x0.shape[0]
            st.micro_batch = _halved(run, "train.micro_batch", micro_batch if 0 < micro_batch < n else n,
                                     loss_spec(config).group_size, out_of_memory)
        stats.append(result)
        run.dist.sum_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip).item()
        if not (math.isfinite(stats[-1]["loss"]) and math.isfinite(grad_norm)):
            run.opt.zero_grad(set_to_none=True)
            st.skipped_updates += 1
            st.bad_updates_in_a_row += 1
            if st.bad_updates_in_a_row >= config.train.max_bad_updates:
                raise TrainingDiverged(
                    f"the loss or gradient was not finite in {st.bad_updates_in_a_row} updates in a row (rollout "
                    f"{st.rollout}); the weights were not changed by them and the checkpoints in "
                    f"{run.out / 'checkpoints'} are intact: lower train.lr or train.beta and resume or restart")
            continue
        st.bad_updates_in_a_row = 0
        run.opt.step()
        run.sched.step()
        for ema in (run.ema, run.reference_ema):
            if ema is not None:
                ema.step(params)
        st.updates += 1
        if on_update is not None:
            on_update(st.updates)
    return stats, grad_norm


def record(run: Run, batch: Batch, stats: list[dict], grad_norm: float, seconds: float) -> dict:
    """The rollout's metrics row (over all ranks): warnings, validation, metrics.jsonl and TensorBoard."""
    st, dist = run.state, run.dist
    every_reward = dist.gather(batch.rewards.float().cpu())
    scored = every_reward[torch.isfinite(every_reward)]  # the members the reward engine scored
    row = {
        "rollout": st.rollout, "updates": st.updates,
        "loss": float(dist.sum(torch.tensor(sum(s["loss"] for s in stats) / len(stats)))),
        "reward_mean": scored.mean().item() if scored.numel() else math.nan,
        "reward_std": scored.std(unbiased=False).item() if scored.numel() else math.nan,
        "accuracy": dist.gather(batch.correct.float().cpu()).mean().item(),
        "degenerate_fraction": degenerate_fraction(every_reward, loss_spec(run.config)),
        "implicit_acc": _nanmean([s["implicit_acc"] for s in stats]),
        "mean_abs_d": sum(s["mean_abs_d"] for s in stats) / len(stats),
        "grad_norm": grad_norm, "lr": run.sched.get_last_lr()[0], "step_seconds": seconds,
        "reward_failures": batch.failed, "skipped_updates": st.skipped_updates,
    }
    passes = dist.sum(torch.tensor([sum(s["forward_samples"] for s in stats), sum(s["train_samples"] for s in stats)]))
    st.flops["update"] += run.unit_flops.update(int(passes[0]), int(passes[1]))
    row.update(flops=st.flops["rollout"] + st.flops["update"], flops_rollout=st.flops["rollout"],
               flops_update=st.flops["update"], micro_batch=st.micro_batch or run.config.train.micro_batch,
               rollout_batch=st.rollout_batch or run.config.rollout.batch_size)
    st.history.append(row)
    _warn_if_degenerate(run, row, len(every_reward))
    ev = run.config.eval
    validated = bool(ev.every and st.rollout % ev.every == 0)
    if validated:  # every rank its share
        with run.averaged():
            metrics, val_tiles = run.validate()
            if metrics["accuracy"] > st.best["accuracy"]:
                run.new_best(metrics["accuracy"])
        row["val_accuracy"] = metrics["accuracy"]
        if "watch_reward_mean" in metrics:
            row["val_watch_reward"] = metrics["watch_reward_mean"]
    row["flops_eval"] = st.flops["eval"]
    if not run.main:
        return row
    if validated:
        _watch(run, row, metrics)
        grid = run.out / "samples" / f"rollout-{st.rollout:05d}.png"
        save_grid(val_tiles.head(50), grid, f"rollout {st.rollout}: validation accuracy {100 * metrics['accuracy']:.1f}%")
    run.metrics_file.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                                       for k, v in row.items()}) + "\n")
    run.metrics_file.flush()
    run.trackers.log(row, st.rollout)
    if "val_accuracy" in row:
        run.trackers.log_image("samples/validation", grid, st.rollout)
    return row


def _watch(run: Run, row: dict, metrics: dict) -> None:
    """The drift of each image statistic from the base validation (row keys watch_<stat>, in base spreads), and
    the one warning when one moves too far while the reward climbs."""
    st = run.state
    if st.watch is None or "image_stats" not in metrics:
        return
    climbing = reward_climbing([h["reward_mean"] for h in st.history])
    warning = st.watch.check(metrics["image_stats"], climbing, st.rollout)
    row.update({f"watch_{name}": drift for name, drift in st.watch.last_drift.items()})
    if warning:
        run.log(f"warning: {warning}")


def out_of_time(run: Run, start: float) -> bool:
    """Whether train.time_budget_s is spent; every process stops after the same rollout."""
    budget = run.config.train.time_budget_s
    over = run.main and bool(budget) and time.time() - start > budget
    if run.dist.sum(torch.tensor(float(over))) > 0:
        run.log(f"time budget of {budget:.0f} s reached after {run.state.rollout} rollouts")
        return True
    return False


def finish(run: Run, start: float) -> RunResult:
    """Rank 0 keeps the best weights (by validation), saves them and measures them on the held-out seeds."""
    st, config = run.state, run.config
    if run.main:
        run.metrics_file.close()
    if config.eval.every:  # keep the best on the validation seeds
        if st.rollout % config.eval.every:  # the last rollout was not validated (a time budget): look at it now
            with run.averaged():
                accuracy = run.validate()[0]["accuracy"]
                if accuracy > st.best["accuracy"]:
                    run.new_best(accuracy)
        if run.main:
            _load_trained_state(run.model, st.best["state"])
        run.dist.broadcast_from_main(run.params)  # rank 0 alone keeps the best's weights
    else:  # no validation: the final weights (their moving average, if train.ema_decay)
        if run.ema is not None:
            run.ema.copy_to(run.params)
        st.best = {"rollout": st.rollout}
    if run.main:
        if config.lora.enabled:
            run.model.save_adapter(run.out / "adapter")
        else:
            run.model.save_pretrained(run.out / "model")
    after, after_tiles = run.held_out()  # every rank its share
    if not run.main:
        run.dist.barrier()
        return RunResult({}, st.history, run.model)
    summary = {
        "accuracy_before": st.before["accuracy"], "accuracy_after": after["accuracy"],
        **gain_interval(st.before, after),
        "best_rollout": st.best["rollout"], "rollouts": st.rollout, "steps": st.updates,
        "wall_seconds": time.time() - start, "objective": config.train.objective, "seed": config.seed,
        "eval_samples": config.eval.samples, "eval_before": st.before, "eval_after": after,
        "prompts": {"train": len(run.task.train_prompts), "val": len(run.task.val_prompts),
                    "eval": len(run.task.eval_prompts)},
        "validation": run.task.validation if config.eval.every else "none (eval.every = 0: the final weights)",
        "watch": None if st.watch is None else {"max_drift": st.watch.max_drift, "warning": st.watch.warning,
                                                "base": st.watch.base},
        "flops": {**st.flops, "train": st.flops["rollout"] + st.flops["update"],
                  # a run resumed from before runs counted FLOPs has rows without them: counted from the resume
                  "train_to_kept": next((h.get("flops") for h in st.history if h["rollout"] == st.best["rollout"]), 0),
                  "unit": run.unit_flops.to_json()},
    }
    if st.before_guided is not None and run.guided_base_scale:
        summary.update(base_cfg_scale=run.guided_base_scale, accuracy_base_guided=st.before_guided["accuracy"],
                       gain_over_guided_base=after["accuracy"] - st.before_guided["accuracy"])
    for key, name in run.evaluator.headline.items():  # what this evaluator reports beside accuracy
        summary.update({f"{name}_before": st.before[key], f"{name}_after": after[key]})
    write_json(run.out / "summary.json", summary)
    guided = None if "base_cfg_scale" not in summary else (st.before_guided_tiles, st.before_guided,
                                                              summary["base_cfg_scale"])
    save_before_after(st.before_tiles, after_tiles, run.out / "before_after.png", st.before, after, guided=guided)
    save_reward_curve(st.history, run.out / "reward_curve.png", val_start=st.val_start, before=st.before["accuracy"],
                      after=after["accuracy"], kept_rollout=st.best["rollout"])
    run.trackers.log({f"final/{k}": v for k, v in summary.items() if k.startswith(("accuracy_", "gain"))}, st.rollout)
    for picture in ("before_after", "reward_curve"):
        run.trackers.log_image(f"final/{picture}", run.out / f"{picture}.png", st.rollout)
    run.trackers.finish()
    write_model_card(run.out / ("adapter" if config.lora.enabled else "model"), config, summary,
                     run.out / "before_after.png")
    run.dist.barrier()
    return RunResult(summary, st.history, run.model)


# ---------------------------------------------------------------------------------------------- helpers


def _read_checkpoint(path: Path, config: Config) -> dict:
    """The checkpoint, refused when config.toml was edited since it was written in a key of the math."""
    ck = load_checkpoint(path)
    if "config" in ck:
        conflicts = resume_conflicts(Config.model_validate(ck["config"]), config)
        if conflicts:
            raise CheckpointError(f"checkpoint {path} was written with other values of {', '.join(conflicts)}, "
                                  "which change the training's math; put them back in config.toml or start a "
                                  "new run")
    return ck


def _warn_if_degenerate(run: Run, row: dict, n_images: int) -> None:
    st = run.state
    st.degenerate_streak = st.degenerate_streak + 1 if row["degenerate_fraction"] >= 0.9 else 0
    if st.degenerate_streak != DEGENERATE_WARN_AFTER:
        return
    if row["reward_failures"]:
        run.log(f"warning: for {DEGENERATE_WARN_AFTER} rollouts at least 90% of the groups had no loss, and the "
                f"reward engine failed on {row['reward_failures']} of the {n_images} images of rollout {st.rollout}: "
                "check the engine with `gpo-fast doctor`")
    else:
        run.log(f"warning: for {DEGENERATE_WARN_AFTER} rollouts at least 90% of the groups had all-equal rewards "
                "(degenerate: no loss, no gradient); the model gets every image right or every image wrong on these "
                "prompts: use easier or harder prompts, a larger rollout.group_size, or reward.partial_credit")


def _metrics_until(path: Path, rollout: int) -> list[dict]:
    """The metrics rows up to `rollout`, and the file cut back to them (a resumed run rewrites the rest)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if r["rollout"] <= rollout]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _nanmean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _snapshot(model, rollout: int, accuracy: float) -> dict:
    """A copy of the trained weights (the adapter, or the transformer when fully fine-tuned), off the GPU."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters() if v.requires_grad}
    return {"rollout": rollout, "accuracy": accuracy, "state": state}


def _load_trained_state(model, state: dict) -> None:
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in state:
                v.copy_(state[k])
