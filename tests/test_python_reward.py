"""Your own reward (reward.kind = "python", gpo_fast.rewards.python): docs/rewards.md's example trains the toy world;
a module path works; every failure is one sentence naming the callable, or a NaN for the image it hit."""

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpo_fast.components import build_reward
from gpo_fast.config import ConfigError, load_config
from gpo_fast.language import Prompt
from gpo_fast.rewards.composite import WeightedReward
from gpo_fast.rewards.python import PythonReward, PythonRewardError

ROOT = Path(__file__).resolve().parents[1]
GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))
CPU = torch.device("cpu")
PROMPTS = [Prompt("a photo of two cats", "counting", "cat", 2)] * 3


def _readme_example(tmp_path) -> Path:
    """The complete example of docs/rewards.md, as a user would copy it."""
    text = (ROOT / "docs" / "rewards.md").read_text()
    section = text[text.index("## Your own reward"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "brightness.py"
    path.write_text(code)
    return path


def _write(tmp_path, body: str, name="user_reward.py") -> Path:
    path = tmp_path / name
    path.write_text("import torch\nfrom gpo_fast.rewards.base import RewardResult\n\n" + textwrap.dedent(body))
    return path


def test_the_readme_example_measures_with_its_options(tmp_path):
    path = _readme_example(tmp_path)
    reward = PythonReward(f"{path}:make", {"target": 0.6})
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])  # brightness 0, 0.5, 1
    out = reward.measure(images, PROMPTS)
    torch.testing.assert_close(out.reward, torch.tensor([0.0, 0.5, 1.0]))
    assert out.correct.tolist() == [False, False, True] and out.details[1] == {"brightness": 0.5}


def test_the_toy_world_trains_on_the_readme_example(tmp_path):
    path = _readme_example(tmp_path)
    from gpo_fast.train import train

    config = load_config(overrides=[f'out="{tmp_path / "run"}"', 'reward.kind="python"',
                                    f'reward.callable="{path}:make"', "reward.options.target=0.3",
                                    "train.rollouts=1", "train.inner_updates=1", "rollout.prompts=2",
                                    "rollout.group_size=4", "rollout.steps=2", "eval.samples=10", "eval.steps=2",
                                    "eval.every=0"])
    result = train(config, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 < rows[0]["reward_mean"] < 1.0  # brightness, not a dot count (which would be 0 or 1 per image)
    assert result.summary["steps"] == 1


def test_a_module_path_and_a_composite_mix(tmp_path, monkeypatch):
    _write(tmp_path, """
        class Half:
            def measure(self, images, prompts):
                n = len(prompts)
                return RewardResult(torch.full((n,), 0.5), torch.zeros(n, dtype=torch.bool), None)

        def make(options):
            return Half()
        """, name="my_rewards.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = PythonReward("my_rewards:make").measure(torch.zeros(3, 3, 4, 4), PROMPTS)
    assert out.reward.tolist() == [0.5] * 3 and out.details == [{}] * 3
    config = load_config(preset="sd35m-counting", overrides=[
        'reward.kind="composite"', "reward.weights={python = 1.0, yolo-count = 1.0}",
        'reward.callable="my_rewards:make"', 'reward.detector="yolo11n.yaml"'])
    mixed = build_reward(config, CPU)
    assert isinstance(mixed, WeightedReward) and any(isinstance(r, PythonReward) for r, _ in mixed.members)


def test_an_image_that_fails_is_nan_and_a_batch_where_all_fail_is_one_sentence(tmp_path):
    path = _write(tmp_path, """
        class Picky:
            def measure(self, images, prompts):
                if (images.mean(dim=(1, 2, 3)) > 0.5).any():
                    raise RuntimeError("too bright")
                n = len(prompts)
                return RewardResult(torch.ones(n), torch.ones(n, dtype=torch.bool), [{}] * n)

        def make(options):
            return Picky()
        """)
    reward = PythonReward(f"{path}:make")
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 1.0, 0.0)])
    out = reward.measure(images, PROMPTS)
    assert out.reward[0] == 1.0 and math.isnan(out.reward[1]) and out.reward[2] == 1.0
    assert out.correct.tolist() == [True, False, True] and "too bright" in out.details[1]["error"]
    with pytest.raises(PythonRewardError, match="failed on every image of a batch, e.g. RuntimeError: too bright"):
        reward.measure(torch.ones(3, 3, 4, 4), PROMPTS)


@pytest.mark.parametrize("body, needle", [
    ("def make(options):\n    return object()\n", "has no measure(images, prompts) method"),
    ("def make(options):\n    raise KeyError('scale')\n", "calling it with reward.options failed with KeyError"),
    ("class R:\n    def measure(self, images, prompts):\n        return RewardResult(torch.ones(2), "
     "torch.ones(3, dtype=torch.bool), None)\n\ndef make(options):\n    return R()\n", "reward of shape (2,)"),
    ("class R:\n    def measure(self, images, prompts):\n        return RewardResult(torch.ones(3), "
     "torch.ones(3), None)\n\ndef make(options):\n    return R()\n", "correct of shape (3,) and dtype torch.float32"),
    ("class R:\n    def measure(self, images, prompts):\n        return 1.0\n\ndef make(options):\n    return R()\n",
     "float without tensors"),
    ("import not_a_module_anywhere\n", "importing"),
])
def test_a_broken_reward_is_one_sentence_naming_the_callable(tmp_path, body, needle):
    path = _write(tmp_path, body)
    with pytest.raises(PythonRewardError) as info:
        PythonReward(f"{path}:make").measure(torch.zeros(3, 3, 4, 4), PROMPTS)
    message = str(info.value)
    assert needle in message and f"{path}:make" in message and "\n" not in message


@pytest.mark.parametrize("spec, needle", [
    ("no_colon_here", "is not 'package.module:factory'"),
    ("missing/file.py:make", "no such file"),
    ("surely_not_installed_pkg.rewards:make", "no module named 'surely_not_installed_pkg' (searched"),
    ("json:no_such_function", "has no function 'no_such_function'"),
])
def test_a_callable_that_cannot_be_found_says_where_it_looked(spec, needle):
    with pytest.raises(PythonRewardError, match=re.escape(needle)):
        PythonReward(spec)


def test_config_rules_for_a_python_reward():
    with pytest.raises(ConfigError, match="needs reward.callable"):
        load_config(overrides=['reward.kind="python"'])
    assert load_config(overrides=['reward.kind="python"', 'reward.callable="x.py:make"']).model.kind == "toy"
    with pytest.raises(ConfigError, match="toy model goes with"):  # the toy reward still needs the toy model
        load_config(preset="sd35m-counting", overrides=['reward.kind="toy-count"'])


@pytest.mark.slow
def test_the_cli_refuses_a_missing_callable_in_one_sentence(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--set", 'reward.kind="python"', "--set",
                          f'reward.callable="{tmp_path / "nope.py"}:make"', "--out", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_out_of_memory_in_a_reward_is_never_a_reward_and_the_rollout_retries_smaller(tmp_path):
    """A CUDA out-of-memory error inside measure() reaches the loop (not a NaN reward): the loop draws the rollout
    again at half the batch, so a reward that runs out above 4 images trains at rollout.batch_size = 4."""
    path = _write(tmp_path, """
        class Greedy:
            def measure(self, images, prompts):
                if len(prompts) > 4:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
                n = len(prompts)
                return RewardResult(images.mean(dim=(1, 2, 3)).float(), torch.zeros(n, dtype=torch.bool), [{}] * n)

        def make(options):
            return Greedy()
        """)
    reward = PythonReward(f"{path}:make")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        reward.measure(torch.zeros(6, 3, 4, 4), PROMPTS * 2)
    assert reward.measure(torch.zeros(3, 3, 4, 4), PROMPTS).reward.tolist() == [0.0, 0.0, 0.0]
    from gpo_fast.train import train

    cfg = load_config(overrides=[f'out="{tmp_path / "run"}"', 'reward.kind="python"', f'reward.callable="{path}:make"',
                                 "train.rollouts=1", "train.inner_updates=1", "rollout.prompts=2",
                                 "rollout.group_size=4", "rollout.steps=2", "eval.samples=10", "eval.steps=2",
                                 "eval.every=0", 'log.report_to=["none"]'])
    train(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rollout_batch"] == 4 and rows[0]["reward_failures"] == 0
