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
    "s = importlib.util.find_spec('kernels'); print(k.__file__); print(s and s.origin); "
    "print(gpo_fast.gpo_loss.__module__)"
)


def _not_ours(origin, *places):
    """A top-level `kernels` may exist (Hugging Face's, a dependency of transformers), but is never ours."""
    return origin == "None" or not any(Path(origin).resolve().is_relative_to((p / "kernels").resolve())
                                       for p in places)


def _probe(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.splitlines()


@pytest.mark.slow
def test_installed_package_imports_kernels_under_its_namespace(tmp_path):
    kernels_file, top_level, module = _probe(tmp_path)
    assert Path(kernels_file).name == "__init__.py"
    assert _not_ours(top_level, ROOT)
    assert module == "gpo_fast.kernels"


@pytest.mark.slow
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
    assert _not_ours(top_level, ROOT, site)


def _run_in_root(code, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_source_root_on_sys_path_does_not_shadow_another_kernels_package(tmp_path):
    # `python -m gpo_fast.cli` from a clone puts the root, and so its kernels/ folder, first on sys.path;
    # transformers imports Hugging Face's `kernels` at model-import time. A stand-in plays that package.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'stand-in'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = _run_in_root("import gpo_fast, kernels; print(kernels.CUDAProperties); print(gpo_fast.kernels.__name__)",
                       env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["stand-in", "gpo_fast.kernels"]
    # with no other `kernels` anywhere, the name is missing rather than bound to the folder
    out = _run_in_root("import sys, gpo_fast; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                       "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('missing')")
    assert out.returncode == 0 and out.stdout.strip() == "missing", out.stderr[-2000:]


def test_folder_imported_as_top_level_kernels_says_why(tmp_path):
    out = _run_in_root("import kernels")  # gpo_fast not imported first: no finder to skip the root
    assert out.returncode != 0
    assert "import gpo_fast before transformers" in out.stderr


@pytest.mark.slow
def test_console_script_version():
    exe = Path(sys.executable).with_name("gpo-fast")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    from gpo_fast import __version__

    assert out.stdout.strip() == f"gpo-fast {__version__}"
