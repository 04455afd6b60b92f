"""The reward-hacking watch (gpo_fast.watch): image statistics by hand, the drift in base spreads, one warning only
while the reward climbs; a toy run on a reward that pays for dark images sets it off."""

import json

import pytest
import torch

from gpo_fast.config import load_config
from gpo_fast.watch import STATS, DriftWatch, StatsAccumulator, image_stats, reward_climbing


def test_image_statistics_by_hand():
    black = -torch.ones(1, 3, 4, 4)
    white = torch.ones(1, 3, 4, 4)
    half = torch.cat([-torch.ones(1, 3, 4, 2), torch.ones(1, 3, 4, 2)], dim=3)  # left black, right white
    red = torch.stack([torch.ones(4, 4), -torch.ones(4, 4), -torch.ones(4, 4)])[None]
    s = image_stats(torch.cat([black, white, half, red]))
    assert s["brightness"].tolist() == pytest.approx([0.0, 1.0, 0.5, 1 / 3])
    assert s["near_black"].tolist() == [1.0, 0.0, 0.5, 0.0] and s["near_white"].tolist() == [0.0, 1.0, 0.5, 0.0]
    assert s["contrast"].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0])
    assert s["saturation"].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])
    assert s["high_freq"].tolist() == pytest.approx([0.0, 0.0, (1.0 * 4 / 12 + 0.0) / 2, 0.0])  # one edge in 3 columns


def _summary(values):
    acc = StatsAccumulator()
    acc.add(values)
    return acc.summary()


def test_the_watch_warns_once_beyond_its_multiple_and_only_while_the_reward_climbs():
    g = torch.Generator().manual_seed(0)
    base_images = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    watch = DriftWatch(_summary(base_images), multiple=1.0)
    same = _summary(torch.rand(64, 3, 8, 8, generator=g) * 2 - 1)
    dark = _summary(base_images * 0.05 - 0.95)  # nearly black
    assert max(abs(d) for d in watch.drift(same).values()) < 1.0
    assert watch.check(same, reward_climbing=True, rollout=2) is None  # nothing moved
    assert watch.check(dark, reward_climbing=False, rollout=4) is None  # moved, but the reward is not climbing
    warning = watch.check(dark, reward_climbing=True, rollout=6)
    assert warning.startswith("rollout 6: the reward is climbing") and "brightness fell" in warning
    assert watch.check(dark, reward_climbing=True, rollout=8) is None and watch.warning == warning  # once
    assert set(watch.max_drift) == set(STATS) and watch.max_drift["brightness"] > 1.0
    assert DriftWatch(_summary(base_images), multiple=0).check(dark, True, 6) is None  # 0: never warns


def test_reward_climbing_compares_the_last_rollouts_with_the_first():
    assert reward_climbing([0.1, 0.2, 0.2, 0.5, 0.6, 0.7]) and not reward_climbing([0.5, 0.5, 0.4, 0.3])
    assert not reward_climbing([0.5]) and reward_climbing([float("nan"), 0.1, 0.4])


@pytest.mark.slow
def test_a_reward_that_pays_for_dark_images_sets_the_watch_off(tmp_path):
    """The toy world on a hackable reward (darker is better) at a high lr: the images go black within a few
    rollouts while the reward climbs, and the watch says so (in the log, metrics.jsonl and summary.json)."""
    from gpo_fast.train import train

    (tmp_path / "dark.py").write_text(
        "from gpo_fast.rewards.base import RewardResult\n\n\n"
        "class Dark:\n"
        "    def measure(self, images, prompts):\n"
        "        dark = 1 - (images.float().mean(dim=(1, 2, 3)) + 1) / 2\n"
        "        return RewardResult(dark, dark > 0.97, None)\n\n\n"
        "def make(options):\n"
        "    return Dark()\n")
    logged = []
    config = load_config(overrides=[f'out="{tmp_path / "run"}"', 'reward.kind="python"',
                                    f'reward.callable="{tmp_path / "dark.py"}:make"', "train.lr=0.01",
                                    "train.rollouts=4", "train.inner_updates=2", "rollout.prompts=4",
                                    "eval.samples=40", "eval.every=2"])
    summary = train(config, log=logged.append).summary
    assert summary["watch"]["warning"] and "brightness fell" in summary["watch"]["warning"]
    assert any(line.startswith("warning: rollout") for line in logged)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["watch_brightness"] < -1.0  # in base spreads
