"""The builders (gpo_fast.components): a config becomes the model, the task (reward and prompts) and the
evaluator, the same way for the loop, `gpo-fast eval` and `gpo-fast sample`."""

import contextlib
import json

import pytest
import torch

from gpo_fast.components import (Task, autocast_for, build_evaluator, build_model, build_prompts, build_task,
                                 resolve_device)
from gpo_fast.config import load_config
from gpo_fast.errors import UserError
from gpo_fast.evaluate import PromptEvaluator
from gpo_fast.language import Prompt
from gpo_fast.prompts import PromptFileError, item_key
from gpo_fast.toy.evaluate import ToyEvaluator
from gpo_fast.toy.reward import DotCountReward

CPU = torch.device("cpu")


def test_the_toy_config_builds_the_toy_world():
    config = load_config(overrides=["reward.partial_credit=true", "eval.samples=30", "eval.steps=3"])
    task = build_task(config, CPU)
    assert isinstance(task.reward, DotCountReward) and task.reward.partial_credit
    assert {p.n for p in task.train_prompts} == {1, 2, 3, 4, 5} and all(p.task == "toy" for p in task.train_prompts)
    evaluator = build_evaluator(config, task, CPU)
    assert isinstance(evaluator, ToyEvaluator) and (evaluator.samples, evaluator.steps) == (30, 3)
    model = build_model(config, CPU)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # a fresh adapter on a frozen base
    assert not any(p.requires_grad for p in build_model(config, CPU, trainable=False).parameters())


def test_a_prompt_set_config_gets_the_prompt_evaluator_over_its_eval_prompts():
    config = load_config(preset="sd35m-counting", overrides=["eval.samples=40", "rollout.batch_size=4"])
    task = Task(reward=object(), train_prompts=[], eval_prompts=[Prompt("a photo of two cats", "counting", "cat", 2)])
    evaluator = build_evaluator(config, task, CPU)
    assert isinstance(evaluator, PromptEvaluator)
    assert (evaluator.prompts, evaluator.samples, evaluator.batch_size) == (task.eval_prompts, 40, 4)


@pytest.mark.parametrize("source", ["counting", "text"])
def test_built_in_sets_hold_out_val_and_eval_items_disjoint(source):
    config = load_config(preset=f"sd35m-{source}")
    train, val, held = build_prompts(config)
    keys = [{item_key(p) for p in part} for part in (train, val, held)]
    assert all(keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert not {p.text for p in val} & {p.text for p in held}  # no validation prompt is an eval prompt
    task = Task(object(), train, held, val)
    assert build_evaluator(config, task, CPU, split="val").prompts == val
    assert build_evaluator(config, task, CPU).prompts == held
    assert "val split" in task.validation


def test_a_prompt_file_without_val_lines_validates_on_the_eval_prompts(tmp_path):
    line = {"prompt": "a photo of two cats", "task": "counting", "class": "cat", "n": 2}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "prompt": "a photo of three cats", "n": 3,
                                                          "split": "eval"}) + "\n")
    config = load_config(preset="sd35m-counting", overrides=[f'data.prompts="{path}"'])
    train, val, held = build_prompts(config)
    assert (len(train), val, len(held)) == (1, [], 1)
    assert "eval prompts on other seeds" in Task(object(), train, held, val).validation
    path.write_text(path.read_text() + json.dumps({**line, "prompt": "a photo of four cats", "n": 4,
                                                   "split": "val"}) + "\n")
    assert [p.n for p in build_prompts(config)[1]] == [4]


def test_a_prompt_file_is_read_before_the_reward_loads(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "two cats", "task": "counting", "class": "cat", "n": 2}) + "\n"
                    + json.dumps({"prompt": "x", "task": "counting", "class": "unicorn", "n": 2}) + "\n")
    config = load_config(preset="sd35m-counting", overrides=[f'data.prompts="{path}"',
                                                             'reward.detector="/nonexistent/yolo.pt"'])
    with pytest.raises(PromptFileError, match="line 2"):  # the prompt file, not the missing detector
        build_task(config, CPU)


def test_cuda_without_a_gpu_is_a_user_error_and_the_cpu_runs_float32():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device(load_config(overrides=['device="cuda"']))
    assert resolve_device(load_config()) == CPU
    assert autocast_for(CPU) is contextlib.nullcontext
