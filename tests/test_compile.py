"""The kernels compile natively for sm_80, sm_86, sm_89 and sm_90 on this CPU (benchmarks/compile_kernels.py, with
triton's own compiler and the ptxas inside its wheel): a representative subset of the variants the launchers
make (every kernel; bf16, fp32 and the trainer's bf16 prediction against a float32 target; gpo, gpo-pairs and dpo;
groups of 8 and 64), none failing, none spilling."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_kernels.py"
TARGETS = {"sm_80", "sm_86", "sm_89", "sm_90"}
KERNELS = {"_sq_err_partials_kernel", "_row_mean_kernel", "_scaled_diff_kernel", "_gpo_finalize_kernel"}


def _script():
    spec = importlib.util.spec_from_file_location("compile_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_kernel_compiles_without_spills_for_every_target(tmp_path):
    reason = _script().backend_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "compile.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces the compiler
    done = subprocess.run([sys.executable, str(SCRIPT), "--subset", "ci", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["spill_store_bytes"] == r["spill_load_bytes"] == "0" for r in rows)
    assert all(0 < int(r["registers"]) <= 255 for r in rows)
    for kernel in KERNELS:  # each kernel on each target
        assert {r["target"] for r in rows if r["kernel"] == kernel} == TARGETS, kernel
    finalize = [r for r in rows if r["kernel"] == "_gpo_finalize_kernel"]
    assert all(any(f"OBJECTIVE={i}" in r["variant"] for r in finalize) for i in range(3))
    partials = [r for r in rows if r["kernel"] == "_sq_err_partials_kernel"]
    assert {"*bf16", "*fp32"} <= {r["signature"].split()[0].split(":")[1] for r in partials}
    # the trainer's own launch on SD3: a bf16 prediction against a float32 target, in the forward and the backward
    for kernel in ("_sq_err_partials_kernel", "_scaled_diff_kernel"):
        mixed = [r for r in rows if r["kernel"] == kernel and "pred_ptr:*bf16" in r["signature"]
                 and "target_ptr:*fp32" in r["signature"]]
        assert {r["target"] for r in mixed} == TARGETS, kernel
    # SD3 latents (D a multiple of 16) load 128 bits per thread at a time, in every dtype
    assert all(int(r["load_bits"]) == 128 for r in partials)


def test_a_spill_at_a_group_of_64_an_error_or_too_much_shared_memory_is_a_problem_a_spill_past_64_is_not():
    script = _script()
    ok = dict(kernel="k", variant="v", target="sm_80", status="ok", registers=40, spill_store_bytes=0,
              spill_load_bytes=0, shared_bytes=1024, group_size=64, error="")
    assert script.problems([ok]) == []
    assert len(script.problems([{**ok, "spill_store_bytes": 8, "spill_load_bytes": 8}])) == 1
    assert script.problems([{**ok, "group_size": 128, "spill_store_bytes": 8, "spill_load_bytes": 8}]) == []
    assert "does not compile" in script.problems([{**ok, "status": "error", "error": "boom"}])[0]
    assert script.problems([{**ok, "target": "sm_90", "shared_bytes": 200 * 1024}]) == []
    assert "would not launch" in script.problems([{**ok, "target": "sm_89", "shared_bytes": 200 * 1024}])[0]


@pytest.mark.parametrize("cc, registers, warps, shared, expected", [
    (80, 32, 4, 0, 1.0),  # 16 blocks of 4 warps: the 64 warps an A100 SM holds
    (80, 128, 4, 0, 0.25),  # 4096 registers a warp: 16 warps
    (86, 32, 4, 0, 1.0),  # 48 warps on sm_86
    (86, 64, 8, 0, 32 / 48),  # 2048 registers a warp: 32 warps, 4 blocks of 8
    (90, 32, 4, 100 * 1024, 2 * 4 / 64),  # 101 KB of shared memory a block: two blocks in 228 KB
])
def test_theoretical_occupancy(cc, registers, warps, shared, expected):
    assert _script().occupancy(cc, registers, warps, shared) == pytest.approx(expected)


def test_the_widest_global_access_is_read_from_the_ptx():
    ptx = "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\nst.global.b16 [%rd2], %rs1;\nld.global.b32 %r5, [%rd3];"
    assert _script().widest_access(ptx) == (128, 16)
