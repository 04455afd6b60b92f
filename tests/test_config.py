"""The run configuration (gpo_fast.config): presets, overrides, validation, the resume rules, --vram."""

import pytest
import torch

from gpo_fast.config import (PRESETS, VRAM_PRESETS, ConfigError, describe_config, dump_config, load_config,
                             resume_conflicts, smaller_vram)
from gpo_fast.errors import UserError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_describes_and_dumps_to_a_file_that_reloads_to_it(preset, tmp_path):
    config = load_config(preset=preset)
    for text in (describe_config(config), dump_config(config)):
        path = tmp_path / "c.toml"
        path.write_text(text)
        assert load_config(path, preset="toy") == config  # the file alone says everything, whatever the preset


def test_overrides_take_toml_values_and_bare_words_as_strings():
    config = load_config(overrides=["train.lr=0.01", "train.objective=dpo", 'out="runs/x"', "eval.every=0"])
    assert (config.train.lr, config.train.objective, config.out, config.eval.every) == (0.01, "dpo", "runs/x", 0)


@pytest.mark.parametrize("overrides, needle", [
    (["train.lr=-1"], "train.lr"),
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["train.sigma_min=0.9", "train.sigma_max=0.5"], "sigma_min"),
    (["model.kind=sd3"], "toy model goes with"),
    (['reward.kind="composite"', 'model.kind="sd3"', 'data.prompts="counting"'], "reward.weights"),
    (["train"], "section.key=value"),
    (['model.kind="sd3"', 'data.prompts="counting"', 'reward.kind="yolo-count"', 'model.t5="8bit"',
      'model.text_encoders="cpu"'], "model.t5 = '8bit' runs on the GPU only"),
    (["train.lr.x=1"], "train.lr"),
    (["seed=10000"], "seed = 10000 is eval.seed"),  # training would draw the held-out noise
    (["seed=7", "eval.seed=6"], "the validation seed"),
    (["data.eval_fraction=0.5", "data.val_fraction=0.5"], "must be below 1"),
    (['model.attention="xformers"', "lora.enabled=false"], "cannot run a full fine-tune"),
    (['model.kind="sd3"', 'data.prompts="counting"', 'reward.kind="yolo-count"', 'model.quantize="nf4"',
      "lora.enabled=false"], "set lora.enabled = true"),  # a quantized base trains only a LoRA
    (['model.kind="sd3"', 'data.prompts="counting"', 'reward.kind="yolo-count"', "model.resolution=520"],
     "model.resolution must be a multiple of 16; got 520"),
    (['model.kind="sd3"', 'data.prompts="counting"', 'reward.kind="composite"', "reward.weights={yolo-count=1,clip=1}"],
     "unknown reward 'clip'"),
    (['model.kind="sd3"', 'data.prompts="counting"', 'reward.kind="composite"',
      "reward.weights={yolo-count=1,ocr-text=-0.5}"], "must be finite and >= 0"),
    (['model.kind="sd3"', 'data.prompts="counting"', 'reward.kind="composite"', "reward.weights={yolo-count=nan}"],
     "must be finite and >= 0"),
])
def test_a_bad_value_is_one_config_error_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, UserError)  # the CLI answers it in one sentence


def test_a_missing_file_and_an_unknown_preset_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(preset="nope")


def test_train_rollouts_changes_the_math_only_under_the_cosine_schedule():
    for schedule, expected in (("constant", []), ("cosine", ["train.rollouts"])):
        old = load_config(overrides=[f'train.lr_schedule="{schedule}"', "train.rollouts=10"])
        new = load_config(overrides=[f'train.lr_schedule="{schedule}"', "train.rollouts=20", "train.keep_checkpoints=5"])
        assert resume_conflicts(old, new) == expected
    assert resume_conflicts(load_config(), load_config(overrides=["train.beta=10"])) == ["train.beta"]


@pytest.mark.parametrize("vram", sorted(VRAM_PRESETS))
def test_vram_presets_resolve_to_valid_configs(vram):
    config = load_config(preset="sd35m-text", overrides=VRAM_PRESETS[vram])
    assert config.rollout.group_size >= 2
    assert config.train.micro_batch <= config.rollout.prompts * config.rollout.group_size
    assert (config.model.quantize == "nf4") == (vram <= 12)
    assert config.train.micro_batch % config.rollout.group_size == 0  # whole groups: the fused loss, no extra pass


def test_smaller_vram_walks_down_the_presets():
    assert [smaller_vram(v) for v in (None, 24, 16, 12, 8)] == [24, 16, 12, 8, None]


def test_the_default_seeds_draw_three_distinct_noise_streams():
    from gpo_fast.config import VALIDATION_SEED_OFFSET

    config = load_config()
    seeds = {config.seed, config.eval.seed, config.eval.seed + VALIDATION_SEED_OFFSET}
    assert len(seeds) == 3
    draws = [torch.randn(64, generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert not any(torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])


def test_xformers_with_a_lora_is_allowed():
    assert load_config(preset="sd35m-counting", overrides=['model.attention="xformers"']).model.attention == "xformers"
