"""Fused GPO kernels (installed as ``gpo_fast.kernels``; the folder is ``kernels/`` in the repository).

    sample_mse(pred, target) -> (N,) float32
    gpo_loss(pred, target, ref_err, rewards, *, group_size, beta, objective="gpo") -> scalar float32

Group members are contiguous along dim 0 (N = P * G). On CUDA tensors these run the Triton kernels;
elsewhere the PyTorch reference in ``gpo_fast.objective``, or, when ``TRITON_INTERPRET=1`` was set
before this module was imported, the same Triton kernels through Triton's interpreter (how CI tests
them on a CPU). Both are differentiable with respect to ``pred`` only.
"""

from __future__ import annotations

import torch

from gpo_fast import objective as _ref
from gpo_fast.objective import DEFAULT_EPS_STD, DEFAULT_MIN_STD, OBJECTIVES

try:  # triton exists on Linux only; elsewhere everything runs the reference
    from .gpo import gpo_loss_triton
    from .mse import INTERPRETED, sample_mse_triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the platform
    TRITON_AVAILABLE = False
    INTERPRETED = False

__all__ = ["gpo_loss", "sample_mse", "uses_triton", "interpreter_problem", "INTERPRETER_FIX", "OBJECTIVES",
           "DEFAULT_EPS_STD", "DEFAULT_MIN_STD"]


INTERPRETER_FIX = "install 'numpy<2.4', or Triton 3.7 or later, in this environment"


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels here, or None (what to do: INTERPRETER_FIX).

    Before Triton 3.7 the interpreter turns a scalar kernel argument into a Python int with int() of a
    one-element array, which numpy 2.4 and later refuse ("only 0-dimensional arrays can be converted to
    Python scalars"): every kernel that loops up to a runtime size fails. Seen with torch 2.11, whose
    wheels pin triton 3.6. Native compilation on a GPU is not affected."""
    if not (TRITON_AVAILABLE and INTERPRETED):
        return None
    import numpy
    import triton
    from packaging.version import Version  # a dependency of transformers, bitsandbytes and pytest

    if Version(triton.__version__).release[:2] < (3, 7) and Version(numpy.__version__).release[:2] >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                f"{numpy.__version__}")
    return None


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the kernels run as Triton for a tensor on this device (natively or interpreted)."""
    if not TRITON_AVAILABLE:
        return False
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu")


def sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of (pred - target)^2 over all but dim 0: (N,) float32."""
    _ref.check_pred_target(pred, target)
    if uses_triton(pred):
        return sample_mse_triton(pred, target)
    return _ref.sample_mse(pred, target)


def gpo_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_err: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    beta: float,
    objective: str = "gpo",
    eps_std: float = DEFAULT_EPS_STD,
    min_std: float = DEFAULT_MIN_STD,
    return_policy_err: bool = False,
):
    """The GPO loss of ``shared/design/method.md``, a float32 scalar differentiable in ``pred``.

    pred, target: (N, ...) float32 / bfloat16 / float16, the G members of each group contiguous.
    ref_err:      (N,) the reference model's per-sample error (``sample_mse`` of its prediction).
    rewards:      (N,) raw rewards; standardized per group inside the loss. A non-finite reward (NaN:
                  the reward engine failed on that image) excludes its member from its group.
    objective:    "gpo" (default), "gpo-pairs" or "dpo" (best vs worst of each group).
    eps_std, min_std: the standardization's epsilon and the degenerate-group threshold.
    return_policy_err: also return the policy's per-sample error e (N,), detached, for logging.
    """
    _ref.check_gpo_args(pred, target, ref_err, rewards, group_size, beta, objective, eps_std, min_std)
    if uses_triton(pred):
        loss, policy_err = gpo_loss_triton(
            pred, target, ref_err, rewards, group_size=group_size, beta=beta,
            objective=objective, eps_std=eps_std, min_std=min_std,
        )
    else:
        policy_err = _ref.sample_mse(pred, target)
        loss = _ref.loss_from_errors(
            policy_err, ref_err, rewards, group_size=group_size, beta=beta,
            objective=objective, eps_std=eps_std, min_std=min_std,
        )
        policy_err = policy_err.detach()
    return (loss, policy_err) if return_policy_err else loss
