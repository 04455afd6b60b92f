"""Experiment trackers (log.report_to, gpo_fast.tracking): a toy run's scalars reach TensorBoard, Weights & Biases
(offline: no account, no network) and Trackio (local files) with the values of metrics.jsonl; the config and the
pictures go along; a resume continues the same tracker run; a tracker that is not installed is one sentence."""

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gpo_fast.config import ConfigError, load_config

GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))
TINY = ["--set", "train.rollouts=2", "--set", "train.inner_updates=1", "--set", "rollout.prompts=2",
        "--set", "rollout.group_size=4", "--set", "rollout.steps=2", "--set", "eval.samples=20",
        "--set", "eval.steps=2", "--set", "eval.every=1", "--set", "reward.partial_credit=true"]
SCALARS = ("loss", "reward_mean", "accuracy", "grad_norm", "val_accuracy")


def _offline_env(tmp_path: Path) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}


def _wandb_records(path: Path):
    """The records of an offline wandb run file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks; each chunk a 7-byte header: crc32, length, type FULL=1 / FIRST / MIDDLE / LAST=4)
    around serialized wandb Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_a_toy_run_reports_its_scalars_config_and_pictures_to_every_tracker(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([GPO_FAST, "train", "--out", str(run), "--report-to", "tensorboard,wandb,trackio", *TINY],
                         capture_output=True, text=True, env=_offline_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rows] == [1, 2]
    expected = {r["rollout"]: {k: r[k] for k in SCALARS} for r in rows}
    ids = json.loads((run / "trackers.json").read_text())

    # TensorBoard: events in RUN/tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    for key in SCALARS:
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx({s: v[key] for s, v in expected.items()})
    assert {"samples/validation", "final/before_after", "final/reward_curve"} <= set(events.Tags()["images"])
    assert list((run / "tensorboard").glob("*/hparams.yml"))  # the resolved config

    # Weights & Biases, offline: the run file under RUN/wandb holds the same history and the config
    [wandb_file] = (run / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    history, config = {}, {}
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.setdefault(record.history.step.num, {}).update(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    for step, values in expected.items():
        assert {k: json.loads(history[step][k]) for k in SCALARS} == pytest.approx(values)
    assert "samples/validation/_type" in history[1] and "final/before_after/_type" in history[2]
    assert config["train.lr"] == 1.5e-3 and config["rollout.group_size"] == 4 and config["out"] == str(run)

    # Trackio: its local SQLite database under TRACKIO_DIR, one per project
    with sqlite3.connect(tmp_path / "trackio" / "gpo-fast.db") as db:
        logged = {}  # each log call is a row: merge a step's rows
        for step, metrics in db.execute("select step, metrics from metrics where run_name = ?", (ids["name"],)):
            logged.setdefault(step, {}).update(json.loads(metrics))
        [(stored,)] = db.execute("select config from configs where run_name = ?", (ids["name"],)).fetchall()
    for step, values in expected.items():
        assert {k: logged[step][k] for k in SCALARS} == pytest.approx(values)
    assert json.loads(stored)["train.reference_decay"] == 0.95


def test_report_to_none_writes_metrics_but_no_tracker_files(tmp_path):
    from gpo_fast.train import train

    config = load_config(overrides=[f'out="{tmp_path / "run"}"', 'log.report_to=["none"]', "train.rollouts=1",
                                    "train.inner_updates=1", "rollout.prompts=2", "rollout.group_size=4",
                                    "rollout.steps=2", "eval.samples=20", "eval.steps=2", "eval.every=0"])
    train(config, log=lambda *a: None)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / "trackers.json").exists()


@pytest.mark.slow
def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    from gpo_fast.tracking import Trackers

    for key, value in _offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    config = load_config(overrides=[f'out="{tmp_path}"', 'log.report_to=["wandb"]'])
    first = Trackers(config, tmp_path, resume_step=None)
    first.log({"loss": 1.0}, step=1)
    first_id = first.trackers[0].run.id
    first.finish()
    again = Trackers(config, tmp_path, resume_step=1)
    assert again.trackers[0].run.id == first_id
    again.finish()
    (tmp_path / "other").mkdir()
    fresh = Trackers(config, tmp_path / "other", resume_step=None)
    assert fresh.trackers[0].run.id != first_id
    fresh.finish()


def test_a_tracker_that_is_not_installed_is_one_sentence_before_anything_is_written(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    from gpo_fast.tracking import TrackerError, check_trackers

    with pytest.raises(TrackerError, match=r'pip install "gpo-fast\[mlflow\]"'):
        check_trackers(load_config(overrides=['log.report_to=["tensorboard", "mlflow"]']))
    check_trackers(load_config(overrides=['log.report_to=["tensorboard", "wandb"]']))  # both installed: no error


def test_a_tracker_that_cannot_start_is_one_sentence_before_the_first_evaluation(tmp_path, monkeypatch):
    from accelerate.tracking import WandBTracker

    from gpo_fast.tracking import TrackerError
    from gpo_fast.train import train

    def refuse(self):
        raise RuntimeError("api.wandb.ai is unreachable\nTraceback-like detail")

    monkeypatch.setattr(WandBTracker, "start", refuse)
    config = load_config(overrides=[f'out="{tmp_path / "run"}"', 'log.report_to=["tensorboard", "wandb"]'])
    with pytest.raises(TrackerError, match=r"^log.report_to: wandb could not start \(api.wandb.ai is unreachable\); "):
        train(config, log=lambda *a: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the base model's evaluation


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_the_cli_names_the_extra_of_a_missing_tracker_and_writes_nothing(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--out", str(tmp_path / "run"), "--report-to", "mlflow"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and 'pip install "gpo-fast[mlflow]"' in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_unknown_tracker_is_refused_by_the_cli_in_one_sentence(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--out", str(tmp_path / "run"), "--report-to", "wandb,comet"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "log.report_to" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("report_to, needle", [('["none", "wandb"]', "'none' cannot stand beside"),
                                               ('["wandb", "wandb"]', "names a tracker twice")])
def test_report_to_rejects_none_beside_a_tracker_and_repeats(report_to, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[f"log.report_to={report_to}"])
