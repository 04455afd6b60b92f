"""The distribution installs kernels/ as gpo_fast.kernels, never as a top-level `kernels` module."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, gpo_fast, gpo_fast.kernels as k; "
    "print(k.__file__); print(importlib.util.find_spec('kernels')); print(gpo_fast.gpo_loss.__module__)"
)


def _probe(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.splitlines()


def test_installed_package_imports_kernels_under_its_namespace(tmp_path):
    kernels_file, top_level, module = _probe(tmp_path)
    assert Path(kernels_file).name == "__init__.py"
    assert top_level == "None"
    assert module == "gpo_fast.kernels"


def test_wheel_maps_kernels_folder_into_the_package(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("gpo_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpo_fast/kernels/__init__.py" in names and "gpo_fast/kernels/gpo.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert "gpo_fast/toy/weights/model.safetensors" in names  # the shipped toy base model
    # a non-editable install of that wheel imports, from anywhere
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    kernels_file, top_level, _ = _probe(tmp_path, env)
    assert Path(kernels_file).is_relative_to(site)
    assert top_level == "None"


def test_console_script_version():
    exe = Path(sys.executable).with_name("gpo-fast")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    from gpo_fast import __version__

    assert out.stdout.strip() == f"gpo-fast {__version__}"
