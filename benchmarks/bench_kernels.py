"""Kernel benchmark: the fused Triton GPO loss against eager PyTorch and torch.compile (GPU only).

What one provider does in the timed region (docs/benchmarks.md):
    f = per-sample error of the reference prediction      (no grad)
    loss = GPO loss of the policy prediction against f     (forward)
    loss.backward()                                        (backward)
  triton  gpo_fast.sample_mse + gpo_fast.gpo_loss (the fused kernels)
  eager   ((x.float() - target.float()) ** 2).mean(dim=(1, 2, 3)) for policy and reference, then the
          group math of gpo_fast.objective, as public trainers write it
  compile the same eager function under torch.compile (default settings)
Modes: forward, backward, full (forward + backward). Times: triton.testing.do_bench, median and
p20/p80 in ms. Memory: peak allocated beyond the inputs, MB. Bandwidth: the minimal bytes of the mode
(forward: read pred, ref pred, target; backward: read pred, target, write grad; full: read pred,
ref pred, target, write grad) over the median time, and its fraction of the device-to-device copy
bandwidth measured in the same run.

Rows are appended to RESULTS/kernels.csv (RESULTS = $OUT if set, else benchmarks/results/); one plot
per mode and a summary (kernels-summary-<card>.md) are written beside it.

    python benchmarks/bench_kernels.py            # the full sweep, a few minutes on an H100
    python benchmarks/bench_kernels.py --quick    # one resolution, bf16, gpo only
    python benchmarks/bench_kernels.py --budget-s 150   # the sweep in priority order, cut after 150 s
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
GROUP_SIZE = 8
BETA = 100.0
CHANNELS = 16
FIELDS = ["gpu", "torch", "triton", "commit", "provider", "objective", "mode", "N", "C", "H", "W", "dtype",
          "median_ms", "p20_ms", "p80_ms", "peak_mb", "gbps", "frac_copy_bw"]


def commit() -> str:
    if os.environ.get("GPO_FAST_COMMIT"):
        return os.environ["GPO_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB: (read + write) bytes / median time."""
    import triton

    src = torch.empty(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def make_providers(objective: str):
    from gpo_fast import gpo_loss, sample_mse
    from gpo_fast.objective import loss_from_errors

    def eager(pred, ref_pred, target, rewards):
        with torch.no_grad():
            f = ((ref_pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        e = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        return loss_from_errors(e, f, rewards, group_size=GROUP_SIZE, beta=BETA, objective=objective)

    def fused(pred, ref_pred, target, rewards):
        with torch.no_grad():
            f = sample_mse(ref_pred, target)
        return gpo_loss(pred, target, f, rewards, group_size=GROUP_SIZE, beta=BETA, objective=objective)

    return {"triton": fused, "eager": eager, "compile": torch.compile(eager)}


def configure_compile() -> None:
    """torch.compile settings the benchmark needs: room for every shape's graph, and no donated buffers
    (since torch 2.6 a compiled backward with donated buffers refuses the `retain_graph=True` that the
    backward-only mode uses)."""
    import torch._functorch.config as functorch_config

    torch._dynamo.config.cache_size_limit = 64
    functorch_config.donated_buffer = False


def measure(fn, inputs, mode: str):
    """(median, p20, p80) ms and peak MB beyond the inputs for one provider and mode."""
    import triton

    pred = inputs[0]
    if mode == "forward":
        run = lambda: fn(*inputs)  # noqa: E731
    elif mode == "full":
        run = lambda: fn(*inputs).backward()  # noqa: E731
    else:
        loss = fn(*inputs)
        run = lambda: loss.backward(retain_graph=True)  # noqa: E731
    run()  # compile / warm up
    pred.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = triton.testing.do_bench(run, warmup=10, rep=50, quantiles=[0.5, 0.2, 0.8], grad_to_none=[pred])
    return ms, peak_mb


def minimal_bytes(mode: str, n: int, d: int, itemsize: int) -> int:
    tensors = {"forward": 3, "backward": 3, "full": 4}[mode]
    return tensors * n * d * itemsize


class _Stopped(BaseException):
    """SIGTERM arrived (a timeout): the sweep ends at once."""


def sweep(quick: bool) -> list[tuple[str, torch.dtype, int, int]]:
    """(objective, dtype, latent H=W, N) to measure, the most important first (a time budget cuts the
    tail): the default objective gpo in bf16, gpo in float32, then the other objectives."""
    resolutions = [64] if quick else [64, 128]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    objectives = ["gpo"] if quick else ["gpo", "gpo-pairs", "dpo"]
    combos = sorted(((o, dt) for o in objectives for dt in dtypes),
                    key=lambda c: (c[0] != "gpo", c[1] != torch.bfloat16, c[0]))
    return [(o, dt, hw, n) for o, dt in combos for hw in resolutions for n in (8, 16, 32, 64)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 px only, bf16, gpo only")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new shape after this many seconds (0: no limit); the most important come first")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU; nothing measured on this machine.")
        return 0
    import triton

    from gpo_fast import kernels

    assert kernels.uses_triton(torch.empty(1, device="cuda")), "the Triton kernels do not run on this GPU"
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, commit=commit())
    copy_bw = copy_bandwidth_gbps()
    print(f"{gpu}: device-to-device copy {copy_bw:.0f} GB/s")
    configure_compile()

    shapes = sweep(args.quick)
    csv_path = args.out / "kernels.csv"
    rows, providers, failures, start = [], {}, [], time.monotonic()
    writing = {"now": False, "stop": False}

    def stop(signum, frame):  # `timeout` sends SIGTERM: keep what was measured, write the summary and plots
        if writing["now"]:  # never in the middle of a CSV row: stop right after it
            writing["stop"] = True
        else:
            raise _Stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        for i, (objective, dtype, hw, n) in enumerate(shapes):
            if args.budget_s and time.monotonic() - start > args.budget_s:
                print(f"time budget of {args.budget_s:.0f} s reached: {i} of {len(shapes)} shapes measured")
                break
            if objective not in providers:
                providers[objective] = make_providers(objective)
            g = torch.Generator(device="cuda").manual_seed(0)
            shape = (n, CHANNELS, hw, hw)
            target = torch.randn(shape, device="cuda", generator=g).to(dtype)
            pred = (target + 0.1 * torch.randn(shape, device="cuda", generator=g).to(dtype)).requires_grad_(True)
            ref_pred = target + 0.1 * torch.randn(shape, device="cuda", generator=g).to(dtype)
            rewards = torch.randn(n, device="cuda", generator=g)  # no degenerate group: all work done
            inputs = (pred, ref_pred, target, rewards)
            d = CHANNELS * hw * hw
            measured = []
            for name, fn in providers[objective].items():
                for mode in ("forward", "backward", "full"):
                    try:
                        (med, p20, p80), peak_mb = measure(fn, inputs, mode)
                    except Exception as e:  # noqa: BLE001 - one provider's failure must not sink the sweep
                        failures.append(f"{objective} {dtype} N={n} {hw * 8}px {name} {mode}: {type(e).__name__}: {e}")
                        print("FAILED", failures[-1][:300])
                        pred.grad = None
                        continue
                    gbps = minimal_bytes(mode, n, d, pred.element_size()) / (med * 1e-3) / 1e9
                    measured.append(dict(meta, provider=name, objective=objective, mode=mode, N=n, C=CHANNELS,
                                         H=hw, W=hw, dtype=str(dtype).removeprefix("torch."),
                                         median_ms=f"{med:.5f}", p20_ms=f"{p20:.5f}", p80_ms=f"{p80:.5f}",
                                         peak_mb=f"{peak_mb:.1f}", gbps=f"{gbps:.1f}",
                                         frac_copy_bw=f"{gbps / copy_bw:.3f}"))
                    print(f"{objective:9s} {measured[-1]['dtype']:8s} N={n:2d} {hw * 8}px {name:7s} {mode:8s} "
                          f"{med:8.4f} ms  {peak_mb:8.1f} MB  {gbps:7.0f} GB/s")
            del pred, ref_pred, target
            writing["now"] = True
            new = not csv_path.exists()  # each shape's rows on disk at once: a kill keeps what was measured
            with csv_path.open("a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerows(measured)
            rows += measured
            writing["now"] = False
            if writing["stop"]:
                raise _Stopped
    except _Stopped:
        print(f"stopped by SIGTERM; writing the {len(rows)} rows measured before it")
    if not rows:
        print("bench_kernels: stopped before the first shape was measured")
        return 1
    summary = summarize(rows, copy_bw)
    if failures:
        summary += f"\n{len(failures)} measurements failed (no row written for them):\n" + \
            "".join(f"- {f[:300]}\n" for f in failures)
    (args.out / f"kernels-summary-{card_slug(gpu)}.md").write_text(summary)
    print(summary)
    plot(rows, args.out, card_slug(gpu))
    return 1 if failures else 0


def summarize(rows, copy_bw: float) -> str:
    """Speedups of triton in full mode, median over shapes, and the bandwidth at N=64, 1024 px."""
    full = {(r["objective"], r["dtype"], r["N"], r["H"], r["provider"]): float(r["median_ms"])
            for r in rows if r["mode"] == "full"}
    keys = sorted({k[:4] for k in full})
    lines = [f"# Kernel benchmark summary: {rows[0]['gpu']} (commit {rows[0]['commit']}, torch {rows[0]['torch']}, "
             f"triton {rows[0]['triton']})", "",
             f"Device-to-device copy bandwidth: {copy_bw:.0f} GB/s.", "",
             "| objective | dtype | full: speedup vs eager, median (min) | vs torch.compile, median (min) |",
             "|---|---|---|---|"]
    for objective, dtype in sorted({k[:2] for k in keys}):
        ks = [k for k in keys if k[:2] == (objective, dtype)]
        cells = []
        for other in ("eager", "compile"):  # over the shapes where both were measured
            ratios = [full[k + (other,)] / full[k + ("triton",)] for k in ks
                      if k + (other,) in full and k + ("triton",) in full]
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x)" if ratios else "not measured")
        lines.append(f"| {objective} | {dtype} | {cells[0]} | {cells[1]} |")
    big = [r for r in rows if r["mode"] == "full" and r["provider"] == "triton" and r["N"] == 64 and r["H"] == 128]
    if big:
        lines += ["", "Full mode at N=64, 1024 px (C=16, H=W=128), fraction of copy bandwidth (minimal bytes):"]
        lines += [f"- {r['objective']} {r['dtype']}: {float(r['frac_copy_bw']):.2f}" for r in big]
    return "\n".join(lines) + "\n"


def plot(rows, out: Path, slug: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["objective"] == "gpo"]
    for mode in ("forward", "backward", "full"):
        res = sorted({r["H"] for r in sel})
        dts = sorted({r["dtype"] for r in sel})
        fig, axes = plt.subplots(len(dts), len(res), figsize=(5 * len(res), 3.5 * len(dts)), squeeze=False)
        for i, dt in enumerate(dts):
            for j, hw in enumerate(res):
                ax = axes[i][j]
                for prov in ("triton", "compile", "eager"):
                    pts = sorted((r["N"], float(r["median_ms"])) for r in sel
                                 if r["mode"] == mode and r["dtype"] == dt and r["H"] == hw and r["provider"] == prov)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=prov)
                ax.set_title(f"gpo {mode}, {dt}, {hw * 8} px")
                ax.set_xlabel("N = prompts x group")
                ax.set_ylabel("median ms")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.legend()
        fig.suptitle(rows[0]["gpu"])
        fig.tight_layout()
        fig.savefig(out / f"kernels-{mode}-{slug}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
