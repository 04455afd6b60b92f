"""gpo-fast doctor reports facts about this machine, and a failing check becomes a line with a fix."""

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpo_fast import doctor


def _by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_reports_this_machine(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no request leaves the machine
    c = _by_name(doctor.checks())
    assert c["torch"].ok and torch.__version__ in c["torch"].detail
    if not torch.cuda.is_available():
        assert c["cuda"].ok is None and "no CUDA GPU" in c["cuda"].detail
    else:
        assert c["cuda"].ok and torch.cuda.get_device_name() in c["cuda"].detail
    if os.environ.get("TRITON_INTERPRET") == "1":  # tests/conftest.py sets it on a machine without CUDA
        assert "interpreted" in c["kernels"].detail
    assert c["easyocr"].ok  # the test extra ships the offline English weights
    assert c["hub"].ok is None and "HF_HUB_OFFLINE" in c["hub"].detail and c["hub"].fix
    assert c["yolo"].ok is None and "yolo11x.pt" in c["yolo"].detail  # no detector weights here


def test_a_failing_check_is_a_line_with_a_fix_and_main_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_import = doctor.importlib.import_module

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("simulated")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(doctor.importlib, "import_module", no_peft)
    c = _by_name(doctor.checks())
    assert c["peft"].ok is False and c["peft"].fix
    from rich.console import Console

    assert doctor.main(Console(file=open("/dev/null", "w"))) == 1  # a required package fails


@pytest.mark.slow
def test_doctor_command_exits_0_here(tmp_path):
    out = subprocess.run([str(Path(sys.executable).with_name("gpo-fast")), "doctor"], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_a_check_that_raises_is_a_failed_line_and_the_others_still_run(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def broken():
        raise RuntimeError("simulated driver fault")

    monkeypatch.setattr(doctor, "_cuda", broken)
    c = _by_name(doctor.checks())
    assert c["cuda"].ok is False and "simulated driver fault" in c["cuda"].detail and c["cuda"].fix
    # the lines after it are still there, each in its own state: the kernels interpreted here (the tests' conftest),
    # native on a GPU; the disk's free space measured
    import torch

    assert c["kernels"].ok is (True if torch.cuda.is_available() else None) and "triton" in c["kernels"].detail
    assert isinstance(c["disk"].ok, bool) and "GiB free here" in c["disk"].detail


def test_optional_packages_missing_are_lines_and_exit_0(monkeypatch, capsys):
    """bitsandbytes, ultralytics and easyocr failing to import: each a failed line with a fix, and `main`
    still returns 0 (they are warnings; torch, diffusers, transformers and peft are the required ones)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_import = builtins.__import__
    gone = ("bitsandbytes", "ultralytics", "easyocr")

    def no_optional(name, *args, **kwargs):
        if name.split(".")[0] in gone:
            raise ImportError(f"simulated: no {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    c = _by_name(doctor.checks())
    for name in ("bitsandbytes", "yolo", "easyocr"):
        assert c[name].ok is False and c[name].fix, c[name]
    assert doctor.main() == 0
    out = capsys.readouterr().out
    assert "bitsandbytes" in out and "FAIL" in out


def test_render_is_one_line_per_check(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = doctor.checks()
    lines = doctor.render(results).splitlines()
    assert len(lines) == len(results)
    assert all(line.split()[1] == c.name for line, c in zip(lines, results))


def test_an_interpreter_that_cannot_run_the_kernels_is_a_failing_line(monkeypatch):
    from gpo_fast import kernels

    monkeypatch.setattr(kernels, "interpreter_problem",
                        lambda: "Triton 3.6.0's interpreter (TRITON_INTERPRET=1) cannot run with numpy 2.5.2")
    line = doctor._kernels()
    assert line.ok is False and "numpy 2.5.2" in line.detail and line.fix == kernels.INTERPRETER_FIX
