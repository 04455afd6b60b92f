"""Shared pieces of the tests that run the SD3 path on the tiny SD3 built in code (gpo_fast.models.testing)."""

from gpo_fast.rewards.base import RewardResult


class BrightnessReward:
    """A dense stand-in reward (mean brightness): the tiny SD3's random images hold nothing to count or read, and
    a dense reward gives every group a spread, so the adapter moves."""

    def measure(self, images, prompts):
        r = images.float().mean(dim=(1, 2, 3))
        return RewardResult(r, r > 0, [{} for _ in prompts])
