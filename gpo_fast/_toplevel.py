"""Keep the source tree's ``kernels/`` folder from shadowing Hugging Face's ``kernels`` package.

The repository keeps its Triton kernels in a top-level ``kernels/`` folder, installed as
``gpo_fast.kernels``. Hugging Face's ``kernels`` package (a dependency of recent transformers, which
imports it at model-import time) has the same top-level name. When the repository root is on
``sys.path`` (``python -m gpo_fast.cli`` or ``torchrun -m gpo_fast.cli`` from a clone, ``PYTHONPATH=.``),
a plain ``import kernels`` would find the folder first and transformers would fail on it.
``install()`` puts a finder first on ``sys.meta_path`` that looks ``kernels`` up in every ``sys.path``
entry except the source root. It does nothing in an installed wheel, which has no source root.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

# the repository root, when gpo_fast runs from a source tree (editable install or PYTHONPATH)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_SOURCE_TREE = all(
    os.path.isfile(os.path.join(_ROOT, *parts)) for parts in (("pyproject.toml",), ("kernels", "gpo.py"))
)


def _is_root(entry: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), _ROOT)
    except OSError:  # an entry that does not exist (or a zip file) is not the root
        return False


class SkipSourceTreeKernels(importlib.abc.MetaPathFinder):
    """Finds the top-level ``kernels`` module anywhere on sys.path except in the source root."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels" or path is not None:
            return None
        entries = [entry for entry in sys.path if not _is_root(entry)]
        if len(entries) == len(sys.path):
            return None  # the root is not on sys.path: the normal search cannot reach the folder
        spec = importlib.machinery.PathFinder.find_spec(fullname, entries)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return spec


def install() -> None:
    if IN_SOURCE_TREE and not any(isinstance(f, SkipSourceTreeKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, SkipSourceTreeKernels())
