"""`gpo-fast doctor`: one screen on what this machine can do, each line ok or what to do.

Every check is fast and never raises: a failure becomes a line with a fix. Required for any run: torch,
diffusers, transformers, peft; the rest decide what runs well (GPU, kernels) or which rewards work.
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
    return Check("cuda", True, f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                               f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")


def _kernels() -> Check:
    try:
        import torch

        from gpo_fast import kernels

        if not kernels.TRITON_AVAILABLE:
            return Check("kernels", None, "triton absent: the loss runs the PyTorch reference")
        import triton

        if torch.cuda.is_available():
            return Check("kernels", True, f"triton {triton.__version__}: the fused kernels run natively on the GPU")
        if kernels.INTERPRETED:
            return Check("kernels", None, f"triton {triton.__version__}, TRITON_INTERPRET=1: the kernels run "
                                          "interpreted on the CPU (tests only: slow)")
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
        quant = "int8/nf4 base weights available" if torch.cuda.is_available() else "int8/nf4 need a GPU"
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
    if not torch.cuda.is_available():
        return Check("xformers", None, "installed, but it needs CUDA: attention uses PyTorch SDPA")
    return Check("xformers", True, "installed: --set model.attention=xformers works")


def _yolo(detector: str) -> Check:
    try:
        from gpo_fast.rewards.counting import configure_ultralytics

        configure_ultralytics()
        import ultralytics

        from ultralytics.utils import SETTINGS

        for where in (Path(detector), Path(SETTINGS["weights_dir"]) / detector):
            if where.is_file():
                return Check("yolo", True, f"ultralytics {ultralytics.__version__}, weights at {where}")
        return Check("yolo", None, f"ultralytics {ultralytics.__version__}; {detector} is not on this machine",
                     f"put {detector} in the working folder (or --set reward.detector=PATH); ultralytics downloads "
                     "it where there is network")
    except Exception as e:  # noqa: BLE001
        return Check("yolo", False, f"ultralytics does not import ({type(e).__name__})",
                     "pip install ultralytics-opencv-headless")


def _easyocr() -> Check:
    try:
        import easyocr

        from gpo_fast.rewards import text

        folders = [text._easyocr_home_model_dir(), text._offline_package_dir()]  # where the reward looks
        folders = [f for f in folders if f is not None]
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
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return Check("hub", None, f"HF_HUB_OFFLINE is set: no downloads{cached}",
                     "pass local folders with --set model.path=...")
    try:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request("https://huggingface.co", method="HEAD"), timeout=3)
        return Check("hub", True, f"huggingface.co reachable{cached}")
    except Exception as e:  # noqa: BLE001
        return Check("hub", None, f"huggingface.co not reachable ({type(e).__name__}){cached}",
                     "download models where there is network and pass --set model.path=/folder")


def _disk() -> Check:
    free = shutil.disk_usage(".").free / 2**30
    ok = free >= 20
    return Check("disk", ok, f"{free:.0f} GiB free here",
                 "" if ok else "SD3.5 Medium needs ~20 GB for weights and checkpoints: free space or run elsewhere")


def checks(detector: str = "yolo11x.pt") -> list[Check]:
    import platform

    out = [Check("python", True, platform.python_version())]
    out += [_version(m) for m in ("torch", "diffusers", "transformers", "peft", "accelerate")]
    if out[1].ok:  # torch imports: the rest can look further
        out += [_cuda(), _kernels(), _bitsandbytes(), _xformers()]
    out += [_yolo(detector), _easyocr(), _hub(), _disk()]
    return out


def main(console=None, detector: str = "yolo11x.pt") -> int:
    """Print the report; 0 unless a required package fails."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    results = checks(detector)
    table = Table(show_header=False, box=None, pad_edge=False)
    for c in results:
        mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[yellow]--[/]"}[c.ok]
        table.add_row(mark, c.name, c.detail + (f"  [dim]-> {c.fix}[/]" if c.fix else ""))
    console.print(table)
    return 1 if any(c.ok is False and c.name in REQUIRED for c in results) else 0
