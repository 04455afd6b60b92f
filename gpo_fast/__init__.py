"""gpo-fast: Group Preference Optimization for text-to-image diffusion models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpo-fast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

from gpo_fast import _toplevel  # noqa: E402

_toplevel.install()  # before anything imports transformers: see gpo_fast/_toplevel.py

from gpo_fast.kernels import gpo_loss, sample_mse  # noqa: E402

__all__ = ["gpo_loss", "sample_mse", "__version__"]
