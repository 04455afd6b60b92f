"""Stopping on request (gpo_fast.stop): SIGTERM during sampling or during the updates writes a checkpoint and
raises RunStopped; the resumed run ends exactly where an uninterrupted one ends; a second Ctrl-C stops at once;
the CLI exits with the documented code."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import gpo_fast.train as train_module
from gpo_fast.checkpoint import list_checkpoints
from gpo_fast.config import load_config
from gpo_fast.stop import STOPPED_EXIT_CODE, RunStopped, StopRequests
from gpo_fast.train import train


def _config(out):
    return load_config(overrides=[f'out="{out}"', "train.rollouts=4", "train.inner_updates=2", "rollout.prompts=2",
                                  "rollout.group_size=4", "rollout.steps=2", "eval.samples=20", "eval.steps=2",
                                  "eval.every=2", "train.checkpoint_every=2", "train.ema_decay=0.9",
                                  'log.report_to=["none"]'])


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if k != "step_seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run):
    return load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))


def _signal_on_call(monkeypatch, name, call):
    """Wrap gpo_fast.train.<name> so that its `call`-th call first sends this process SIGTERM."""
    real, calls = getattr(train_module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, name, wrapped)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("stop") / "full"
    summary = train(_config(run), log=lambda *a: None).summary
    return run, summary


@pytest.mark.slow
@pytest.mark.parametrize("where, name, call, kept", [
    ("sampling", "rollout", 3, 2),  # the third rollout's sampling: the state as of its start (rollout 2's end)
    ("updates", "gpo_update", 5, 3),  # the third rollout's first update: its updates finish, then rollout 3's end
])
def test_a_stop_request_checkpoints_and_the_resume_ends_as_an_uninterrupted_run(where, name, call, kept, uninterrupted,
                                                                                tmp_path, monkeypatch):
    full, full_summary = uninterrupted
    run = tmp_path / where
    handler = signal.getsignal(signal.SIGTERM)
    _signal_on_call(monkeypatch, name, call)
    with pytest.raises(RunStopped, match=f"rollout {kept} of 4 checkpointed.*--resume {run}"):
        train(_config(run), log=lambda *a: None)
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are put back
    assert list_checkpoints(run)[-1].name == f"rollout-{kept:06d}" and not (run / "summary.json").exists()
    assert len(_rows(run)) == kept
    monkeypatch.undo()
    summary = train(_config(run), log=lambda *a: None, resume=list_checkpoints(run)[-1]).summary
    a, b = _adapter(full), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU
    assert _rows(run) == _rows(full)
    assert summary["accuracy_after"] == full_summary["accuracy_after"] and summary["flops"] == full_summary["flops"]


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopRequests(interrupt_sampling=False) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@...
        assert stop.requested == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a later request changes nothing
        assert stop.requested == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_cli_says_how_to_resume_and_exits_with_the_stopped_code(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from gpo_fast import cli

    def stopped(config, resume=None):
        raise RunStopped(f"stopped on request (SIGTERM) with rollout 3 of 4 checkpointed; continue exactly where it "
                         f"stopped with: gpo-fast train --resume {config.out}")

    monkeypatch.setattr(cli, "_train_with_progress", stopped)
    res = CliRunner().invoke(cli.app, ["train", "--out", str(tmp_path / "r")])
    assert res.exit_code == STOPPED_EXIT_CODE == 75
    assert f"gpo-fast train --resume {tmp_path / 'r'}" in res.output and "Traceback" not in res.output
