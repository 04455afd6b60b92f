"""Compile every Triton kernel variant the launchers produce for the GPUs people have, on a CPU: registers,
spills, shared memory, load/store width and theoretical occupancy per (kernel, variant, target).

    python benchmarks/compile_kernels.py [--subset ci] [--targets 80,86,89,90] [--out benchmarks/results/compile.csv]

How: the real entry points (gpo_fast.kernels' gpo_loss and sample_mse, forward and backward) run on CPU tensors
with the kernel launch intercepted (JITFunction.run). Each intercepted launch goes through Triton's own binder and
argument packing for each target (pointer dtypes, ints equal to 1 folded, 16-divisibility, the options), so the
variants are the launchers' own, not restated here. Each distinct variant is then compiled to a cubin with
triton.compile for GPUTarget("cuda", cc, 32) with the ptxas inside the triton wheel, whose -v log gives
registers and spills. No GPU is used: this proves that the kernels compile and what they use, not how fast
they run.

Exit status 1 when a variant fails to compile, needs more shared memory than a block may use on its target
(it would not launch), or spills with a group of at most 64 (the project's bar); --subset ci is the representative
subset tests/test_compile.py runs (every kernel; bf16, fp32 and the trainer's bf16 prediction against a float32
target; every objective; all four targets). Run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Occupancy limits per SM (CUDA C Programming Guide, "Technical Specifications per Compute Capability"):
# max resident warps, max resident blocks, shared memory per SM and the most one block may use (opt-in), in
# bytes; 64 K 32-bit registers on all four.
ARCH = {
    80: dict(name="A100", warps=64, blocks=32, smem=164 * 1024, smem_block=163 * 1024),
    86: dict(name="RTX 30xx", warps=48, blocks=16, smem=100 * 1024, smem_block=99 * 1024),
    89: dict(name="RTX 40xx / L40S", warps=48, blocks=24, smem=100 * 1024, smem_block=99 * 1024),
    90: dict(name="H100 / H200", warps=64, blocks=32, smem=228 * 1024, smem_block=227 * 1024),
}
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated to a warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KB of shared memory per block (sm_80 and later)

DTYPES = ("bfloat16", "float16", "float32")
# the --subset ci dtypes: matched, and the trainer's own launch on SD3 (a bf16 prediction, a float32 target: the
# velocity target u = eps - x0 is float32)
MATCHED_AND_MIXED = (("bfloat16", ""), ("float32", ""), ("bfloat16", "float32"))
OBJECTIVES = ("gpo", "gpo-pairs", "dpo")
# (N, D) of sample_mse: SD3.5 latents at 512 and 1024 px (16 x 64 x 64, 16 x 128 x 128), a D that is not a multiple
# of 16, a one-chunk one
MSE_SHAPES = ((8, 16 * 64 * 64), (32, 16 * 64 * 64), (8, 16 * 128 * 128), (4, 1000), (2, 256))
GROUP_SIZES = (2, 3, 4, 8, 16, 24, 32, 64, 128, 256)
NO_SPILL_UP_TO_G = 64


@dataclass
class Case:
    """One call of an entry point: what it is, on which shapes."""
    entry: str  # "sample_mse" or an objective of gpo_loss
    dtype: str  # the prediction's
    n: int
    d: int
    group_size: int = 0  # 0 for sample_mse
    target: str = ""  # the target's dtype, when it differs: the trainer's bf16 prediction against a float32 target

    @property
    def label(self) -> str:
        g = f" G={self.group_size}" if self.group_size else ""
        dt = f"{self.dtype}/{self.target}" if self.target else self.dtype
        return f"{self.entry} {dt} N={self.n} D={self.d}{g}"


@dataclass
class Variant:
    """One compiled variant of a kernel for one target, and every case whose launch produced it."""
    kernel: str
    cc: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    fn: object = None
    cases: list = field(default_factory=list)

    def key(self):
        opts = {k: self.options.get(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
        return (self.kernel, self.cc, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(opts.items())))


def cases(subset: str) -> list[Case]:
    if subset == "ci":
        out = [Case("sample_mse", dt, 8, 16 * 64 * 64, 0, t) for dt, t in MATCHED_AND_MIXED]
        out += [Case(obj, dt, 2 * g, 16 * 64 * 64, g, t) for obj in OBJECTIVES for dt, t in MATCHED_AND_MIXED
                for g in (8, 64)]
        return out
    out = [Case("sample_mse", dt, n, d) for dt in DTYPES for n, d in MSE_SHAPES]
    out += [Case("sample_mse", "bfloat16", n, d, 0, "float32") for n, d in MSE_SHAPES]
    for obj in OBJECTIVES:
        for g in GROUP_SIZES:
            # one group (micro-batches of a group) to many: the finalize kernel's tiles change with the count;
            # every dtype where the pass over pred and target changes (the finalize kernel reads float32 only)
            for groups in (1, 2, 4, 8, 16, 64):
                if g * groups <= 1024 and (g <= 64 or groups in (1, 4)):  # a pair tile of 256^2 takes a minute
                    for dt in (DTYPES if groups in (1, 4) else ("bfloat16",)):
                        out.append(Case(obj, dt, g * groups, 16 * 64 * 64, g))
                    if groups in (1, 4):
                        out.append(Case(obj, "bfloat16", g * groups, 16 * 64 * 64, g, "float32"))
            out.append(Case(obj, "bfloat16", 4 * g, 1000, g))
            out.append(Case(obj, "bfloat16", 4 * g, 1000, g, "float32"))
    return out


def intercepted_launches(case: Case, targets: list[int]) -> list[Variant]:
    """Run the case's entry point, forward and backward, with every kernel launch intercepted and bound for each
    target by Triton's own binder."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    from triton import knobs

    from gpo_fast.kernels.gpo import gpo_loss_triton
    from gpo_fast.kernels.mse import sample_mse_triton
    from gpo_fast.objective import LossSpec

    backends = {cc: make_backend(GPUTarget("cuda", cc, 32)) for cc in targets}
    found: list[Variant] = []

    def run(fn, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        for cc, backend in backends.items():
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            found.append(Variant(fn.__name__, cc, signature, constexprs, attrs, options.__dict__, fn, [case.label]))
        return None

    dtype = getattr(torch, case.dtype)
    pred = torch.zeros(case.n, case.d, dtype=dtype, requires_grad=True)
    target = torch.zeros(case.n, case.d, dtype=getattr(torch, case.target or case.dtype))
    original = JITFunction.run
    JITFunction.run = run
    try:
        if case.entry == "sample_mse":
            out = sample_mse_triton(pred, target)
            out.backward(torch.ones_like(out))
        else:
            spec = LossSpec(group_size=case.group_size, beta=1000.0, objective=case.entry)
            ref_err = torch.zeros(case.n, dtype=torch.float32)
            rewards = torch.arange(case.n, dtype=torch.float32)
            loss, _ = gpo_loss_triton(pred, target, ref_err, rewards, spec)
            loss.backward()
    finally:
        JITFunction.run = original
    return found


PTX_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def widest_access(ptx: str) -> tuple[int, int]:
    """The widest global load and store of the PTX, in bits (128: four 32-bit lanes, the most a thread moves)."""
    widest = {"ld": 0, "st": 0}
    for op, lanes, bits in PTX_ACCESS.findall(ptx):
        widest[op] = max(widest[op], int(lanes or 1) * int(bits))
    return widest["ld"], widest["st"]


def occupancy(cc: int, registers: int, num_warps: int, shared: int) -> float:
    """Theoretical occupancy: resident warps per SM over the most an SM holds, from registers, shared memory and
    the per-SM limits (the CUDA occupancy calculator's rules)."""
    arch = ARCH[cc]
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else arch["blocks"]
    by_smem = arch["smem"] // (shared + SMEM_RESERVED_PER_BLOCK)
    by_warps = arch["warps"] // num_warps
    blocks = min(by_registers, by_smem, by_warps, arch["blocks"])
    return blocks * num_warps / arch["warps"]


def compile_variant(v: Variant) -> dict:
    """Compile one variant to a cubin; ptxas's -v log of that compile gives registers and spills."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=v.kernel, target=f"sm_{v.cc}", card=ARCH[v.cc]["name"],
               variant=" ".join(f"{v.fn.arg_names[k[0]]}={val}" for k, val in sorted(v.constexprs.items())
                                if v.fn.arg_names[k[0]] not in ("debug",)),
               signature=" ".join(f"{k}:{t}" for k, t in v.signature.items() if t != "constexpr"),
               num_warps=v.options["num_warps"], num_stages=v.options["num_stages"], maxnreg=v.options.get("maxnreg"),
               triton=triton.__version__, cases=len(v.cases), example=v.cases[0])
    log = io.StringIO()
    start = time.time()
    before = knobs.cache.dir
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        knobs.cache.dir = cache  # a fresh cache: ptxas runs, and prints its log
        knobs.nvidia.dump_ptxas_log = True
        try:
            compiled = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs),
                                      target=GPUTarget("cuda", v.cc, 32), options=v.options)
        except Exception as error:  # noqa: BLE001 - a row says what failed
            row.update(status="error", error=" ".join(str(error).split())[:300])
            return row
        finally:
            knobs.nvidia.dump_ptxas_log = False
            knobs.cache.dir = before
    text = log.getvalue()
    used = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = int(used.group(1)) if used else -1
    ld, st = widest_access(compiled.asm["ptx"])
    shared = int(compiled.metadata.shared)
    row.update(status="ok", error="", registers=registers,
               spill_store_bytes=int(spill.group(1)) if spill else -1,
               spill_load_bytes=int(spill.group(2)) if spill else -1,
               shared_bytes=shared, load_bits=ld, store_bits=st,
               occupancy=round(occupancy(v.cc, registers, v.options["num_warps"], shared), 3),
               compile_seconds=round(time.time() - start, 2))
    return row


def group_size_of(v: Variant) -> int:
    for k, val in v.constexprs.items():
        if v.fn.arg_names[k[0]] == "G":
            return int(val)
    return 0


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(f"{r['kernel']} {r['variant']} on {r['target']} does not compile: {r['error']}")
        elif r["shared_bytes"] > ARCH[int(r["target"][3:])]["smem_block"]:
            out.append(f"{r['kernel']} {r['variant']} on {r['target']} needs {r['shared_bytes']} B of shared memory, "
                       f"more than a block may use there ({ARCH[int(r['target'][3:])]['smem_block']} B): it would "
                       "not launch")
        elif r["group_size"] <= NO_SPILL_UP_TO_G and (r["spill_store_bytes"] or r["spill_load_bytes"]):
            out.append(f"{r['kernel']} {r['variant']} on {r['target']} spills {r['spill_store_bytes']} B "
                       f"(stores) / {r['spill_load_bytes']} B (loads) at {r['registers']} registers")
    return out


FIELDS = ["kernel", "target", "card", "variant", "group_size", "signature", "num_warps", "num_stages", "maxnreg",
          "status",
          "registers", "spill_store_bytes", "spill_load_bytes", "shared_bytes", "load_bits", "store_bits",
          "occupancy", "compile_seconds", "cases", "example", "triton", "error"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("all", "ci"), default="all")
    parser.add_argument("--targets", default="80,86,89,90", help="compute capabilities, comma-separated")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile.csv")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler this script runs", file=sys.stderr)
        return 2
    targets = [int(t) for t in args.targets.split(",")]
    if unknown := [t for t in targets if t not in ARCH]:
        print(f"unknown target(s) {unknown}: choose from {sorted(ARCH)}", file=sys.stderr)
        return 2
    reason = backend_missing()
    if reason:
        print(reason, file=sys.stderr)
        return 2

    start = time.time()
    variants: dict = {}
    for case in cases(args.subset):
        for v in intercepted_launches(case, targets):
            if v.key() in variants:
                variants[v.key()].cases.extend(v.cases)
            else:
                variants[v.key()] = v
    print(f"{len(variants)} variants ({len({k[0] for k in variants})} kernels x targets x specializations) from "
          f"{len(cases(args.subset))} calls of the entry points; compiling", file=sys.stderr)
    rows = []
    for v in variants.values():
        row = compile_variant(v)
        row["group_size"] = group_size_of(v)
        rows.append(row)
        print(f"  {row['kernel']:<24} {row['target']} {row['variant'][:60]:<60} "
              + (f"{row['registers']:>3} regs, spills {row['spill_store_bytes']} B, {row['num_warps']} warps, "
                 f"occupancy {row['occupancy']:.2f}" if row["status"] == "ok" else f"ERROR {row['error'][:80]}"),
              file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    found = problems(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok} of {len(rows)} compiled in {time.time() - start:.0f} s; {len(found)} problem(s); wrote {args.out}",
          file=sys.stderr)
    for line in found:
        print("  " + line, file=sys.stderr)
    return 1 if found else 0


def backend_missing() -> str | None:
    """Why this triton cannot compile for NVIDIA GPUs here, or None."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as error:
        return f"this triton build has no NVIDIA backend ({error})"
    if "nvidia" not in backends:
        return "this triton build has no NVIDIA backend"
    try:
        get_ptxas(80).path
    except Exception as error:  # noqa: BLE001
        return f"this triton build has no usable ptxas ({error})"
    return None


if __name__ == "__main__":
    sys.exit(main())
