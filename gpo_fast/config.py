"""The run configuration: typed, validated, one flat section per concern.

Sources, later ones winning: the preset (default "toy"), a TOML file, `--set section.key=value`
overrides (the value in TOML syntax; a bare word is a string). Unknown keys, wrong types and values out
of range are rejected with the key's dotted name. The resolved config is written to the run folder.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpo_fast.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


Solver = Literal["euler", "dpm++2m"]  # rollout.solver, eval.solver (gpo_fast.sampling)


class ConfigError(InputError):
    """A config problem, phrased for the user: what is wrong and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    kind: Literal["toy", "sd3"] = Field(
        "toy", description="Model family: 'toy' (the tiny SD3 transformer of the toy world) or 'sd3' (SD3 / SD3.5).")
    path: Optional[str] = Field(
        None, description="toy: a folder from `gpo-fast toy pretrain` (empty: the shipped base); sd3: a hub id or a "
                          "local diffusers folder (empty: stabilityai/stable-diffusion-3.5-medium).")
    resolution: int = Field(512, ge=16, le=2048, description="sd3: image side in pixels (a multiple of 16).")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="sd3: weight dtype; auto = bfloat16 on a GPU, float32 on the CPU.")
    t5: Literal["full", "8bit", "off"] = Field(
        "full", description="sd3: the T5 text encoder in bf16, in 8 bits (bitsandbytes, GPU) or left out.")
    text_encoders: Literal["gpu", "cpu"] = Field(
        "gpu", description="sd3: where the text encoders run while prompts are cached: on the GPU (fast), or on the "
                           "CPU (slow, once per prompt; none of their weights on the GPU: small cards).")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="sd3: attention backend.")
    embeds_cache: Optional[str] = Field(None, description="sd3: folder caching prompt embeddings on disk.")
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none", description="sd3: base transformer weights in int8 or nf4 (bitsandbytes, GPU; LoRA only).")
    vae_tiling: bool = Field(False, description="sd3: decode in tiles (less memory at 1024 px and above).")
    compile: bool = Field(False, description=(
        "Compile the denoiser's forward with torch.compile (rollouts, updates, evaluations): the same outputs, "
        "faster on a GPU after a compile of a minute or more at the start (and one more per adapter state: "
        "on, off for the reference)."))


VALIDATION_SEED_OFFSET = 1  # validation draws eval.seed + 1: it picks the best adapter, eval.seed measures it


class DataSection(_Section):
    prompts: str = Field(
        "toy", description="Prompt set: 'toy', 'counting' or 'text' (built in; train/eval splits made by "
                           "`gpo-fast prompts`) or a JSONL file from `gpo-fast prompts`.")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Built-in sets: share of items held out for eval.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "Built-in sets: share of items held out for validation (which picks the best adapter), disjoint from "
        "train and eval; 0: validation samples the eval prompts on other seeds."))

    @model_validator(mode="after")
    def _fractions(self):
        if self.eval_fraction + self.val_fraction >= 1.0:
            raise ValueError(f"data.eval_fraction + data.val_fraction must be below 1 (got {self.eval_fraction} + "
                             f"{self.val_fraction}): something must be left to train on")
        return self


class LoraSection(_Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (false: fine-tune every weight).")
    rank: int = Field(8, ge=1, le=1024, description="Rank of the LoRA matrices.")
    alpha: float = Field(8.0, gt=0, description="LoRA scale numerator: the update is (alpha / rank) * B A.")
    targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"],
        description="Module names the adapter wraps: SD3's attention projections.",
    )


class RolloutSection(_Section):
    prompts: int = Field(8, ge=1, description="Prompts per rollout (P).")
    group_size: int = Field(8, ge=2, description="Images per prompt (G).")
    steps: int = Field(8, ge=1, le=1000, description="Sampler steps of the rollouts (rollout.solver's).")
    cfg_scale: float = Field(2.0, ge=1.0, le=30.0, description=(
        "Classifier-free guidance scale; 1 is no guidance: one forward per sampler step instead of two."))
    solver: Solver = Field("euler", description=(
        "ODE solver of the rollouts: euler, or dpm++2m (DPM-Solver++(2M), diffusers' DPMSolverMultistepScheduler "
        "for flow matching: second order, one forward per step as Euler; fewer steps for the same images)."))
    batch_size: int = Field(0, ge=0, description="Images per sampler forward (rollouts and eval); 0 = all at once.")
    overlap_scoring: bool = Field(True, description=(
        "Score each finished batch of a rollout in a worker thread while the sampler draws the next one (needs "
        "batch_size below prompts x group_size); the rewards are the same either way, only the waiting differs."))


class TrainSection(_Section):
    rollouts: int = Field(60, ge=1, description="Rollout rounds (each: sample, score, then inner updates).")
    inner_updates: int = Field(4, ge=1, description="Optimizer updates per rollout, each with fresh noise.")
    objective: Literal["gpo", "gpo-pairs", "dpo"] = Field("gpo", description=(
        "gpo: one loss per group, the standardized rewards weighting each member's log-ratio; gpo-pairs: every pair "
        "of a group, weighted by its advantage gap; dpo: the best against the worst member (docs/method.md)."))
    beta: float = Field(1000.0, gt=0, le=1e7, description=(
        "Sharpness of l(z) = softplus(beta * z), z the group's reward-weighted log-ratio. At G = 2 this is the "
        "diffusers Diffusion-DPO example's beta_dpo at the same value; the original Diffusion-DPO code writes "
        "0.5 * beta, so its beta is twice this one (docs/method.md, 'Beta convention')."))
    beta_per_member: bool = Field(False, description=(
        "Use beta / G: gpo's sum over the G members grows with G (about sqrt(G) for the same spread), so a beta "
        "tuned at one group size is sharper at a larger one; divided by G it is not (the form of DGPO's "
        "objective, docs/method.md)."))
    eps_std: float = Field(1e-6, ge=0, description="Added to a group's reward std before dividing by it.")
    min_std: float = Field(1e-6, gt=0, description="Groups whose reward std is below this are skipped.")
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate.")
    optimizer: Literal["adamw8bit", "adamw"] = Field(
        "adamw8bit", description="adamw8bit: bitsandbytes' AdamW with 8-bit states (a quarter of the memory); adamw: "
                                 "PyTorch's.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine decay to 0 over train.rollouts x train.inner_updates updates.")
    warmup_updates: int = Field(0, ge=0, description="Raise the lr linearly over this many updates (0: none).")
    grad_clip: float = Field(1.0, gt=0, description="Clip the gradient's global norm to this.")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Keep an exponential moving average of the trained weights (diffusers' EMAModel, updated after every "
        "optimizer step, its decay warming up as (1 + n) / (10 + n) to this value: over the first 400 updates "
        "every value from 0.978 up gives the same average); validation scores the average and the adapter kept "
        "is the best average. Rollouts still sample from the trained weights (0: off)."))
    reference_decay: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "0: the reference is the frozen base model (the paper's). Above 0: the reference is a moving average of "
        "the trained weights, moved toward them by 1 - reference_decay after every optimizer step (about "
        "1 / (1 - reference_decay) updates behind), so the log-ratio measures the policy against its own recent "
        "past: the soft reference update of TR-DPO (TRL's sync_ref_model), after every step."))
    micro_batch: int = Field(0, ge=0, description="Samples per forward/backward; 0 = the whole rollout at once.")
    sigma_dist: Literal["logit-normal", "uniform", "schedule"] = Field(
        "logit-normal", description="Noise levels of the updates: logit-normal (SD3's training distribution), "
                                    "uniform, or schedule (the rollout sampler's own levels).")
    sigma_min: float = Field(0.02, ge=0.0, lt=1.0, description="No update below this noise level (levels are clamped).")
    sigma_max: float = Field(0.98, gt=0.0, le=1.0, description="No update above this noise level (levels are clamped).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute.")
    time_budget_s: float = Field(0.0, ge=0.0, description="Stop rolling out after this many seconds (0: no limit).")
    checkpoint_every: int = Field(10, ge=0, description="Write a full training checkpoint every this many rollouts "
                                                        "(0: never); `gpo-fast train --resume RUN` continues from it.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints to keep.")
    max_bad_updates: int = Field(5, ge=1, description="Stop after this many non-finite updates in a row "
                                                      "(each is skipped; the weights stay as they were).")

    @model_validator(mode="after")
    def _sigma_range(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class RewardSection(_Section):
    kind: Literal["toy-count", "yolo-count", "ocr-text", "python", "composite"] = Field(
        "toy-count", description="toy-count (blob count), yolo-count (ultralytics YOLO), ocr-text (easyocr), "
                                 "python (your own, see `callable`) or composite (weighted sum, see `weights`).")
    callable: Optional[str] = Field(None, description=(
        "python: 'package.module:factory' or 'path/to/file.py:factory'; the factory gets reward.options (a dict) "
        "and returns an object with measure(images, prompts) -> RewardResult (docs/rewards.md, 'Your own reward'). "
        "Loading it runs its code, as loading a YOLO .pt does: use only code you trust."))
    options: dict[str, Any] = Field(default_factory=dict, description="python: the table passed to the factory.")
    min_size: int = Field(1, ge=1, description="toy-count: ignore components smaller than this (pixels); 1 = strict.")
    partial_credit: bool = Field(False, description="Counting: reward max(0, 1 - |count - n| / n) instead of 0/1.")
    detector: str = Field("yolo11n.pt", description="yolo-count: YOLO weights (.pt path or a name ultralytics knows).")
    conf: float = Field(0.5, ge=0.0, le=1.0, description="yolo-count: confidence threshold of a counted box.")
    ocr_model_dir: Optional[str] = Field(None, description="ocr-text: folder of easyocr's weights (empty: its own).")
    weights: dict[str, float] = Field(
        default_factory=dict, description="composite: {'yolo-count': w, 'ocr-text': w}; reward = weighted mean.")
    device: Literal["auto", "cpu"] = Field("auto", description="Reward engines on the GPU when there is one, or the CPU.")

    @model_validator(mode="after")
    def _composite(self):
        if self.kind == "composite":
            if not self.weights:
                raise ValueError("reward.kind = 'composite' needs reward.weights, e.g. {yolo-count = 1.0, ocr-text = 1.0}")
            bad = [k for k in self.weights if k not in ("yolo-count", "ocr-text", "python")]
            if bad:
                raise ValueError(f"reward.weights: unknown reward {bad[0]!r}; use yolo-count, ocr-text and/or python")
            if not all(math.isfinite(w) and w >= 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
                raise ValueError("reward.weights must be finite and >= 0 with a positive sum")
        if (self.kind == "python" or (self.kind == "composite" and "python" in self.weights)) and not self.callable:
            raise ValueError("reward.kind = 'python' needs reward.callable, e.g. 'my_rewards:brightness' or "
                             "'rewards.py:brightness'")
        return self


class EvalSection(_Section):
    samples: int = Field(1000, ge=10, description="Held-out samples per evaluation.")
    every: int = Field(20, ge=0, description="Evaluate every this many rollouts (0: only before and after).")
    steps: int = Field(12, ge=1, le=1000, description="Sampler steps in evaluations (eval.solver's).")
    cfg_scale: float = Field(2.0, ge=1.0, le=30.0, description="Classifier-free guidance scale in evaluations.")
    solver: Solver = Field("euler", description="ODE solver in evaluations (see rollout.solver).")
    base_cfg_scale: float = Field(2.0, ge=0.0, le=30.0, description=(
        "A run that evaluates without guidance (eval.cfg_scale = 1) also evaluates the base model at this guidance "
        "before training: the base as it is usually sampled, which a guidance-free adapter has to beat. Its accuracy "
        "goes to summary.json (accuracy_base_guided) and its images beside the others in before_after.png "
        "(0 or 1: not evaluated)."))
    seed: int = Field(10_000, description="Seed of the held-out noise (disjoint from training seeds).")
    watch_multiple: float = Field(1.0, ge=0.0, description=(
        "Reward-hacking watch: warn once when an image statistic the reward does not see (brightness, saturation, "
        "contrast, near-black, near-white, high-frequency energy) of the validation images moves more than this "
        "many of the base's spreads while the training reward climbs (0: no warning; the drifts are logged)."))
    watch_reward: Optional[Literal["toy-count", "yolo-count", "ocr-text", "python"]] = Field(None, description=(
        "A second reward measured at every evaluation and never trained on (its settings are the reward "
        "section's for that kind), logged as watch_reward_mean: a climbing reward with a flat or falling watch "
        "is a sign of gaming."))


class LogSection(_Section):
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "none"]] = Field(
        default_factory=lambda: ["tensorboard"], description=(
            "Experiment trackers that get the scalars of metrics.jsonl, the sample grids and the resolved config: "
            "tensorboard (in the run folder), wandb, trackio, mlflow, several, or none (metrics.jsonl is written "
            "either way). Each but tensorboard is an extra: pip install \"gpo-fast[wandb]\" (docs/tracking.md)."))
    project: str = Field("gpo-fast", min_length=1, description=(
        "wandb and trackio: the project the run is logged under; mlflow: the experiment's name."))

    @model_validator(mode="after")
    def _none_alone(self):
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"log.report_to = {self.report_to}: 'none' cannot stand beside a tracker; "
                             "give 'none' alone or only trackers")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"log.report_to = {self.report_to} names a tracker twice; name each once")
        return self

    @property
    def trackers(self) -> list[str]:
        return [name for name in self.report_to if name != "none"]


class Config(_Section):
    seed: int = Field(0, description="Seed of the rollouts, the noise and the adapter's initial weights.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: a GPU if there is one.")
    out: str = Field("runs/gpo-toy", description="Run folder.")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    train: TrainSection = Field(default_factory=TrainSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    log: LogSection = Field(default_factory=LogSection)

    @model_validator(mode="after")
    def _consistent(self):
        toy = self.model.kind == "toy"
        toy_reward = self.reward.kind in ("toy-count", "python") if toy else self.reward.kind != "toy-count"
        if not toy_reward or toy != (self.data.prompts == "toy"):
            raise ValueError("the toy model goes with reward.kind = 'toy-count' (or 'python') and data.prompts = "
                             f"'toy', and only it does (got model.kind = {self.model.kind!r}, reward.kind = "
                             f"{self.reward.kind!r}, data.prompts = {self.data.prompts!r}); start from --preset toy or "
                             "an sd35m preset")
        if self.model.quantize != "none" and not self.lora.enabled:
            raise ValueError(f"model.quantize = '{self.model.quantize}' trains a LoRA on frozen quantized weights; "
                             "set lora.enabled = true or model.quantize = 'none'")
        if self.model.attention == "xformers" and not self.lora.enabled:
            # a full fine-tune trains float32 weights: diffusers' RMSNorm then returns q and k in float32 while v
            # stays bfloat16 under autocast, and xformers (unlike SDPA, which autocast casts) refuses mixed dtypes
            raise ValueError("model.attention = 'xformers' cannot run a full fine-tune (lora.enabled = false): its "
                             "float32 q and k meet a bfloat16 v; use model.attention = 'sdpa' or train a LoRA")
        if self.model.text_encoders == "cpu" and self.model.t5 == "8bit":
            raise ValueError("model.t5 = '8bit' runs on the GPU only (bitsandbytes); with model.text_encoders = 'cpu' "
                             "use model.t5 = 'full' (bf16 on the CPU) or 'off'")
        held = {self.eval.seed: "eval.seed", self.eval.seed + VALIDATION_SEED_OFFSET: "the validation seed (eval.seed + 1)"}
        if self.seed in held:
            raise ValueError(f"seed = {self.seed} is {held[self.seed]}: training would draw the noise the held-out "
                             f"samples are measured on; choose another seed or eval.seed")
        if self.model.kind == "sd3" and self.model.resolution % 16:
            raise ValueError(f"model.resolution must be a multiple of 16; got {self.model.resolution}")
        return self


# The presets. Each value set by a preset has its reason in PRESET_WHY below (docs/config.md prints both,
# `gpo-fast config --markdown`). The toy preset's values were measured on the toy world (docs/results/toy.md);
# the SD3.5 presets follow published SD3.5-Medium RL fine-tunes (Flow-GRPO, DGPO: 512 px, CFG 4.5, 10
# rollout steps, LoRA rank 32) until a GPU measurement in this project says otherwise.
_SD35M = {
    "model": {"kind": "sd3", "path": "stabilityai/stable-diffusion-3.5-medium", "resolution": 512, "t5": "full"},
    "lora": {"rank": 32, "alpha": 32.0},
    "rollout": {"prompts": 4, "group_size": 8, "steps": 10, "cfg_scale": 4.5, "batch_size": 8},
    "train": {"rollouts": 300, "inner_updates": 2, "objective": "gpo", "beta": 1000.0, "beta_per_member": False,
              "reference_decay": 0.0, "lr": 1e-4, "warmup_updates": 20, "micro_batch": 8,
              "gradient_checkpointing": True, "sigma_dist": "logit-normal"},
    "eval": {"samples": 400, "every": 50, "steps": 28, "cfg_scale": 4.5, "base_cfg_scale": 4.5},
    "out": "runs/sd35m",
}

PRESETS: dict[str, dict] = {
    # the embedded default: GPO on the shipped toy model, a few minutes on two CPU cores
    "toy": {
        "rollout": {"cfg_scale": 1.0, "steps": 12},
        "eval": {"cfg_scale": 1.0},
        "train": {"beta_per_member": True, "lr": 1.5e-3, "rollouts": 100, "reference_decay": 0.95, "ema_decay": 0.98},
        "reward": {"partial_credit": True},
    },
    # the paper's counting task: YOLO counts objects of COCO classes, 1-6 of them
    "sd35m-counting": {**copy.deepcopy(_SD35M),
                       "data": {"prompts": "counting"},
                       "reward": {"kind": "yolo-count", "detector": "yolo11x.pt", "conf": 0.5},
                       "out": "runs/sd35m-counting"},
    # the paper's text-rendering task: easyocr reads the image, edit-distance reward against the word
    "sd35m-text": {**copy.deepcopy(_SD35M),
                   "data": {"prompts": "text"},
                   "reward": {"kind": "ocr-text"},
                   "out": "runs/sd35m-text"},
}

_SD35M_WHY = {
    "model.kind": "SD3 / SD3.5.",
    "model.path": "The paper's model.",
    "model.resolution": "The paper's neighbours train SD3.5-M at 512 px; 4x cheaper than 1024.",
    "model.t5": "Prompts are encoded once and T5 then leaves the GPU: quality at no training cost.",
    "lora.rank": "Flow-GRPO's rank on SD3.5-M (it wraps the attention projections; ours also SD3.5's second "
                 "attention, attn2).",
    "lora.alpha": "alpha = rank keeps the adapter's scale at 1.",
    "rollout.prompts": "4 groups x 8 = 32 images per rollout, sampled a group at a time on a consumer GPU.",
    "rollout.group_size": "GPO needs spread inside a group; 8 keeps degenerate groups rare at 30-60% accuracy.",
    "rollout.steps": "Rollouts only need to be good enough to rank; Flow-GRPO samples with 10.",
    "rollout.cfg_scale": "SD3.5-M's recommended guidance.",
    "rollout.batch_size": "One group per sampler forward: bounded memory.",
    "train.rollouts": "9,600 images (about 96 per train prompt at 384 counting prompts): a few GPU-hours at 512 px.",
    "train.inner_updates": "Fresh noise per update: 2 passes over each rollout before it goes stale.",
    "train.objective": "The method; on the toy world ahead of dpo on average and steadier over seeds.",
    "train.beta": "The toy world's measured default; the diffusers Diffusion-DPO example's default beta_dpo is 2500 "
                  "in this same convention (docs/method.md, 'Beta convention').",
    "train.beta_per_member": "beta on the group's sum, as above; the toy's beta / G is not measured on SD3.5.",
    "train.reference_decay": "The paper's frozen base; the toy's moving reference is not measured on SD3.5.",
    "train.lr": "LoRA on a 2.5 B transformer: 15x below the toy's lr (its adapter is 50x smaller).",
    "train.warmup_updates": "A fresh adapter and 8-bit Adam moments: no full-size first steps.",
    "train.micro_batch": "One group per forward and backward (group-exact: the full-group gradient).",
    "train.gradient_checkpointing": "Activations, not weights, dominate at 512 px and G = 8.",
    "train.sigma_dist": "SD3's own training distribution of noise levels.",
    "eval.samples": "+-2.5 points of standard error at 50% accuracy.",
    "eval.every": "Keeps the best of 6 checkpoints (on validation seeds).",
    "eval.steps": "diffusers' default for SD3.",
    "eval.cfg_scale": "As in the rollouts.",
    "eval.base_cfg_scale": "SD3.5-M's recommended guidance: a guidance-free run is measured against the base as "
                           "its users sample it.",
}

# Why each preset sets each key (tests/test_docs.py: every key a preset sets has a reason here, and only those)
PRESET_WHY: dict[str, dict[str, str]] = {
    "toy": {  # chosen by the mean gain over seeds 0-4 on the toy world (docs/results/toy.md, "Choosing the toy default")
        "rollout.cfg_scale": "No guidance in the rollouts: one forward per step, 67% of the training compute of "
                             "guidance 3 for a 5-seed mean 0.5 points lower, the cheapest setting within 1 point of "
                             "the best (docs/results/toy.md, 'Half the compute')",
        "eval.cfg_scale": "Evaluated as it is meant to be used, without guidance; the base is also evaluated with "
                          "guidance 2 (eval.base_cfg_scale), the setting it was measured at before.",
        "rollout.steps": "Sampling the rollouts with 12 steps, as the evaluations do, beat 8 (16 was worse).",
        "train.beta_per_member": "beta / G was the best of the four objectives measured.",
        "train.lr": "Half the ablation's lr over more rollouts; 1e-3 and 2e-3 were both worse.",
        "train.rollouts": "100 rollouts at lr 1.5e-3: the best tuning row; the whole command stays under 10 minutes "
                          "on two CPU cores.",
        "train.reference_decay": "A reference about 20 updates behind the policy stopped the late collapses against "
                                 "the frozen base and beat it on all five seeds (0.99 and 0.98 did too, by less).",
        "train.ema_decay": "Validating and keeping the moving average of the weights on top of the moving reference "
                           "had a better mean (+0.2 per seed, within the noise).",
        "reward.partial_credit": "Training on max(0, 1 - |count - n| / n) had the best 5-seed mean (+0.9 per seed, "
                                 "within the noise); accuracy stays the exact count.",
    },
    "sd35m-counting": {**_SD35M_WHY,
                       "data.prompts": "The paper's counting task: COCO classes, 1 to 6 objects.",
                       "reward.kind": "YOLO counts the objects of the prompt's class.",
                       "reward.detector": "The most accurate COCO YOLO11.",
                       "reward.conf": "A low-confidence false positive breaks a right count.",
                       "out": "The run folder."},
    "sd35m-text": {**_SD35M_WHY,
                   "data.prompts": "The paper's text-rendering task: a sign with a word from the shipped list.",
                   "reward.kind": "easyocr reads the image; the reward is an edit distance to the word.",
                   "out": "The run folder."},
}


# `gpo-fast train --vram N`: what fits a card of N GB, applied over the preset (before --set). Checked by
# `gpo-fast plan` (fake tensors, tests/test_plan.py): every phase of SD3.5 Medium plans under the card's size
# less the CUDA context and the allocator's slack. Planned, not yet measured on such cards.
VRAM_WHY = ("One whole group per micro-batch everywhere (the fused loss, no extra policy forward). What shrinks with "
            "the card: where the text encoders run (T5 in 8 bits at 16 and 12 GB; on the CPU at 8 GB), the base "
            "weights (nf4 at 12 and 8 GB) and the sampler's batch. Every phase of SD3.5 Medium is planned under the "
            "card's size less the CUDA context and the allocator's slack (`gpo-fast plan`, docs/memory.md).")
VRAM_PRESETS: dict[int, list[str]] = {
    24: ["model.resolution=512", "rollout.group_size=8", "rollout.batch_size=8", "train.micro_batch=8",
         'model.quantize="none"', 'model.t5="full"', 'model.text_encoders="gpu"'],
    16: ["model.resolution=512", "rollout.group_size=8", "rollout.batch_size=4", "train.micro_batch=8",
         'model.quantize="none"', 'model.t5="8bit"', 'model.text_encoders="gpu"'],
    12: ["model.resolution=512", "rollout.group_size=8", "rollout.batch_size=4", "train.micro_batch=8",
         'model.quantize="nf4"', 'model.t5="8bit"', 'model.text_encoders="gpu"', "model.vae_tiling=true"],
    8: ["model.resolution=512", "rollout.group_size=8", "rollout.batch_size=4", "train.micro_batch=8",
        'model.quantize="nf4"', 'model.t5="full"', 'model.text_encoders="cpu"', "model.vae_tiling=true"],
}


# The planned peak of each --vram preset (GiB, to 0.01; the two SD3.5 presets plan the same), from
# `gpo-fast plan --vram N`: `--vram auto` picks the largest preset whose peak fits the card. tests/test_plan.py
# holds this table equal to the planner, so a change to a preset or to the planner that moves a peak fails CI
# until the table is updated.
VRAM_PLANNED_PEAK_GIB: dict[int, float] = {24: 10.84, 16: 6.77, 12: 8.13, 8: 3.76}


def smaller_vram(vram: int | None) -> int | None:
    """The next smaller --vram preset (for an out-of-memory message), or None."""
    sizes = sorted(VRAM_PRESETS, reverse=True)
    if vram is None:
        return sizes[0]
    below = [v for v in sizes if v < vram]
    return below[0] if below else None


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a section")
    node[parts[-1]] = value


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "value_error" and len(first["loc"]) <= 1:  # a section's own check: its message names keys
        return msg.removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'; `gpo-fast config` lists every key"
    return f"config key '{key}': {msg} (got {first.get('input')!r})"


def load_config(path: Path | None = None, preset: str = "toy", overrides: list[str] | None = None) -> Config:
    """The resolved config; ConfigError (one sentence) on any problem."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        _merge(data, file_data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value; got '{item}'")
        _set_dotted(data, key.strip(), _parse_value(value.strip()))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def dump_config(config: Config) -> str:
    import tomli_w

    return tomli_w.dumps(config.model_dump(exclude_none=True))


def describe_config(config: Config) -> str:
    """The config as TOML with each key's meaning as a comment above it (for `gpo-fast config`)."""
    import tomli_w

    lines = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            continue
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(tomli_w.dumps({name: value}).strip())
    for name, field in type(config).model_fields.items():
        section = getattr(config, name)
        if not isinstance(section, BaseModel):
            continue
        lines.append(f"\n[{name}]")
        for key, f in type(section).model_fields.items():
            value = getattr(section, key)
            if f.description:
                lines.append(f"# {f.description}")
            if value is None:
                lines.append(f"# {key} = (unset)")
            elif isinstance(value, dict):  # an inline table keeps it inside its section
                lines.append(f"{key} = {{ " + ", ".join(f'"{k}" = {v!r}' for k, v in value.items()) + " }")
            else:
                lines.append(tomli_w.dumps({key: value}).strip())
    return "\n".join(lines) + "\n"


# Keys a resumed run may change: they do not change the math of the updates already made or to come.
RESUME_HARMLESS = {"out", "train.rollouts", "train.time_budget_s", "train.checkpoint_every", "train.keep_checkpoints",
                   "train.max_bad_updates",
                   "eval.every", "eval.watch_multiple", "rollout.overlap_scoring", "log.report_to", "log.project"}


def resume_conflicts(old: Config, new: Config) -> list[str]:
    """Keys whose change would make a resumed run differ from the run it continues.

    train.rollouts is harmless except under the cosine schedule, whose length it sets."""
    harmless = RESUME_HARMLESS - ({"train.rollouts"} if old.train.lr_schedule == "cosine" else set())
    return [k for k in changed_keys(old, new) if k not in harmless]


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a, b = old.model_dump(), new.model_dump()
    out = []
    for section in a:
        if isinstance(a[section], dict):
            out += [f"{section}.{k}" for k in a[section] if a[section][k] != b[section].get(k)]
        elif a[section] != b[section]:
            out.append(section)
    return out


def _type_name(annotation) -> str:
    """A key's type in words: 'integer', 'one of: "a", "b"', 'list of ...', 'string or unset'."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        return _type_name(next(a for a in args if a is not type(None))) + ", or unset"
    if origin is list:
        return "list of " + _type_name(args[0]).replace("one of", "each one of")
    if origin is dict:
        return "table"
    return {int: "integer", float: "number", bool: "true or false", str: "string"}.get(annotation, str(annotation))


def _range(field) -> str:
    """The bounds pydantic checks (ge, gt, le, lt, pattern, min_length), in words."""
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for item in field.metadata:
        for name, sign in words.items():
            if getattr(item, name, None) is not None:
                parts.append(f"{sign} {getattr(item, name):g}")
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
        if getattr(item, "min_length", None):
            parts.append("not empty")
    return ", ".join(parts)


def _cell(value) -> str:
    import json

    text = json.dumps(value) if isinstance(value, (list, dict, str, bool)) or value is None else f"{value:g}" \
        if isinstance(value, float) else str(value)
    return "`" + text + "`"  # a | is escaped by _row


def _row(*cells) -> str:
    """A Markdown table row; a | inside a cell (code spans too) is escaped."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def config_markdown() -> str:
    """docs/config.md: every key (type, default, allowed values, meaning) and every preset's values with their
    reasons, from the schema and PRESET_WHY (`gpo-fast config --markdown`; a test keeps the committed file equal)."""
    out = ["# Configuration reference", "",
           "This page answers what every key of a `gpo-fast` run means, and what each preset sets and why. It is "
           "generated from the config schema (`gpo_fast/config.py`) by `gpo-fast config --markdown > docs/config.md`; "
           "a test fails when it differs from what that command prints.", "",
           "Set a key in a TOML file (`gpo-fast train my.toml`, with `[section]` tables) or on the command line "
           "(`--set section.key=value`, the value in TOML syntax). Sources, later ones winning: the preset "
           "(`--preset`, default `toy`), then `--vram` for SD3, then the file, then `--set`. "
           "`gpo-fast config --preset NAME` prints a whole config with each key's meaning, as a file you can edit. "
           "A run writes its resolved config to `RUN/config.toml`.", "",
           "The defaults below are the schema's. A preset overrides some of them (its table is further down). The "
           "default run, `gpo-fast train`, is the `toy` preset.", ""]
    header = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    sections = {n: f.annotation for n, f in Config.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    out += ["## Top level", "", *header]
    out += [_row(f"`{name}`", _type_name(f.annotation), _cell(f.get_default(call_default_factory=True)), _range(f),
                 f.description) for name, f in Config.model_fields.items() if name not in sections]
    for name, section in sections.items():
        out += ["", f"## `[{name}]`", "", *header]
        out += [_row(f"`{name}.{key}`", _type_name(f.annotation), _cell(f.get_default(call_default_factory=True)),
                     _range(f), f.description) for key, f in section.model_fields.items()]
    out += ["", "## Presets", "", "`--preset NAME` starts from these values; every other key keeps its default."]
    for preset, values in PRESETS.items():
        out += ["", f"### `{preset}`", "", "| key | value | why |", "|---|---|---|"]
        out += [_row(f"`{key}`", _cell(value), PRESET_WHY[preset][key]) for key, value in _flatten(values).items()]
    out += ["", "## `--vram` presets (SD3)", "", VRAM_WHY, "",
            _row("key", *(f"{v} GB" for v in VRAM_PRESETS)), "|---|" + "---|" * len(VRAM_PRESETS)]
    sets = {v: dict(item.split("=", 1) for item in items) for v, items in VRAM_PRESETS.items()}
    for key in dict.fromkeys(k for items in sets.values() for k in items):
        out.append(_row(f"`{key}`", *(f"`{sets[v][key]}`" if key in sets[v] else "" for v in VRAM_PRESETS)))
    return "\n".join(out) + "\n"


def _flatten(values: dict, prefix: str = "") -> dict:
    """A preset's nested tables as dotted keys."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in Config.model_fields:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat
