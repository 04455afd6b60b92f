"""Fused GPO kernels (installed as ``gpo_fast.kernels``; the folder is ``kernels/`` in the repository).

The loss as the training loop reaches it, in one module:
    sample_mse(pred, target) -> (N,) float32
    gpo_loss(pred, target, ref_err, rewards, spec) -> scalar float32, differentiable in pred
    loss_coefficients(policy_err, ref_err, rewards, spec) -> (loss, c = dL/de): micro-batches smaller
        than a group take the gradient of the whole batch from these N coefficients
    valid_groups(rewards, spec) -> (P,) bool: the groups that are not degenerate
``spec`` is a ``LossSpec`` (group size, beta, objective, eps_std, min_std; gpo_fast.objective), or its
fields as keywords: ``gpo_loss(pred, target, ref_err, rewards, group_size=8, beta=1000.0)``.

Group members are contiguous along dim 0 (N = P * G). On CUDA tensors these run the Triton kernels
(mse.py, gpo.py); elsewhere the PyTorch reference in ``gpo_fast.objective``, or, when
``TRITON_INTERPRET=1`` was set before this module was imported, the same Triton kernels through Triton's
interpreter (how CI tests them on a CPU). Both are differentiable with respect to ``pred`` only.
The argument checks and the dtypes the kernels take (KERNEL_DTYPES) live here.
"""

from __future__ import annotations

if __name__ == "kernels":  # the repository root is on sys.path and gpo_fast was not imported first
    raise ImportError(
        "gpo-fast's kernels/ folder was imported as the top-level module `kernels`, which is the name of "
        "Hugging Face's kernels package; import gpo_fast before transformers or diffusers, or run from "
        "outside the repository root.",
        name="kernels",
    )

import contextlib

import torch

from gpo_fast import objective as _ref
from gpo_fast.objective import DEFAULT_EPS_STD, DEFAULT_MIN_STD, OBJECTIVES, LossSpec

try:  # triton exists on Linux only; elsewhere everything runs the reference
    from .gpo import gpo_loss_triton
    from .mse import INTERPRETED, sample_mse_triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the platform
    TRITON_AVAILABLE = False
    INTERPRETED = False

__all__ = ["gpo_loss", "sample_mse", "loss_coefficients", "valid_groups", "LossSpec", "uses_triton",
           "interpreter_problem", "INTERPRETER_FIX", "KERNEL_DTYPES", "OBJECTIVES", "DEFAULT_EPS_STD",
           "DEFAULT_MIN_STD"]

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


_plain = [False]  # plain_pytorch() sets it: every call runs the PyTorch reference


@contextlib.contextmanager
def plain_pytorch():
    """Inside the block the loss runs the PyTorch reference on every device (gpo_fast.plan: fake tensors carry
    no data for Triton to read; the fused kernels' own buffers are N floats)."""
    _plain[0] = True
    try:
        yield
    finally:
        _plain[0] = False


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the kernels run as Triton for a tensor on this device (natively or interpreted)."""
    if not TRITON_AVAILABLE or _plain[0]:
        return False
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu")


def sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of (pred - target)^2 over all but dim 0: (N,) float32."""
    check_pred_target(pred, target)
    if uses_triton(pred):
        return sample_mse_triton(pred, target)
    return _ref.sample_mse(pred, target)


def gpo_loss(pred: torch.Tensor, target: torch.Tensor, ref_err: torch.Tensor, rewards: torch.Tensor,
             spec: LossSpec | None = None, *, return_policy_err: bool = False, **keywords):
    """The GPO loss of docs/method.md, a float32 scalar differentiable in ``pred``.

    pred, target: (N, ...) float32 / bfloat16 / float16, the G members of each group contiguous.
    ref_err:      (N,) the reference model's per-sample error (``sample_mse`` of its prediction).
    rewards:      (N,) raw rewards; standardized per group inside the loss. A non-finite reward (NaN:
                  the reward engine failed on that image) excludes its member from its group.
    spec:         a LossSpec, or its fields as keywords (group_size, beta, objective, eps_std, min_std).
    return_policy_err: also return the policy's per-sample error e (N,), detached, for logging.
    """
    spec = LossSpec.of(spec, keywords)
    check_inputs(pred, target, ref_err, rewards, spec)
    if uses_triton(pred):
        loss, policy_err = gpo_loss_triton(pred, target, ref_err, rewards, spec)
    else:
        policy_err = _ref.sample_mse(pred, target)
        loss = _ref.loss_from_errors(policy_err, ref_err, rewards, spec)
        policy_err = policy_err.detach()
    return (loss, policy_err) if return_policy_err else loss


def loss_coefficients(policy_err: torch.Tensor, ref_err: torch.Tensor, rewards: torch.Tensor,
                      spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, c) from per-sample errors alone: c[n] = dL/de[n]. Then sum_n c[n] * e[n], taken one
    micro-batch at a time with c fixed, has the gradient of the whole batch's loss (docs/method.md)."""
    e = policy_err.detach().float().requires_grad_(True)
    with torch.enable_grad():
        loss = _ref.loss_from_errors(e, ref_err.float(), rewards, spec)
        (coef,) = torch.autograd.grad(loss, e)
    return loss.detach(), coef


def valid_groups(rewards: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(P,) bool: the groups with a loss (not degenerate: at least two scored members, std >= min_std)."""
    return _ref.standardize_rewards(rewards, spec)[1]


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_pred_target(pred, target, pred_dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> None:
    """ValueError naming the argument when pred / target are not same-shape float tensors on one device."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in pred_dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in pred_dtypes)
            raise ValueError(f"{name} has unsupported dtype {t.dtype}; use one of {allowed}")
    if pred.dim() < 1 or pred.numel() == 0:
        raise ValueError(f"pred must be non-empty with the batch on dim 0; got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match pred shape {tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")


def check_inputs(pred, target, ref_err, rewards, spec: LossSpec) -> None:
    """Raise a ValueError naming the argument that is wrong. Host-side metadata only: no sync."""
    check_pred_target(pred, target)
    n = pred.shape[0]
    for name, t in (("ref_err", ref_err), ("rewards", rewards)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype} (convert with .float())")
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) (one value per sample); got {tuple(t.shape)}")
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device} but pred is on {pred.device}")
    if n % spec.group_size != 0:
        raise ValueError(f"group_size {spec.group_size} does not divide the batch size N={n} "
                         "(N = prompts * group_size)")
