"""Rewards: measure(images, prompts) -> RewardResult (reward (B,) float32, higher is better, NaN where the
engine failed; correct (B,) bool; details). Detector and OCR engines load on first use. The toy world's
dot counter is gpo_fast.toy.reward."""

from gpo_fast.rewards.base import Reward, RewardEngineError, RewardResult
from gpo_fast.rewards.composite import WeightedReward
from gpo_fast.rewards.counting import YoloCountReward, count_reward
from gpo_fast.rewards.text import OcrTextReward, levenshtein, text_reward

__all__ = ["OcrTextReward", "Reward", "RewardEngineError", "RewardResult", "WeightedReward", "YoloCountReward",
           "count_reward", "levenshtein", "text_reward"]
