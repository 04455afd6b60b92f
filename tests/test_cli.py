"""The command line (gpo_fast.cli): `config` prints a config that reloads to the same thing, `prompts`
writes a set that loads with disjoint splits, `eval` and `sample` use a run, and bad input anywhere is one
sentence, exit code 2, no traceback."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gpo_fast.config import load_config
from gpo_fast.prompts import item_key, load_prompts

GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))


def _run(*args):
    return subprocess.run([GPO_FAST, *args], capture_output=True, text=True)


@pytest.mark.parametrize("preset", ["toy", "sd35m-counting", "sd35m-text"])
def test_config_prints_every_key_and_reloads_to_the_preset(preset, tmp_path):
    out = _run("config", "--preset", preset, "--set", "train.lr=0.002")
    assert out.returncode == 0, out.stderr
    assert "# Optimizer updates per rollout" in out.stdout  # keys come with their meaning
    path = tmp_path / "c.toml"
    path.write_text(out.stdout)
    assert load_config(path) == load_config(preset=preset, overrides=["train.lr=0.002"])


def test_config_rejects_an_unknown_key_in_one_sentence():
    out = _run("config", "--set", "train.nope=1")
    assert out.returncode == 2 and "train.nope" in out.stderr and "Traceback" not in out.stderr


def test_prompts_writes_disjoint_splits_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "text.jsonl"
    out = _run("prompts", "text", "--out", str(path), "--eval-fraction", "0.25")
    assert out.returncode == 0, out.stderr
    train, val, held = (load_prompts(path, split=s) for s in ("train", "val", "eval"))
    keys = [{item_key(p) for p in part} for part in (train, val, held)]
    assert train and val and held and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert abs(len(held) / (len(train) + len(val) + len(held)) - 0.25) < 0.02
    assert "val" in out.stdout
    no_val = _run("prompts", "text", "--out", str(tmp_path / "nv.jsonl"), "--val-fraction", "0")
    assert no_val.returncode == 0 and "0 val" in no_val.stdout
    too_much = _run("prompts", "text", "--out", str(tmp_path / "x.jsonl"), "--eval-fraction", "0.6",
                    "--val-fraction", "0.5")
    assert too_much.returncode == 2 and "below 1" in too_much.stderr and not (tmp_path / "x.jsonl").exists()
    before = path.read_text()
    again = _run("prompts", "counting", "--out", str(path))
    assert again.returncode == 2 and "exists" in again.stderr and path.read_text() == before


def test_prompts_counting_respects_the_count_range(tmp_path):
    path = tmp_path / "c.jsonl"
    assert _run("prompts", "counting", "--out", str(path), "--n-min", "2", "--n-max", "4").returncode == 0
    ns = {p.n for p in load_prompts(path)}
    assert ns == {2, 3, 4}


def test_eval_of_a_run_reproduces_its_after_accuracy(tmp_path):
    """gpo-fast eval with a run's adapter measures what the run measured on the same seeds."""
    import json

    from gpo_fast.train import train

    cfg = ["eval.samples=40", "eval.steps=3", "eval.every=0", "train.rollouts=2", "train.inner_updates=1",
           "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "train.lr=0.02"]
    run = tmp_path / "run"
    summary = train(load_config(overrides=[*cfg, f'out="{run}"']), log=lambda *a: None).summary
    out = _run("eval", "--adapter", str(run), "--out", str(tmp_path / "ev"), *sum((["--set", c] for c in cfg), []))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["base"]["accuracy"] == summary["accuracy_before"]
    assert report["tuned"]["accuracy"] == summary["accuracy_after"]
    assert abs(report["gain"] - (summary["accuracy_after"] - summary["accuracy_before"])) < 1e-9
    assert (tmp_path / "ev" / "grid.png").is_file() and (tmp_path / "ev" / "accuracy.png").is_file()


def test_eval_of_a_folder_without_an_adapter_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _run("eval", "--adapter", str(tmp_path / "empty"), "--samples", "10", "--set", "eval.steps=1",
               "--out", str(tmp_path / "ev"))
    assert out.returncode == 2 and "no adapter" in out.stderr and "Traceback" not in out.stderr


def test_sample_writes_n_images_per_prompt_and_rejects_unknown_prompts(tmp_path):
    out = _run("sample", "--prompt", "three dots", "--prompt", "1 dot", "--n", "3", "--steps", "2",
               "--out", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 6
    bad = _run("sample", "--prompt", "a cat", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "a cat" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("vram, nxt", [(24, "--vram 16"), (16, "--vram 12"), (12, "--vram 8"), (8, "micro_batch")])
def test_out_of_memory_names_the_next_smaller_preset(vram, nxt, monkeypatch, tmp_path):
    import torch
    from typer.testing import CliRunner

    from gpo_fast import cli

    def oom(config, resume=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "_train_with_progress", oom)
    res = CliRunner().invoke(cli.app, ["train", "--preset", "sd35m-counting", "--vram", str(vram),
                                       "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and nxt in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("gib, explicit, chosen", [(23.99, True, 24), (15.7, True, 24), (11.7, False, 16),
                                                     (7.6, False, 8), (3.0, True, None)])
def test_vram_auto_picks_the_largest_preset_whose_planned_peak_fits_the_card(gib, explicit, chosen, monkeypatch,
                                                                             tmp_path):
    """--vram auto (and the SD3.5 presets' default with a GPU): the largest preset whose planned peak
    (VRAM_PLANNED_PEAK_GIB) fits the card less the context and slack: a 16 GB card fits the 24 GB preset's plan,
    a 12 GB card the 16 GB preset's (below the 12 GB preset's own peak); a card below every peak is one sentence."""
    import torch
    from typer.testing import CliRunner

    from gpo_fast import cli
    from gpo_fast.config import VRAM_PRESETS, load_config
    from gpo_fast.plan import GIB

    seen = []
    monkeypatch.setattr(cli, "_train_with_progress", lambda config, resume=None: seen.append(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("Props", (), {"name": "Fake GPU", "total_memory": int(gib * GIB)})())
    res = CliRunner().invoke(cli.app, ["train", "--preset", "sd35m-counting", *(["--vram", "auto"] if explicit else []),
                                       "--out", str(tmp_path / "r")])
    if chosen is None:
        assert res.exit_code == 2 and "no --vram preset fits" in res.output and not seen
        return
    assert res.exit_code == 0, res.output
    assert f"--vram auto on Fake GPU: --vram {chosen}: its planned peak" in res.output
    assert seen[0] == load_config(preset="sd35m-counting", overrides=[*VRAM_PRESETS[chosen], f'out="{tmp_path / "r"}"'])


def test_vram_auto_without_a_gpu_is_one_sentence_and_the_default_stays_off(monkeypatch, tmp_path):
    import torch
    from typer.testing import CliRunner

    from gpo_fast import cli

    seen = []
    monkeypatch.setattr(cli, "_train_with_progress", lambda config, resume=None: seen.append(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(cli.app, ["train", "--preset", "sd35m-counting", "--vram", "auto"])
    assert res.exit_code == 2 and "no CUDA GPU here" in res.output and "Traceback" not in res.output and not seen
    res = CliRunner().invoke(cli.app, ["train", "--preset", "sd35m-counting", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "--vram auto" not in res.output  # no GPU: no preset applied, as before
    assert seen[0].model.quantize == "none" and seen[0].rollout.batch_size == 8


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.lrr=0.1"], "train.lrr"),
    (["--set", "rollout.group_size=abc"], "rollout.group_size"),
    (["--preset", "nope"], "preset"),
    (["does-not-exist.toml"], "does-not-exist.toml"),
])
def test_config_errors_are_one_sentence_exit_2_no_traceback(args, needle, tmp_path):
    out = subprocess.run([GPO_FAST, "train", *args, "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written


def test_cli_drops_only_the_offline_notice_about_bitsandbytes_cpu_kernel(caplog):
    # on a CPU with AVX512-BF16, importing bitsandbytes asks Hugging Face's kernels package for an optional CPU
    # kernel; with HF_HUB_OFFLINE=1 kernels logs that it skips that kernel's publisher check, a line that would
    # come before every error sentence. The CLI drops that record and no other of the same logger.
    import gpo_fast.cli  # noqa: F401  (installs the filter)

    log = logging.getLogger("kernels._internals.hf_hub")
    with caplog.at_level(logging.WARNING, logger="kernels._internals.hf_hub"):
        log.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
                    "Hugging Face Hub is in offline mode.")
        log.warning("Skipping publisher trust check for 'someone/other-kernel' because Hugging Face Hub is in "
                    "offline mode.")
    messages = [r.getMessage() for r in caplog.records if r.name == "kernels._internals.hf_hub"]
    assert len(messages) == 1 and "someone/other-kernel" in messages[0]
