"""Your own reward in Python: `reward.kind = "python"`, `reward.callable = "package.module:factory"` or
`"path/to/file.py:factory"`, `reward.options = {...}`.

The factory is called once with the options table (a dict) and returns an object with
`measure(images, prompts) -> RewardResult` (gpo_fast.rewards.base): images (B, C, H, W) float in [-1, 1] on the
CPU (C = 3; 1 in the toy world), prompts the gpo_fast.language.Prompt records (text, task, cls, n, target); it returns reward (B,) float,
correct (B,) bool and details (B dicts, or None). An optional `load()` is called before training starts.

Loading the callable runs its code, as loading a YOLO `.pt` does: use only code you trust.

Failures are handled like the built-in engines': an exception while measuring a batch is retried image by image,
and an image that still fails gets reward NaN (excluded from its group) with the error in its details; a batch
where every image fails, a result of the wrong type, shape or dtype, or a factory that cannot be imported or
called is a PythonRewardError: one sentence naming the callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from gpo_fast.errors import UserError
from gpo_fast.rewards.base import RewardResult


class PythonRewardError(UserError):
    """The configured Python reward cannot be loaded or returned something unusable; the message names it."""


def load_factory(spec: str) -> Callable:
    """The factory named by 'package.module:name' or 'path/to/file.py:name'."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise PythonRewardError(f"reward.callable = {spec!r} is not 'package.module:factory' or "
                                "'path/to/file.py:factory'; write the module or file, a colon, and the function")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise PythonRewardError(f"reward.callable = {spec!r}: no such file {path.resolve()}; give the path of "
                                    "the Python file that defines the factory")
        module_spec = importlib.util.spec_from_file_location(f"gpo_fast_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's module: any error is theirs to fix
            raise PythonRewardError(f"reward.callable = {spec!r}: importing {path} failed with "
                                    f"{type(e).__name__}: {e}; fix the file") from e
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise PythonRewardError(f"reward.callable = {spec!r}: no module named {e.name!r} (searched "
                                    f"{', '.join(p or '.' for p in sys.path[:4])}, ...); install the package, add "
                                    "its folder to PYTHONPATH, or give a file path 'path/to/file.py:factory'") from e
        except Exception as e:  # noqa: BLE001
            raise PythonRewardError(f"reward.callable = {spec!r}: importing {where} failed with "
                                    f"{type(e).__name__}: {e}; fix the module") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise PythonRewardError(f"reward.callable = {spec!r}: {where} has no function {name!r}; define it or "
                                "correct the name after the colon")
    return factory


class PythonReward:
    """The reward a user's factory makes, with its results checked and its failures isolated per image."""

    def __init__(self, spec: str, options: dict | None = None):
        self.spec = spec
        factory = load_factory(spec)
        try:
            self.impl = factory(dict(options or {}))
        except Exception as e:  # noqa: BLE001
            raise PythonRewardError(f"reward.callable = {spec!r}: calling it with reward.options failed with "
                                    f"{type(e).__name__}: {e}") from e
        if not callable(getattr(self.impl, "measure", None)):
            raise PythonRewardError(f"reward.callable = {spec!r} returned {type(self.impl).__name__}, which has no "
                                    "measure(images, prompts) method; return an object that has one")

    def load(self) -> None:
        if callable(getattr(self.impl, "load", None)):
            self.impl.load()

    def _checked(self, result, n: int) -> RewardResult:
        """The user's result as a RewardResult of n images, or PythonRewardError saying what is wrong."""
        def bad(what: str) -> PythonRewardError:
            return PythonRewardError(f"reward.callable = {self.spec!r}: measure() returned {what}; return a "
                                     f"RewardResult with reward ({n},) float, correct ({n},) bool and {n} details")
        reward, correct = getattr(result, "reward", None), getattr(result, "correct", None)
        if not isinstance(reward, torch.Tensor) or not isinstance(correct, torch.Tensor):
            raise bad(f"{type(result).__name__} without tensors 'reward' and 'correct'")
        if tuple(reward.shape) != (n,) or not reward.is_floating_point():
            raise bad(f"reward of shape {tuple(reward.shape)} and dtype {reward.dtype}")
        if tuple(correct.shape) != (n,) or correct.dtype != torch.bool:
            raise bad(f"correct of shape {tuple(correct.shape)} and dtype {correct.dtype}")
        details = getattr(result, "details", None)
        details = [{} for _ in range(n)] if details is None else list(details)
        if len(details) != n:
            raise bad(f"{len(details)} details")
        return RewardResult(reward.detach().float().cpu(), correct.detach().cpu(), details)

    def measure(self, images: torch.Tensor, prompts: list) -> RewardResult:
        if images.ndim != 4 or len(prompts) != images.shape[0]:
            raise ValueError(f"images must be (B, C, H, W) with one prompt each; got {tuple(images.shape)} for "
                             f"{len(prompts)} prompts")
        try:
            return self._checked(self.impl.measure(images, prompts), len(prompts))
        except (PythonRewardError, torch.cuda.OutOfMemoryError):
            raise  # out of memory is never a reward: the loop draws the rollout again at a smaller batch
        except Exception:  # noqa: BLE001 - find the images it fails on
            pass
        reward, correct, details, errors = [], [], [], []
        for i in range(len(prompts)):
            try:
                one = self._checked(self.impl.measure(images[i:i + 1], prompts[i:i + 1]), 1)
                reward.append(float(one.reward[0]))
                correct.append(bool(one.correct[0]))
                details.append(one.details[0])
            except (PythonRewardError, torch.cuda.OutOfMemoryError):
                raise
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
                reward.append(math.nan)
                correct.append(False)
                details.append({"error": errors[-1]})
        if len(errors) == len(prompts):
            raise PythonRewardError(f"reward.callable = {self.spec!r} failed on every image of a batch, e.g. "
                                    f"{errors[0]}; fix its measure()")
        return RewardResult(torch.tensor(reward, dtype=torch.float32), torch.tensor(correct), details)
