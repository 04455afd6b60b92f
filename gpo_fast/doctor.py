"""`gpo-fast doctor`: one screen on what this machine can do, each line ok or what to do.

Every check is fast and never raises: a failure becomes a line with a fix. Required for any run: torch,
diffusers, transformers, peft; the rest decide what runs well (GPU, kernels) or which rewards work.

    checks(detector=None) -> list[Check]      the facts, one Check per line
    render(checks) -> str                     the report as plain text, one line per check
    print_report(checks, console)             the report as a rich table
    main(console=None, detector=None) -> int  print it; 0 unless a required package fails
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("torch", "diffusers", "transformers", "peft")


@dataclass
class Check:
    name: str
    ok: bool | None  # None: optional and absent, which is fine
    detail: str
    fix: str = ""


def _version(module: str) -> Check:
    try:
        mod = importlib.import_module(module)
        return Check(module, True, getattr(mod, "__version__", "installed"))
    except Exception as e:  # noqa: BLE001 - any import failure is a line, not a crash
        return Check(module, False, f"does not import ({type(e).__name__})",
                     f"pip install -e . (gpo-fast's dependencies include {module})")


def _cuda() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("cuda", None, "no CUDA GPU: training runs on the CPU (the toy world is practical, SD3.5 is not)")
    p = torch.cuda.get_device_properties(0)
    driver = _driver_version()
    return Check("cuda", True, f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                               f"{f'driver {driver}, ' if driver else ''}torch built for CUDA {torch.version.cuda}, "
                               f"{torch.cuda.device_count()} device(s)")


def _driver_version() -> str:
    """The NVIDIA driver's version through NVML (nvidia-ml-py, which torch's CUDA wheels bring), or ''."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - the line is complete without it
        return ""


def _kernels() -> Check:
    try:
        import torch

        from gpo_fast import kernels

        if not kernels.TRITON_AVAILABLE:
            return Check("kernels", None, "triton absent: the loss runs the PyTorch reference")
        import triton

        problem = kernels.interpreter_problem()
        if problem:  # the tests would fail inside the interpreter
            return Check("kernels", False, problem, kernels.INTERPRETER_FIX)
        if kernels.INTERPRETED:  # set before gpo_fast.kernels was imported: interpreted on any device
            return Check("kernels", None, f"triton {triton.__version__}, TRITON_INTERPRET=1: the kernels run "
                                          "interpreted (tests only: slow)",
                         "unset TRITON_INTERPRET for training" if torch.cuda.is_available() else "")
        if torch.cuda.is_available() and kernels.uses_triton(torch.empty(0, device="cuda")):
            return Check("kernels", True, f"triton {triton.__version__}: the fused kernels run natively on the GPU")
        return Check("kernels", None, f"triton {triton.__version__}, no GPU: the loss runs the PyTorch reference")
    except Exception as e:  # noqa: BLE001
        return Check("kernels", False, f"gpo_fast.kernels does not import ({type(e).__name__}: {e})",
                     "reinstall gpo-fast (pip install -e .)")


def _bitsandbytes() -> Check:
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.zeros(4096 + 1, device="cuda" if torch.cuda.is_available() else "cpu"))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
        if not torch.cuda.is_available():
            return Check("bitsandbytes", True, f"{bnb.__version__}: 8-bit AdamW steps; int8/nf4 base weights need a GPU")
        try:  # one nf4 layer, quantized on the GPU, one forward
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cuda")
            layer(torch.ones(1, 64, device="cuda", dtype=torch.bfloat16))
            quant = "nf4 layers run (model.quantize works)"
        except Exception as e:  # noqa: BLE001
            return Check("bitsandbytes", False, f"{bnb.__version__}: 8-bit AdamW steps, but an nf4 layer fails "
                                                f"({type(e).__name__})",
                         "model.quantize needs a bitsandbytes build for this CUDA: pip install -U bitsandbytes")
        return Check("bitsandbytes", True, f"{bnb.__version__}: 8-bit AdamW steps; {quant}")
    except Exception as e:  # noqa: BLE001
        return Check("bitsandbytes", False, f"8-bit AdamW does not run ({type(e).__name__})",
                     "pip install bitsandbytes, or --set train.optimizer=adamw")


def _xformers() -> Check:
    import torch

    try:
        import xformers  # noqa: F401
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001
        return Check("xformers", None, "not installed: attention uses PyTorch SDPA (the default)")
    version = getattr(xformers, "__version__", "")
    if not torch.cuda.is_available():
        return Check("xformers", None, f"{version} installed, but it needs CUDA: attention uses PyTorch SDPA")
    try:  # what diffusers' enable_xformers_memory_efficient_attention tries first
        q = torch.randn(1, 2, 1, 40, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001
        return Check("xformers", False, f"{version} installed, but its CUDA attention fails ({type(e).__name__})",
                     "pip install the xformers build that matches this torch, or keep model.attention='sdpa'")
    return Check("xformers", True, f"{version}: its attention runs; --set model.attention=xformers works")


DEFAULT_DETECTORS = ("yolo11x.pt", "yolo11n.pt")  # the presets' detector, and the small one


def _yolo(detector: str | None) -> Check:
    try:
        from gpo_fast.rewards.counting import configure_ultralytics

        configure_ultralytics()  # offline switches first: importing ultralytics then asks the network nothing
        import ultralytics
        from ultralytics.utils import SETTINGS

        names = [detector] if detector else list(DEFAULT_DETECTORS)
        for name in names:  # where the counting reward looks: the path itself, then ultralytics' weights_dir
            for where in (Path(name).expanduser(), Path(SETTINGS["weights_dir"]) / Path(name).name):
                if where.is_file():
                    return Check("yolo", True, f"ultralytics {ultralytics.__version__}, weights at {where}")
        wanted = " or ".join(names)
        return Check("yolo", None, f"ultralytics {ultralytics.__version__}; {wanted} is not on this machine",
                     f"put {names[0]} in the working folder (or --set reward.detector=PATH); ultralytics downloads "
                     "it where there is network")
    except Exception as e:  # noqa: BLE001
        return Check("yolo", False, f"ultralytics does not import ({type(e).__name__})",
                     "pip install ultralytics-opencv-headless")


def _easyocr() -> Check:
    try:
        import easyocr

        from gpo_fast.rewards import text

        folders = text.OcrTextReward(languages=("en",))._candidates()  # where the reward looks, in its order
        need = (text.DETECTOR_FILE, text.ENGLISH_FILE)
        for folder in folders:
            if all((folder / f).is_file() for f in need):
                return Check("easyocr", True, f"easyocr {easyocr.__version__}, weights in {folder}")
        return Check("easyocr", None, f"easyocr {easyocr.__version__}; its English weights are not on this machine",
                     "easyocr downloads them at first use where there is network, or --set reward.ocr_model_dir=DIR")
    except Exception as e:  # noqa: BLE001
        return Check("easyocr", False, f"easyocr does not import ({type(e).__name__})", "pip install easyocr")


def _hub(model: str = "stabilityai/stable-diffusion-3.5-medium") -> Check:
    cached = ""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "model_index.json")
        cached = f"; {model} is in the local cache" if isinstance(hit, str) else f"; {model} is not cached"
    except Exception:  # noqa: BLE001
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):  # huggingface_hub's reading
        return Check("hub", None, f"HF_HUB_OFFLINE is set: no downloads{cached}",
                     "pass local folders with --set model.path=...")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=3)
        return Check("hub", True, f"{endpoint} reachable{cached}")
    except Exception as e:  # noqa: BLE001
        return Check("hub", None, f"{endpoint} not reachable ({type(e).__name__}){cached}",
                     "download models where there is network and pass --set model.path=/folder")


def _disk() -> Check:
    free = shutil.disk_usage(".").free / 2**30
    ok = free >= 20
    return Check("disk", ok, f"{free:.0f} GiB free here",
                 "" if ok else "SD3.5 Medium needs ~20 GB for weights and checkpoints: free space or run elsewhere")


def _guarded(name: str, fn, *args) -> Check:
    """Run one check; whatever it raises becomes a failed line (a doctor that crashes tells nothing)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return Check(name, False, f"the check itself failed ({type(e).__name__}: {e})",
                     "run `gpo-fast doctor` again; if it repeats, report this line")


def checks(detector: str | None = None) -> list[Check]:
    """Every check, in screen order. detector: the YOLO weights to look for (default: yolo11x.pt or yolo11n.pt)."""
    import platform

    out = [Check("python", True, platform.python_version())]
    out += [_guarded(m, _version, m) for m in ("torch", "diffusers", "transformers", "peft", "accelerate")]
    if out[1].ok:  # torch imports: the rest can look further
        out += [_guarded("cuda", _cuda), _guarded("kernels", _kernels), _guarded("bitsandbytes", _bitsandbytes),
                _guarded("xformers", _xformers)]
    out += [_guarded("yolo", _yolo, detector), _guarded("easyocr", _easyocr), _guarded("hub", _hub),
            _guarded("disk", _disk)]
    return out


def failed_required(results: list[Check]) -> bool:
    return any(c.ok is False and c.name in REQUIRED for c in results)


MARKS = {True: "ok", False: "FAIL", None: "--"}


def render(results: list[Check]) -> str:
    """Plain text, one line per check: mark, name, what was found, and '-> what to do' when there is a fix."""
    width = max(len(c.name) for c in results)
    return "\n".join(f"{MARKS[c.ok]:4s} {c.name:{width}s}  {c.detail}" + (f"  -> {c.fix}" if c.fix else "")
                     for c in results) + "\n"


def print_report(results: list[Check], console=None) -> None:
    """The checks as a rich table (colours on a terminal), one row per check."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(show_header=False, box=None, pad_edge=False)
    for c in results:
        mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[yellow]--[/]"}[c.ok]
        table.add_row(mark, c.name, escape(c.detail) + (f"  [dim]-> {escape(c.fix)}[/]" if c.fix else ""))
    console.print(table)


def main(console=None, detector: str | None = None) -> int:
    """Print the report; 0 unless a required package (torch, diffusers, transformers, peft) fails. No check
    raises (each failure is a line); if rich cannot print, the plain-text report is printed instead."""
    results = checks(detector)
    try:
        print_report(results, console)
    except Exception:  # noqa: BLE001 - rich broken: plain text still tells the story
        print(render(results), end="")
    return 1 if failed_required(results) else 0
