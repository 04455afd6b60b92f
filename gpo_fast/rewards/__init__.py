"""Rewards: score(images, prompts) -> (B,) float32 tensor, higher is better."""

from gpo_fast.rewards.toy import DotCountReward, count_dots

__all__ = ["DotCountReward", "count_dots"]
