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


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["toy", "sd35m-counting", "sd35m-text"])
def test_config_prints_every_key_and_reloads_to_the_preset(preset, tmp_path):
    out = _run("config", "--preset", preset, "--set", "train.lr=0.002")
    assert out.returncode == 0, out.stderr
    assert "# Optimizer updates per rollout" in out.stdout  # keys come with their meaning
    path = tmp_path / "c.toml"
    path.write_text(out.stdout)
    assert load_config(path) == load_config(preset=preset, overrides=["train.lr=0.002"])


@pytest.mark.slow
def test_config_rejects_an_unknown_key_in_one_sentence():
    out = _run("config", "--set", "train.nope=1")
    assert out.returncode == 2 and "train.nope" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_prompts_counting_respects_the_count_range(tmp_path):
    path = tmp_path / "c.jsonl"
    assert _run("prompts", "counting", "--out", str(path), "--n-min", "2", "--n-max", "4").returncode == 0
    ns = {p.n for p in load_prompts(path)}
    assert ns == {2, 3, 4}


@pytest.mark.slow
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


@pytest.mark.slow
def test_eval_of_a_folder_without_an_adapter_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _run("eval", "--adapter", str(tmp_path / "empty"), "--samples", "10", "--set", "eval.steps=1",
               "--out", str(tmp_path / "ev"))
    assert out.returncode == 2 and "no adapter" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_toy_pretrain_writes_its_manifest_and_refuses_to_overwrite(tmp_path):
    """`gpo-fast toy pretrain`: model.safetensors and model.json, whose sha256 is the weights' and whose command and
    settings are this run's; a second run into the same folder is refused and leaves the model as it was."""
    import hashlib
    import json

    out = tmp_path / "base"
    args = ["toy", "pretrain", "--out", str(out), "--steps", "3", "--batch-size", "4", "--eval-samples", "10",
            "--seed", "5"]
    done = _run(*args)
    assert done.returncode == 0, done.stderr
    weights, manifest = out / "model.safetensors", json.loads((out / "model.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["pretrain"]["steps"] == 3 and manifest["pretrain"]["seed"] == 5
    assert "--steps 3" in manifest["command"] and manifest["eval"]["n_samples"] == 10
    before = weights.read_bytes()
    again = _run(*args)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr and weights.read_bytes() == before


def _tiny_run_args(out):
    return ["train", "--out", str(out), "--set", "train.rollouts=1", "--set", "train.inner_updates=1", "--set",
            "rollout.prompts=2", "--set", "rollout.group_size=4", "--set", "rollout.steps=2", "--set",
            "eval.samples=10", "--set", "eval.steps=1", "--set", "eval.every=0", "--report-to", "none"]


@pytest.mark.slow
def test_train_refuses_a_folder_holding_a_finished_or_unfinished_run_and_changes_nothing(tmp_path):
    finished = tmp_path / "finished"
    assert _run(*_tiny_run_args(finished)).returncode == 0
    summary = (finished / "summary.json").read_bytes()
    again = _run(*_tiny_run_args(finished))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr and (finished / "summary.json").read_bytes() == summary
    resumed = _run("train", "--resume", str(finished))
    assert resumed.returncode == 2 and "finished already" in resumed.stderr

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "rollout-000001").mkdir(parents=True)
    (unfinished / "checkpoints" / "rollout-000001" / "state.json").write_text("{}")
    refused = _run(*_tiny_run_args(unfinished))
    assert refused.returncode == 2 and f"--resume {unfinished}" in refused.stderr
    assert sorted(p.name for p in unfinished.rglob("*")) == ["checkpoints", "rollout-000001", "state.json"]


@pytest.mark.slow
def test_train_seed_sets_the_runs_random_draws(tmp_path):
    """--seed reaches the run: written in its config, and another seed draws other rollouts (rewards)."""
    import json

    rows = {}
    for name, seed in (("a", "1"), ("c", "2")):
        out = tmp_path / name
        assert _run(*_tiny_run_args(out), "--seed", seed).returncode == 0
        assert load_config(out / "config.toml").seed == int(seed)
        rows[name] = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows["a"] != rows["c"]  # (the same seed, the same run: tests/test_resume.py and tests/test_toy.py)


@pytest.mark.slow
def test_sample_with_an_adapter_draws_the_tuned_models_images(tmp_path):
    """`gpo-fast sample --adapter RUN` loads the run's adapter: other images than the base's from the same seed,
    and the images of the run's model (its evaluation's `gpo-fast eval` counterpart is tested above)."""
    from gpo_fast.train import train

    cfg = ["eval.samples=10", "eval.steps=1", "eval.every=0", "train.rollouts=2", "train.inner_updates=1",
           "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "train.lr=0.05", 'log.report_to=["none"]']
    run = tmp_path / "run"
    train(load_config(overrides=[*cfg, f'out="{run}"']), log=lambda *a: None)
    pictures = {}
    for name, extra in (("base", []), ("tuned", ["--adapter", str(run)]), ("again", ["--adapter", str(run / "adapter")])):
        out = _run("sample", "--prompt", "three dots", "--n", "2", "--steps", "4", "--out", str(tmp_path / name), *extra)
        assert out.returncode == 0, out.stderr
        pictures[name] = [p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))]
    assert len(pictures["base"]) == 2 and pictures["tuned"] != pictures["base"]
    assert pictures["again"] == pictures["tuned"]  # the run folder and its adapter folder load the same


@pytest.mark.slow
def test_prompts_words_uses_the_given_list_and_a_missing_list_is_one_sentence(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(["garden", "river", "stone", "cloud", "amber", "maple", "north", "quiet"]) + "\n")
    out = tmp_path / "text.jsonl"
    done = _run("prompts", "text", "--words", str(words), "--out", str(out), "--eval-fraction", "0.25",
                "--val-fraction", "0.125")
    assert done.returncode == 0, done.stderr
    targets = {split: {p.target for p in load_prompts(out, split=split)} for split in ("train", "val", "eval")}
    assert set().union(*targets.values()) == set(words.read_text().split())  # these words, no shipped one
    assert len(targets["eval"]) == 2 and len(targets["val"]) == 1 and len(targets["train"]) == 5
    missing = _run("prompts", "text", "--words", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
