"""Rewards: measure(images, prompts) -> RewardResult (reward (B,) float32, higher is better; correct (B,)
bool; details), and score(...) -> the reward alone. Detector and OCR engines load on first use."""

from gpo_fast.rewards.base import Reward, RewardEngineError, RewardResult
from gpo_fast.rewards.composite import WeightedReward
from gpo_fast.rewards.counting import YoloCountReward, count_reward
from gpo_fast.rewards.text import OcrTextReward, levenshtein, normalize, text_reward
from gpo_fast.rewards.toy import DotCountReward, count_dots

__all__ = ["DotCountReward", "OcrTextReward", "Reward", "RewardEngineError", "RewardResult", "WeightedReward",
           "YoloCountReward", "count_dots", "count_reward", "levenshtein", "normalize", "text_reward"]
