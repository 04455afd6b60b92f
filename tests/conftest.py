"""Test setup: on a machine without CUDA, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before the @triton.jit decorators run, so before anything imports
gpo_fast. On a CUDA machine (benchmarks/gpu_check.sh) the kernels compile natively instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Stop at once, with what to do, where Triton's interpreter cannot run the kernels (rather than ~75
    parity tests failing inside the interpreter with "only 0-dimensional arrays can be converted")."""
    from gpo_fast.kernels import INTERPRETER_FIX, interpreter_problem

    problem = interpreter_problem()
    if problem:
        raise pytest.UsageError(f"{problem}: {INTERPRETER_FIX}.")


# Where the parity tests run the Triton kernels: CUDA if present, else the interpreter on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE
