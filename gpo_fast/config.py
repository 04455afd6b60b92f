"""The run configuration: typed, validated, one flat section per concern.

Sources, later ones winning: the preset (default "toy"), a TOML file, `--set section.key=value`
overrides (the value in TOML syntax; a bare word is a string). Unknown keys, wrong types and values out
of range are rejected with the key's dotted name. The resolved config is written to the run folder.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config problem, phrased for the user: what is wrong and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    kind: Literal["toy"] = Field("toy", description="Which model family: the toy world's tiny SD3 transformer.")
    path: Optional[str] = Field(None, description="Folder of a toy model; empty = the base model shipped in the package.")


class LoraSection(_Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (false: fine-tune every weight).")
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"],
        description="Module names the adapter wraps: SD3's attention projections.",
    )


class RolloutSection(_Section):
    prompts: int = Field(8, ge=1, description="Prompts per rollout (P).")
    group_size: int = Field(8, ge=2, description="Images per prompt (G).")
    steps: int = Field(8, ge=1, le=1000, description="Euler steps of the sampler.")
    cfg_scale: float = Field(2.0, ge=1.0, le=30.0, description="Classifier-free guidance scale.")


class TrainSection(_Section):
    rollouts: int = Field(60, ge=1, description="Rollout rounds (each: sample, score, then inner updates).")
    inner_updates: int = Field(4, ge=1, description="Optimizer updates per rollout, each with fresh noise.")
    objective: Literal["gpo", "gpo-pairs", "dpo"] = "gpo"
    beta: float = Field(1000.0, gt=0, le=1e7)
    eps_std: float = Field(1e-6, ge=0)
    min_std: float = Field(1e-6, gt=0, description="Groups whose reward std is below this are skipped.")
    lr: float = Field(3e-3, gt=0, le=1.0)
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_updates: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch: int = Field(0, ge=0, description="Samples per forward/backward; 0 = the whole rollout at once.")
    sigma_dist: Literal["logit-normal", "uniform", "schedule"] = "logit-normal"
    sigma_min: float = Field(0.02, ge=0.0, lt=1.0)
    sigma_max: float = Field(0.98, gt=0.0, le=1.0)
    gradient_checkpointing: bool = False
    time_budget_s: float = Field(0.0, ge=0.0, description="Stop rolling out after this many seconds (0: no limit).")

    @model_validator(mode="after")
    def _sigma_range(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class RewardSection(_Section):
    kind: Literal["toy-count"] = "toy-count"
    min_size: int = Field(1, ge=1, description="Ignore components smaller than this (pixels); 1 = strict.")
    partial_credit: bool = False


class EvalSection(_Section):
    samples: int = Field(1000, ge=10, description="Held-out samples per evaluation.")
    every: int = Field(20, ge=0, description="Evaluate every this many rollouts (0: only before and after).")
    steps: int = Field(12, ge=1, le=1000)
    cfg_scale: float = Field(2.0, ge=1.0, le=30.0)
    seed: int = Field(10_000, description="Seed of the held-out noise (disjoint from training seeds).")


class Config(_Section):
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: a GPU if there is one.")
    out: str = Field("runs/gpo-toy", description="Run folder.")
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    train: TrainSection = Field(default_factory=TrainSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    eval: EvalSection = Field(default_factory=EvalSection)


PRESETS: dict[str, dict] = {
    # the embedded default: GPO on the shipped toy model, a few minutes on two CPU cores
    "toy": {},
}


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
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'; see `gpo-fast train --help` for the keys there are"
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
