"""Per-sample mean squared error, sum((pred - target)^2) / D per row, as Triton kernels.

Memory traffic: pred and target are read once (2 * N * D * itemsize bytes); the partial sums
(N * n_chunks float32) and the output (N float32) are noise beside them. A row of an SD3.5 latent is
65k-262k elements and N is often 8, so one program per row would leave most of a GPU idle: the grid is
2-D over (row, chunk), each program writes one partial sum, and a second tiny launch adds the partials
of a row in a fixed order. No atomics: the result is bit-identical from run to run.

The backward (grad = scale[n] * (pred - target)) is shared with gpo_loss and lives here too.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sq_err_partials_kernel(
    pred_ptr, target_ptr, partial_ptr, D, NC,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[row, chunk] = sum over the chunk's elements of (pred - target)^2, float32."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * D
    start = chunk * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < D
        # load in the storage dtype, do the arithmetic in float32
        p = tl.load(pred_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        diff = p - t
        acc += diff * diff
    tl.store(partial_ptr + row * NC + chunk, tl.sum(acc, axis=0))


@triton.jit
def _row_mean_kernel(partial_ptr, out_ptr, N, NC, D, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[row] = sum_c partial[row, c] / D, summed in a fixed order."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        mask = (rows[:, None] < N) & (c0 + cols[None, :] < NC)
        part = tl.load(partial_ptr + rows[:, None] * NC + c0 + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(part, axis=1)
    tl.store(out_ptr + rows, acc / D, mask=rows < N)


@triton.jit
def _scaled_diff_kernel(
    pred_ptr, target_ptr, scale_ptr, scale_stride, gout_ptr, grad_ptr, D, mult,
    SCALAR_GOUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad[row, :] = scale[row] * mult * (pred - target) [* gout], stored in grad's dtype.

    One read of pred and target, one write of grad: the minimum for this gradient. Rows whose scale
    is zero (the members of degenerate groups) are written as zeros without reading their inputs.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * D
    start = chunk * CHUNK
    scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * mult
    if SCALAR_GOUT:
        scale = scale * tl.load(gout_ptr).to(tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < D
        if scale == 0.0:
            g = tl.zeros([BLOCK], dtype=tl.float32)
        else:
            p = tl.load(pred_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(target_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            g = scale * (p - t)
        tl.store(grad_ptr + base + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)


def device_of(t: torch.Tensor):
    """Launch on the tensor's GPU: Triton launches on the current CUDA device, not the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_config(n: int, d: int) -> tuple[int, int, int, int]:
    """(chunk, block, n_chunks, num_warps) for a 2-D (row, chunk) grid over an (n, d) tensor.

    Aim for about 1024 programs so that a handful of long rows still fills every SM, with at
    least 1024 elements per program; under the interpreter, as few programs as possible (each
    costs Python time). Powers of two, so chunk is a multiple of block.
    """
    if INTERPRETED:
        chunk = min(triton.next_power_of_2(d), 16384)
        block = chunk
    else:
        per_program = triton.cdiv(n * d, 1024)
        chunk = min(max(triton.next_power_of_2(per_program), 1024), 65536)
        block = min(chunk, 4096)
    n_chunks = triton.cdiv(d, chunk)
    num_warps = 8 if block >= 4096 else 4
    return chunk, block, n_chunks, num_warps


def squared_error_partials(pred2d: torch.Tensor, target2d: torch.Tensor) -> torch.Tensor:
    """(N, n_chunks) float32 partial sums of (pred - target)^2 over contiguous (N, D) inputs."""
    n, d = pred2d.shape
    chunk, block, n_chunks, num_warps = launch_config(n, d)
    partials = torch.empty((n, n_chunks), device=pred2d.device, dtype=torch.float32)
    _sq_err_partials_kernel[(n, n_chunks)](
        pred2d, target2d, partials, d, n_chunks, CHUNK=chunk, BLOCK=block, num_warps=num_warps
    )
    return partials


def scaled_diff(
    pred2d: torch.Tensor, target2d: torch.Tensor, scale: torch.Tensor, mult: float,
    scalar_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """scale[n] * mult * (pred - target) [* scalar_grad], in pred's dtype."""
    n, d = pred2d.shape
    chunk, block, n_chunks, num_warps = launch_config(n, d)
    grad = torch.empty_like(pred2d)
    gout = scalar_grad if scalar_grad is not None else scale
    _scaled_diff_kernel[(n, n_chunks)](
        pred2d, target2d, scale, scale.stride(0), gout, grad, d, mult,
        SCALAR_GOUT=scalar_grad is not None, CHUNK=chunk, BLOCK=block, num_warps=num_warps,
    )
    return grad


class _SampleMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = pred.shape[0]
        pred2d = pred.contiguous().view(n, -1)
        target2d = target.contiguous().view(n, -1)
        partials = squared_error_partials(pred2d, target2d)
        out = torch.empty(n, device=pred.device, dtype=torch.float32)
        d, n_chunks = pred2d.shape[1], partials.shape[1]
        block_n = min(triton.next_power_of_2(n), 64)
        block_c = max(1, min(triton.next_power_of_2(n_chunks), 4096 // block_n))
        _row_mean_kernel[(triton.cdiv(n, block_n),)](
            partials, out, n, n_chunks, d, BLOCK_N=block_n, BLOCK_C=block_c
        )
        ctx.save_for_backward(pred2d, target2d)
        ctx.pred_shape = pred.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pred2d, target2d = ctx.saved_tensors
        grad = scaled_diff(pred2d, target2d, grad_out, 2.0 / pred2d.shape[1])
        return grad.view(ctx.pred_shape), None


def sample_mse_triton(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Triton per-sample MSE (differentiable in pred); see gpo_fast.kernels.sample_mse."""
    with device_of(pred):  # Triton launches on the current CUDA device, not the tensor's
        return _SampleMSE.apply(pred, target)
