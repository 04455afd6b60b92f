"""gpo-fast doctor reports facts about this machine, and a failing check becomes a line with a fix."""

import subprocess
import sys
from pathlib import Path

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
        assert "interpreted" in c["kernels"].detail  # tests/conftest.py sets TRITON_INTERPRET=1
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


def test_doctor_command_exits_0_here(tmp_path):
    out = subprocess.run([str(Path(sys.executable).with_name("gpo-fast")), "doctor"], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "Traceback" not in out.stdout + out.stderr
