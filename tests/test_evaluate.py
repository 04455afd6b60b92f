"""Held-out evaluation (gpo_fast.evaluate, gpo_fast.toy.evaluate): the same seeds give the same numbers
through either evaluator, failures are counted, only the kept images come back, a missing run is one
sentence."""

import math

import pytest
import torch

from gpo_fast.errors import UserError
from gpo_fast.evaluate import PromptEvaluator, load_tuned
from gpo_fast.language import Prompt
from gpo_fast.rewards.base import RewardResult
from gpo_fast.toy.data import MAX_DOTS, prompt_for
from gpo_fast.toy.evaluate import ToyEvaluator
from gpo_fast.toy.model import ToyModel
from gpo_fast.toy.reward import DotCountReward

TOY_PROMPTS = [Prompt(text=prompt_for(n), task="toy", n=n) for n in range(1, MAX_DOTS + 1)]


def test_the_prompt_evaluator_with_the_dot_counter_is_the_toy_evaluator():
    """The same prompts in the same order and the same seed: the same accuracy, whichever evaluator."""
    model = ToyModel.from_pretrained()
    toy_metrics, toy_images = ToyEvaluator(samples=60, steps=4, cfg_scale=2.0, keep_images=12)(model, seed=3)
    evaluator = PromptEvaluator(DotCountReward(), TOY_PROMPTS, samples=60, steps=4, cfg_scale=2.0, batch_size=0,
                                keep_images=12)
    metrics, tiles = evaluator(model, seed=3)
    assert 0 < metrics["accuracy"] < 1 and metrics["accuracy"] == toy_metrics["accuracy"]
    acc = metrics["accuracy"]
    assert metrics["accuracy_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 60))
    assert tiles.images.shape == (12, 1, 16, 16) and torch.equal(tiles.images, toy_images.images)
    assert tiles.labels == toy_images.labels == [str(p.n) for p in (TOY_PROMPTS * 3)[:12]]
    assert tiles.correct == toy_images.correct  # the reward's verdict per tile is the strict counter's
    assert metrics["failed"] == 0
    assert ToyEvaluator.headline and PromptEvaluator.headline == {}


def test_batches_keep_the_first_images_and_count_failed_rewards():
    class HalfFails:
        def measure(self, images, prompts):
            reward = torch.tensor([math.nan if i % 2 else 1.0 for i in range(len(prompts))])
            return RewardResult(reward, torch.isfinite(reward), [{} for _ in prompts])

    model = ToyModel.from_pretrained()
    metrics, tiles = PromptEvaluator(HalfFails(), TOY_PROMPTS, samples=20, steps=2, cfg_scale=2.0, batch_size=6,
                                      keep_images=7)(model, seed=0)
    assert len(tiles) == 7 and tiles.correct == [i % 2 == 0 for i in range(7)]
    assert metrics["failed"] == 10 and metrics["reward_mean"] == 1.0  # 20 = 6 + 6 + 6 + 2: 3 + 3 + 3 + 1 fail
    assert metrics["accuracy"] == 0.5


def test_a_folder_without_an_adapter_or_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no adapter"):
        load_tuned(ToyModel(), tmp_path)

