"""The fused kernels (gpo_fast.gpo_loss, gpo_fast.sample_mse) against the PyTorch reference.

Without CUDA these run the Triton kernels through the interpreter (conftest.py); with CUDA, natively.
Tolerances: float32 inputs, loss rtol 1e-5 and gradient rtol 1e-4 (the kernels add in another order);
bfloat16 inputs, the loss is computed in float32 from the same bf16 values (rtol 1e-5), and the
gradient is rounded to bf16 by both sides (rtol 1.6e-2, one bf16 ulp); float16 gradients rtol 1e-3.
"""

import pytest
import torch

import gpo_fast
from gpo_fast import kernels
from gpo_fast.objective import reference_gpo_loss
from dpo_literals import diffusers_dpo, original_diffusion_dpo
from kernels_util import make_batch

OBJECTIVES = ["gpo", "gpo-pairs", "dpo"]
TOL = {
    torch.float32: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-4, atol=1e-7)),
    torch.bfloat16: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1.6e-2, atol=1e-6)),
    torch.float16: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-3, atol=1e-6)),
}


def test_kernels_really_run_triton_here(kernel_device):
    """Guards every parity test below from comparing the reference with itself."""
    assert kernels.TRITON_AVAILABLE
    assert kernels.uses_triton(torch.empty(1, device=kernel_device))


def _both(batch, **kw):
    """(loss, grad) from the kernels and from the reference, on the same inputs."""
    out = []
    for fn in (gpo_fast.gpo_loss, reference_gpo_loss):
        pred = batch["pred"].detach().clone().requires_grad_(True)
        loss = fn(pred, batch["target"], batch["ref_err"], batch["rewards"], **kw)
        loss.backward()
        out.append((loss.detach(), pred.grad))
    return out


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("group_size", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(3, 7, 5), (16, 8, 8)], ids=["odd-3x7x5", "sd-like-16x8x8"])
def test_parity_float32(kernel_device, objective, group_size, shape):
    batch = make_batch(2 * group_size, shape, torch.float32, kernel_device, seed=group_size)
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=group_size, beta=4.0, objective=objective)
    assert k_loss.dtype == torch.float32 and k_loss.dim() == 0
    torch.testing.assert_close(k_loss, r_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(k_grad, r_grad, **TOL[torch.float32]["grad"])
    assert k_grad.abs().max() > 0  # the case is not trivially zero


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("group_size", [128, 256])
def test_parity_large_groups(kernel_device, objective, group_size):
    """Groups past 64 take the launcher's widest tiles and most warps (benchmarks/compile_kernels.py: they compile
    for sm_80-sm_90); the results stay the reference's."""
    batch = make_batch(2 * group_size, (3, 5), torch.float32, kernel_device, seed=group_size)
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=group_size, beta=4.0, objective=objective)
    torch.testing.assert_close(k_loss, r_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(k_grad, r_grad, **TOL[torch.float32]["grad"])
    assert k_grad.abs().max() > 0


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("group_size", [3, 4])
def test_parity_bfloat16(kernel_device, objective, group_size):
    batch = make_batch(3 * group_size, (4, 6, 6), torch.bfloat16, kernel_device, seed=7)
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=group_size, beta=4.0, objective=objective)
    assert k_grad.dtype == torch.bfloat16
    torch.testing.assert_close(k_loss, r_loss, **TOL[torch.bfloat16]["loss"])
    torch.testing.assert_close(k_grad.float(), r_grad.float(), **TOL[torch.bfloat16]["grad"])


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("beta", [1e-3, 5000.0])
def test_parity_small_and_large_beta(kernel_device, objective, beta):
    batch = make_batch(8, (3, 7, 5), torch.float32, kernel_device, seed=3)
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=4, beta=beta, objective=objective)
    assert torch.isfinite(k_loss) and torch.isfinite(k_grad).all()
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_grad, r_grad, rtol=1e-4, atol=1e-7 * beta)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ties_and_degenerate_groups(kernel_device, objective):
    """Ties inside groups, an all-equal group (no loss, no gradient, no NaN), binary rewards."""
    batch = make_batch(12, (3, 7, 5), torch.float32, kernel_device, seed=11)
    batch["rewards"] = torch.tensor([1, 0, 1, 0, 0.5, 0.5, 0.5, 0.5, 0, 0, 1, 1.0], device=kernel_device)
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=4, beta=4.0, objective=objective)
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, r_grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(k_grad[4:8], torch.zeros_like(k_grad[4:8]))
    assert k_grad[:4].abs().max() > 0 and k_grad[8:].abs().max() > 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_all_groups_degenerate_zero_loss_zero_grad(kernel_device, objective):
    batch = make_batch(8, (3, 7, 5), torch.float32, kernel_device, seed=5)
    batch["rewards"] = torch.tensor([0.0] * 4 + [1.0] * 4, device=kernel_device)
    (k_loss, k_grad), _ = _both(batch, group_size=4, beta=4.0, objective=objective)
    assert k_loss.item() == 0.0
    assert torch.equal(k_grad, torch.zeros_like(k_grad))


def test_dpo_takes_the_lowest_index_on_ties(kernel_device):
    batch = make_batch(4, (3, 7, 5), torch.float32, kernel_device, seed=2)
    batch["rewards"] = torch.tensor([0.0, 1.0, 1.0, 0.0], device=kernel_device)
    (k_loss, k_grad), _ = _both(batch, group_size=4, beta=4.0, objective="dpo")
    # best is member 1 and worst member 0: only they get a gradient
    assert k_grad[0].abs().max() > 0 and k_grad[1].abs().max() > 0
    assert torch.equal(k_grad[2:], torch.zeros_like(k_grad[2:]))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_beta_is_diffusers_and_half_the_original_diffusion_dpos(kernel_device, objective, dtype):
    batch = make_batch(8, (4, 6, 6), dtype, kernel_device, seed=11)
    batch["rewards"] = torch.tensor([1.0, 0.0] * 4, device=kernel_device)
    e = (batch["pred"].float() - batch["target"].float()).pow(2).mean(dim=(1, 2, 3))
    f = batch["ref_err"]
    loss = gpo_fast.gpo_loss(batch["pred"], batch["target"], f, batch["rewards"], group_size=2, beta=50.0,
                             objective=objective, eps_std=0.0)
    torch.testing.assert_close(loss, diffusers_dpo(e, f, 50.0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, original_diffusion_dpo(e, f, 100.0), rtol=1e-5, atol=1e-7)


def test_gpo_two_members_equals_diffusion_dpo_formula(kernel_device):
    batch = make_batch(6, (4, 5, 5), torch.float32, kernel_device, seed=9)
    batch["rewards"] = torch.tensor([1.0, 0.0] * 3, device=kernel_device)
    beta = 7.0
    loss = gpo_fast.gpo_loss(batch["pred"], batch["target"], batch["ref_err"], batch["rewards"],
                             group_size=2, beta=beta)
    e = ((batch["pred"] - batch["target"]) ** 2).mean(dim=(1, 2, 3))
    f = batch["ref_err"]
    dpo = -torch.nn.functional.logsigmoid(beta * ((f[0::2] - f[1::2]) - (e[0::2] - e[1::2]))).mean()
    torch.testing.assert_close(loss, dpo, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_many_chunks_per_row_with_a_tail(kernel_device, objective, monkeypatch):
    """Rows split into several programs, the last one masked: the 2-D grid path on the interpreter."""
    from gpo_fast.kernels import mse as sm

    monkeypatch.setattr(sm, "launch_config", lambda n, d: (64, 32, -(-d // 64), 4))
    batch = make_batch(8, (3, 7, 5), torch.float32, kernel_device, seed=4)  # D = 105: 2 chunks
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=4, beta=4.0, objective=objective)
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, r_grad, rtol=1e-4, atol=1e-7)


def test_finalize_reads_many_chunks_in_blocks(kernel_device, monkeypatch):
    """More chunks than the finalize kernel reads at once (its loop over chunk blocks)."""
    from gpo_fast.kernels import mse as sm

    monkeypatch.setattr(sm, "launch_config", lambda n, d: (16, 16, -(-d // 16), 4))
    batch = make_batch(64, (3, 7, 5), torch.float32, kernel_device, seed=6)  # 7 chunks, 64 samples
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=8, beta=4.0, objective="gpo")
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, r_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_runs_are_bit_identical(kernel_device, objective):
    batch = make_batch(16, (16, 8, 8), torch.float32, kernel_device, seed=8)
    (l1, g1), _ = _both(batch, group_size=4, beta=4.0, objective=objective)
    (l2, g2), _ = _both(batch, group_size=4, beta=4.0, objective=objective)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_gradient_scales_with_upstream_gradient(kernel_device):
    batch = make_batch(8, (3, 7, 5), torch.float32, kernel_device, seed=12)
    grads = []
    for scale in (1.0, -2.5):
        pred = batch["pred"].clone().requires_grad_(True)
        loss = gpo_fast.gpo_loss(pred, batch["target"], batch["ref_err"], batch["rewards"], group_size=4, beta=4.0)
        (scale * loss).backward()
        grads.append(pred.grad)
    torch.testing.assert_close(grads[1], -2.5 * grads[0], rtol=1e-6, atol=0.0)


def test_return_policy_err(kernel_device):
    batch = make_batch(8, (3, 7, 5), torch.float32, kernel_device, seed=13)
    loss, err = gpo_fast.gpo_loss(batch["pred"], batch["target"], batch["ref_err"], batch["rewards"],
                                  group_size=4, beta=4.0, return_policy_err=True)
    expected = ((batch["pred"] - batch["target"]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(err, expected, rtol=1e-5, atol=1e-7)
    assert not err.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 3, 7, 5), (3, 16, 8, 8), (4,)])
def test_sample_mse_parity_and_gradient(kernel_device, dtype, shape):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(shape, generator=g).to(dtype).to(kernel_device).requires_grad_(True)
    target = torch.randn(shape, generator=g).to(dtype).to(kernel_device)
    out = gpo_fast.sample_mse(pred, target)
    ref = (pred.float() - target.float()).pow(2).reshape(shape[0], -1).mean(dim=1)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-7)
    weights = torch.arange(1.0, shape[0] + 1, device=kernel_device)
    (out * weights).sum().backward()
    expected = (2.0 / (pred[0].numel()) * (pred.float() - target.float())
                * weights.view(-1, *[1] * (len(shape) - 1))).to(dtype)
    torch.testing.assert_close(pred.grad.float(), expected.float(), **TOL[dtype]["grad"])


def test_non_contiguous_inputs(kernel_device):
    batch = make_batch(8, (7, 5, 3), torch.float32, kernel_device, seed=14)
    pred = batch["pred"].transpose(1, 3).detach().requires_grad_(True)  # (8, 3, 5, 7), not contiguous
    target = batch["target"].transpose(1, 3)
    loss = gpo_fast.gpo_loss(pred, target, batch["ref_err"], batch["rewards"], group_size=4, beta=4.0)
    loss.backward()
    pred_ref = pred.detach().clone().requires_grad_(True)
    ref = reference_gpo_loss(pred_ref, target, batch["ref_err"], batch["rewards"], group_size=4, beta=4.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad, pred_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(target=torch.zeros(8, 3, 4)), "target"),
        (dict(ref_err=torch.zeros(7)), "ref_err"),
        (dict(rewards=torch.zeros(8, 1)), "rewards"),
        (dict(rewards=torch.zeros(8, dtype=torch.long)), "rewards"),
        (dict(group_size=3), "group_size"),
        (dict(group_size=1), "group_size"),
        (dict(beta=0.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(beta=float("inf")), "beta"),
        (dict(objective="ppo"), "objective"),
        (dict(pred=torch.zeros(8, 3, 5, dtype=torch.float64)), "pred"),
        (dict(pred=torch.zeros(8, 3, 5, dtype=torch.int32)), "pred"),
        (dict(min_std=0.0), "min_std"),
        (dict(eps_std=-1.0), "eps_std"),
    ],
)
def test_bad_arguments_name_the_argument(change, name):
    args = dict(pred=torch.zeros(8, 3, 5), target=torch.zeros(8, 3, 5), ref_err=torch.zeros(8),
                rewards=torch.zeros(8), group_size=4, beta=1.0, objective="gpo")
    args.update(change)
    with pytest.raises(ValueError, match=name):
        gpo_fast.gpo_loss(**args)


def test_sample_mse_bad_arguments():
    with pytest.raises(ValueError, match="target shape"):
        gpo_fast.sample_mse(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        gpo_fast.sample_mse(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_no_host_sync():
    """The forward and backward are capturable: no .item(), no data-dependent Python branch."""
    batch = make_batch(16, (16, 32, 32), torch.bfloat16, "cuda", seed=15)
    pred = batch["pred"].clone().requires_grad_(True)

    def step():
        pred.grad = None
        loss = gpo_fast.gpo_loss(pred, batch["target"], batch["ref_err"], batch["rewards"], group_size=8, beta=50.0)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile the kernels outside the capture
            eager = step().detach().clone()
    torch.cuda.current_stream().wait_stream(s)
    eager_grad = pred.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(pred.grad, eager_grad)


@pytest.mark.slow
def test_cpu_without_the_interpreter_runs_the_reference():
    """Outside CUDA and TRITON_INTERPRET, gpo_loss and sample_mse are the PyTorch reference (and work)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, gpo_fast\n"
        "from gpo_fast import kernels\n"
        "from gpo_fast.objective import reference_gpo_loss\n"
        "assert not kernels.uses_triton(torch.empty(1))\n"
        "p = torch.randn(6, 3, 5, requires_grad=True); t = torch.randn(6, 3, 5)\n"
        "f = torch.rand(6); r = torch.tensor([1., 0, 0, 1, 2, 3])\n"
        "a = gpo_fast.gpo_loss(p, t, f, r, group_size=3, beta=2.0, objective='gpo-pairs')\n"
        "b = reference_gpo_loss(p, t, f, r, group_size=3, beta=2.0, objective='gpo-pairs')\n"
        "assert torch.equal(a, b), (a, b)\n"
        "assert torch.equal(gpo_fast.sample_mse(p, t), ((p - t) ** 2).mean(dim=(1, 2)))\n"
        "print('reference')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_group_blocks_walked_in_the_finalize_kernel(kernel_device, objective, monkeypatch):
    """More groups than one finalize tile holds: the kernel walks them in blocks, last one partial."""
    from gpo_fast.kernels import gpo as gpo_module

    monkeypatch.setattr(gpo_module, "FINALIZE_TILE", 64)  # gpo-pairs: 1 group per block; others: 16
    batch = make_batch(4 * 20, (3, 5), torch.float32, kernel_device, seed=16)  # 20 groups of 4
    batch["rewards"][8:12] = 0.5  # and a degenerate group in the middle
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=4, beta=4.0, objective=objective)
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, r_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_eps_std_zero_degenerate_groups_stay_finite(kernel_device, objective):
    batch = make_batch(8, (3, 7, 5), torch.float32, kernel_device, seed=17)
    batch["rewards"][4:] = 1.0  # the second group is degenerate, std exactly 0
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=4, beta=4.0, objective=objective, eps_std=0.0)
    assert torch.isfinite(r_grad).all() and torch.isfinite(k_grad).all()
    assert torch.equal(k_grad[4:], torch.zeros_like(k_grad[4:]))
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, r_grad, rtol=1e-4, atol=1e-7)


def test_softplus_keeps_tiny_losses_relative(kernel_device):
    """beta * z around -20: the loss is ~e^-20, and the kernel keeps it to float32 relative precision."""
    batch = make_batch(2, (3, 7, 5), torch.float32, kernel_device, seed=18)
    batch["rewards"] = torch.tensor([1.0, 0.0], device=kernel_device)
    e = ((batch["pred"] - batch["target"]) ** 2).mean(dim=(1, 2, 3))
    batch["ref_err"] = e + torch.tensor([0.01, -0.01], device=kernel_device)  # d = (-0.01, +0.01)
    (k_loss, _), (r_loss, _) = _both(batch, group_size=2, beta=1000.0, objective="gpo")
    assert 0 < r_loss.item() < 1e-8
    torch.testing.assert_close(k_loss, r_loss, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_nan_reward_excludes_its_member(kernel_device, objective):
    """A failed reward (NaN; +-inf too) takes its member out of the group: parity with the reference,
    no gradient for it, and the loss of the same batch with the member removed."""
    nan, inf = float("nan"), float("inf")
    batch = make_batch(15, (3, 7, 5), torch.float32, kernel_device, seed=13)
    batch["rewards"] = torch.tensor([0.2, nan, 0.9, 0.4, 0.7,
                                     inf, 1.0, 0.0, 0.0, 0.5,
                                     nan, 0.3, nan, -inf, nan], device=kernel_device)
    (k_loss, k_grad), (r_loss, r_grad) = _both(batch, group_size=5, beta=4.0, objective=objective)
    assert torch.isfinite(k_loss) and torch.isfinite(k_grad).all()
    torch.testing.assert_close(k_loss, r_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(k_grad, r_grad, **TOL[torch.float32]["grad"])
    kept = torch.isfinite(batch["rewards"]).cpu()
    kept[10:] = False  # one finite reward left: a degenerate group
    assert torch.equal(k_grad[~kept.to(kernel_device)], torch.zeros_like(k_grad[~kept.to(kernel_device)]))
    batch["ref_err"][1] = nan  # an excluded member's non-finite error must not leak in either
    (n_loss, n_grad), (m_loss, m_grad) = _both(batch, group_size=5, beta=4.0, objective=objective)
    assert torch.equal(n_loss, k_loss) and torch.equal(n_grad, k_grad) and torch.equal(m_loss, r_loss)
    smaller = {k: v[kept.to(kernel_device)] for k, v in batch.items()}
    (s_loss, s_grad), _ = _both(smaller, group_size=4, beta=4.0, objective=objective)
    torch.testing.assert_close(k_loss, s_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(k_grad[kept.to(kernel_device)], s_grad, **TOL[torch.float32]["grad"])


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.5.2", True), ("3.0.0+git1", "2.4.1", True),
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False), ("3.8.0", "2.4.6", False)])
def test_interpreter_problem_names_old_triton_with_new_numpy(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter calls int() on one-element arrays, which numpy >= 2.4 refuses (seen with torch
    2.11's triton 3.6 and numpy 2.5.2: 73 of the parity tests failed inside the interpreter)."""
    import numpy
    import triton

    monkeypatch.setattr(kernels, "INTERPRETED", True)
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = kernels.interpreter_problem()
    if refused:
        assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
    else:
        assert problem is None
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # compiled natively: never a problem
    assert kernels.interpreter_problem() is None


@pytest.mark.slow
def test_pytest_stops_with_one_sentence_where_the_interpreter_cannot_run(tmp_path):
    """The whole suite, run where the interpreter cannot work, stops before any test with what to do."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernels compile natively and the interpreter is not used")
    (tmp_path / "sitecustomize.py").write_text(  # this machine's numpy and triton, claiming the bad pair
        "import numpy, triton\nnumpy.__version__ = '2.5.2'\ntriton.__version__ = '3.6.0'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(tests / "test_objective.py")], env=env, capture_output=True, text=True,
                         cwd=tests.parent)
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Triton 3.6.0's interpreter (TRITON_INTERPRET=1) cannot run with numpy 2.5.2" in out.stderr
    assert kernels.INTERPRETER_FIX in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert "passed" not in out.stdout  # no test ran
