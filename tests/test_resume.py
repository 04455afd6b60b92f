"""Nothing lost: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends; a
kill during a checkpoint write leaves the previous one loadable; a damaged checkpoint is named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpo_fast.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint

GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float sums in both runs
ARGS = [f"--set={kv}" for kv in (
    "train.rollouts=8", "train.inner_updates=2", "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2",
    "eval.samples=20", "eval.steps=2", "eval.every=3", "train.checkpoint_every=1", "reward.partial_credit=true")]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


def _gpo_fast(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([GPO_FAST, *args], capture_output=True, text=True, env=ENV, **kw)


def _stopped_run(run: Path, *sets: str) -> None:
    """A finished toy run made to look stopped after its last checkpoint (summary.json removed)."""
    done = _gpo_fast("train", *ARGS, *(f"--set={kv}" for kv in sets), "--out", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    (run / "summary.json").unlink()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    full = subprocess.run([GPO_FAST, "train", *ARGS, "--out", str(tmp_path / "full")], capture_output=True,
                          text=True, env=ENV)
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([GPO_FAST, "train", *ARGS, "--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "rollout-000003" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    resumed = subprocess.run([GPO_FAST, "train", "--resume", str(run)], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = load_file(str(tmp_path / "full" / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU
    assert _rows(run) == _rows(tmp_path / "full")
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (tmp_path / "full", run))
    assert (sa["accuracy_before"], sa["accuracy_after"], sa["best_rollout"]) == \
           (sb["accuracy_before"], sb["accuracy_after"], sb["best_rollout"])
    assert len(list_checkpoints(run)) <= 2  # only the last train.keep_checkpoints remain


def _state(x: float) -> dict:
    return {"rollout": 1, "w": torch.full((3,), x), "nested": {"step": 4, "betas": (0.9, 0.99), 7: [1.5, None]}}


def test_checkpoint_round_trip_keeps_types(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(2.0))
    back = load_checkpoint(path)
    assert torch.equal(back["w"], torch.full((3,), 2.0))
    assert back["nested"] == {"step": 4, "betas": (0.9, 0.99), 7: [1.5, None]}


def test_8bit_adam_states_with_shared_quantization_maps_checkpoint_and_continue_identically(tmp_path):
    """bitsandbytes' AdamW8bit quantizes the states of parameters of 4096+ elements (SD3.5's LoRA matrices, a
    full fine-tune) with quantization maps shared between parameters: the checkpoint holds them, and the
    restored optimizer takes the same next step as the one that never stopped."""
    import bitsandbytes as bnb

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(96, 64))]
        return params, bnb.optim.AdamW8bit(params, lr=1e-2)

    def step(params, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    params, opt = make()
    for i in range(3):
        step(params, opt, i)
    state = [s["__bnb_optimizer_quant_state__"] for s in opt.state_dict()["state"].values()]
    assert state[0]["state1"].dtype == torch.uint8  # quantized: the case this test is about
    assert state[0]["qmap1"].data_ptr() == state[1]["qmap1"].data_ptr()  # the shared map
    path = save_checkpoint(tmp_path, 3, {"weights": [p.detach().clone() for p in params],
                                         "optimizer": opt.state_dict()})
    back = load_checkpoint(path)
    params2, opt2 = make()
    with torch.no_grad():
        for p, w in zip(params2, back["weights"]):
            p.copy_(w)
    opt2.load_state_dict(back["optimizer"])
    step(params, opt, 3)
    step(params2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    from gpo_fast import checkpoint

    save_checkpoint(tmp_path, 1, _state(1.0))

    def dies(*a, **k):
        raise KeyboardInterrupt("killed while writing")  # what a kill looks like from inside the writer

    monkeypatch.setattr(checkpoint, "_fsync", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _state(2.0))
    (tmp_path / "checkpoints" / "rollout-000003").mkdir()  # a folder without a manifest: never complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["rollout-000001"]
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[-1])["w"], torch.full((3,), 1.0))


def test_a_corrupted_checkpoint_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 5, _state(1.0))
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rollout-000005.*corrupted"):
        load_checkpoint(path)


@pytest.mark.slow
def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--resume", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a run folder" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_resume_refuses_a_change_of_the_math_and_names_the_key(tmp_path):
    run = tmp_path / "run"
    _stopped_run(run, "train.rollouts=2", "eval.every=0")
    refused = _gpo_fast("train", "--resume", str(run), "--set", "train.lr=0.5")
    assert refused.returncode == 2 and "train.lr" in refused.stderr and "Traceback" not in refused.stderr


def test_disk_full_while_checkpointing_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    import errno

    from gpo_fast import checkpoint

    save_checkpoint(tmp_path, 1, _state(1.0))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left.*rollout-000001.*intact"):
        save_checkpoint(tmp_path, 2, _state(2.0))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["rollout-000001"]  # no half-written folder
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[-1])["w"], torch.full((3,), 1.0))


def test_disk_full_stops_the_cli_in_one_sentence(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from gpo_fast import checkpoint, cli

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    res = CliRunner().invoke(cli.app, ["train", *ARGS, "--set=train.rollouts=2", "--set=eval.every=0",
                                       "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "No space left" in res.output and "Traceback" not in res.output


def _corrupt(checkpoint: Path) -> None:
    data = bytearray((checkpoint / "tensors.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / "tensors.safetensors").write_bytes(bytes(data))


@pytest.mark.slow
def test_resume_passes_over_a_damaged_latest_checkpoint_and_still_ends_exactly(tmp_path):
    run = tmp_path / "run"
    _stopped_run(run, "train.rollouts=4", "eval.every=0", "train.keep_checkpoints=2")  # stopped after rollout 3
    adapter = run / "adapter" / "pytorch_lora_weights.safetensors"
    uninterrupted, rows = load_file(str(adapter)), _rows(run)
    assert [p.name for p in list_checkpoints(run)] == ["rollout-000002", "rollout-000003"]
    _corrupt(run / "checkpoints" / "rollout-000003")
    resumed = _gpo_fast("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "rollout-000003 is corrupted" in resumed.stderr and "passing over it" in resumed.stderr
    assert (run / "checkpoints" / "damaged-rollout-000003").is_dir()  # kept for a look, out of the keep count
    assert "(rollout 2," in resumed.stdout  # "resumed from .../rollout-000002 (rollout 2, ...)"
    again = load_file(str(adapter))
    assert again.keys() == uninterrupted.keys() and all(torch.equal(again[k], uninterrupted[k]) for k in again)
    assert _rows(run) == rows


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_says_so(tmp_path):
    run = tmp_path / "run"
    _stopped_run(run, "train.rollouts=3", "eval.every=0")
    for checkpoint in list_checkpoints(run):
        _corrupt(checkpoint)
    refused = _gpo_fast("train", "--resume", str(run))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "every checkpoint" in refused.stderr and "damaged" in refused.stderr
    assert list_checkpoints(run) == []  # both moved aside, nothing deleted:
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-rollout-000001", "damaged-rollout-000002"]


@pytest.mark.slow
def test_a_config_edited_by_hand_since_the_checkpoint_is_refused(tmp_path):
    """The checkpoint carries the config it was written with; a hand edit of config.toml that changes
    the math is caught even though --set was not used."""
    import re

    run = tmp_path / "run"
    _stopped_run(run, "train.rollouts=2", "eval.every=0")
    toml = (run / "config.toml").read_text()
    edited = re.sub(r"(?m)^beta = .*$", "beta = 123.0", toml)
    assert edited != toml
    (run / "config.toml").write_text(edited)
    refused = _gpo_fast("train", "--resume", str(run))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "train.beta" in refused.stderr and "rollout-000001" in refused.stderr.replace("\n", "")
    assert (run / "config.toml").read_text() == edited  # nothing was rewritten


@pytest.mark.slow
def test_validation_switched_on_at_a_resume(tmp_path):
    """eval.every may change on resume, also from 0 (no best snapshot in the checkpoint) to validating."""
    run = tmp_path / "run"
    _stopped_run(run, "train.rollouts=3", "eval.every=0")
    resumed = _gpo_fast("train", "--resume", str(run), "--set", "eval.every=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["best_rollout"] in (2, 3)


@pytest.mark.slow
def test_resume_latest_skips_finished_runs_and_half_written_checkpoints(tmp_path):
    finished = tmp_path / "runs" / "finished" / "checkpoints" / "rollout-000001"
    finished.mkdir(parents=True)
    (finished / "manifest.json").write_text("{}")
    (finished.parents[1] / "summary.json").write_text("{}")
    half = tmp_path / "runs" / "killed" / "checkpoints" / ".tmp-rollout-000001"  # killed before the rename
    half.mkdir(parents=True)
    (half / "manifest.json").write_text("{}")
    out = _gpo_fast("train", "--resume", "latest", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no unfinished run with a checkpoint" in out.stderr


@pytest.mark.slow
def test_a_resumed_run_continues_the_moving_averages_of_the_weights(tmp_path):
    """train.ema_decay with eval.every = 0 saves the moving average after the last update, and
    train.reference_decay's average is the reference of the updates after the resume: the run ends the same
    only if the checkpoint carried both."""
    full, run = tmp_path / "full", tmp_path / "run"
    sets = ("train.rollouts=4", "eval.every=0", "train.ema_decay=0.9", "train.reference_decay=0.8")
    done = _gpo_fast("train", *ARGS, *(f"--set={kv}" for kv in sets), "--out", str(full))
    assert done.returncode == 0, done.stderr[-2000:]
    _stopped_run(run, *sets)  # stopped after rollout 3
    resumed = _gpo_fast("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(rollout 3," in resumed.stdout
    a, b = (load_file(str(r / "adapter" / "pytorch_lora_weights.safetensors")) for r in (full, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run) == _rows(full)
