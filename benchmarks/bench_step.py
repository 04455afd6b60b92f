"""One GPO update of the SD3.5-Medium transformer (random weights, built from its config): gpo-fast's step
against the straightforward eager step, in the same run (docs/benchmarks.md, "bench_step.py").

    ours   gpo_fast.update.gpo_update: reference errors under no_grad with the adapter disabled and the
           reference prediction freed at once, the policy pass with gradient checkpointing, the fused
           loss, group-exact micro-batching (`--micro-batch`), bitsandbytes 8-bit AdamW
    eager  what a first trainer writes: the reference prediction kept beside the policy's, per-sample
           errors with torch ops in float32, the loss of gpo_fast.objective, no checkpointing, torch AdamW

Both: the sd35m-counting preset's training settings (LoRA rank 32 on the attention projections, beta 1000,
lr 1e-4, logit-normal noise levels), bf16 weights (or an nf4 base through bitsandbytes), LoRA or full
fine-tuning, one group of G images under bf16 autocast as the trainer runs it, random prompt embeddings of
SD3.5's shapes (333 x 4096 tokens, 2048 pooled: the text encoders are not part of a step once prompts are
cached). Reported: median step time (wall clock between torch.cuda.synchronize calls) over `--steps` after
`--warmup`, peak allocated and reserved memory of the whole step (weights included); rows appended to
benchmarks/results/step.csv ($OUT/step.csv when set) keyed by the GPU, and a Markdown summary printed.
A configuration that runs out of memory is a row with status "oom"; any other failure a row with status
"error: ..." (and exit code 1), and the grid goes on.

The nf4 base goes the way a user loads one: the random bf16 transformer is saved once per run to a
temporary folder and loaded back with diffusers' BitsAndBytesConfig(load_in_4bit, nf4, bf16 compute), the
route of gpo_fast.models.sd3 (model.quantize = "nf4"); the LoRA trains in float32 on top.

Needs a CUDA GPU; `--tiny` runs the same code on a tiny transformer on the CPU in float32 with torch AdamW
for both steps (a smoke test, and a parity check: both steps train the same trajectory; its times mean
nothing).

    python benchmarks/bench_step.py                 # the full grid (GPU)
    python benchmarks/bench_step.py --quick         # 512 px, G = 8, bf16 and nf4, LoRA (gpu_check.sh)
    python benchmarks/bench_step.py --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import atexit
import csv
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from functools import cache
from importlib import resources
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")  # $OUT: gpu_check.sh
# SD3.5 Medium's transformer, as in transformer/config.json of stabilityai/stable-diffusion-3.5-medium
# (the hub is not reachable here; read from a fine-tune saved from that repository's snapshot b940f670,
# https://huggingface.co/Prgckwb/trpfrog-sd3.5-medium/blob/afb7aeb/transformer/config.json, and the same
# values in Tenstorrent's tt-metal SD3.5 helpers). Cross-checks: diffusers' single-file loader tells SD3.5
# Medium by pos_embed of 147456 = 384^2 positions (pos_embed_max_size 384) and 9216 = 6 x 1536 adaLN
# outputs (caption_projection_dim = 24 heads x 64); the model built from this config holds 2.243 B
# parameters plus the 226 M-entry pos_embed buffer, 4.94 GB in bf16, the size of the hub's
# diffusion_pytorch_model.safetensors.
# The config ships in the package (gpo_fast/data/sd35-medium.json, which `gpo-fast plan` reads too).
SD35M = {k: v for k, v in json.loads(resources.files("gpo_fast").joinpath("data/sd35-medium.json").read_text())[
    "transformer"].items() if not k.startswith("_")}
TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
TOKENS = 333  # 77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline's max_sequence_length)
TINY_TOKENS = 8
TINY_RESOLUTION = 64  # 8 x 8 latents
FIELDS = ["gpu", "commit", "resolution", "group_size", "base", "train", "impl", "step_ms_median", "peak_alloc_gb",
          "peak_reserved_gb", "loss_last", "status", "planned_gb"]


@cache
def bench_model_class():
    """The class, defined once per process (gpo_fast.models imports diffusers: seconds, so not at import time,
    and one class object, so that no model outlives its run through a class-level reference)."""
    from gpo_fast.models.base import AdapterMixin, PromptEmbeds

    class BenchModel(AdapterMixin, torch.nn.Module):
        """gpo-fast's model interface (gpo_fast.models.base) around a bare SD3 transformer, with fixed random
        prompt embeddings; predict() is SD3Model.predict."""

        def __init__(self, transformer, tokens: int, device, dtype):
            super().__init__()
            self.transformer = transformer
            self.dtype, self._device = dtype, torch.device(device)
            c = transformer.config
            g = torch.Generator().manual_seed(1)
            self.hidden = torch.randn(1, tokens, c.joint_attention_dim, generator=g).to(device, dtype)
            self.pooled = torch.randn(1, c.pooled_projection_dim, generator=g).to(device, dtype)

        @property
        def device(self) -> torch.device:
            return self._device

        def encode_prompts(self, prompts):
            n = len(prompts)
            return PromptEmbeds(self.hidden.expand(n, -1, -1), self.pooled.expand(n, -1))

        def predict(self, latents, sigmas, embeds):
            timestep = (torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device) * 1000.0
                        ).expand(latents.shape[0])
            net = self.denoiser()
            dt = net.dtype
            return net(hidden_states=latents.to(dt), encoder_hidden_states=embeds.hidden.to(dt),
                       pooled_projections=embeds.pooled.to(dt), timestep=timestep, return_dict=False)[0]

        def schedule(self, steps, solver="euler"):  # the updates' noise levels only; the benchmark samples nothing
            return torch.linspace(1.0, 0.0, steps + 1)

    return BenchModel


_saved: dict = {}  # the random bf16 transformer saved once per run, for the nf4 loads


def _saved_folder(cfg: dict, device, dtype) -> str:
    if "folder" not in _saved:
        folder = tempfile.mkdtemp(prefix="bench-step-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _random_transformer(cfg, device, dtype).save_pretrained(folder)
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        _saved["folder"] = folder
    return _saved["folder"]


def _random_transformer(cfg: dict, device, dtype):
    """SD3Transformer2DModel(**cfg) with torch.nn.init defaults, seed 0, initialised on `device` (seconds on
    a GPU instead of minutes on the CPU), then cast to `dtype`."""
    from diffusers import SD3Transformer2DModel

    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**cfg)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []": there are none
    try:
        transformer = transformer.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the float32 initialisation's blocks
    return transformer


def make_model(cfg: dict, base: str, device, dtype, tokens: int):
    """The model behind gpo-fast's interface: a random SD3 transformer, bf16 (or the run's dtype) or nf4."""
    if base == "nf4":
        from diffusers import BitsAndBytesConfig, SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(
            _saved_folder(cfg, device, dtype), torch_dtype=dtype, device_map={"": str(device)},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
    else:
        transformer = _random_transformer(cfg, device, dtype)
    return bench_model_class()(transformer, tokens, device, dtype)


def eager_step(model, x0, prompts, rewards, cfg, gen, opt):
    """The straightforward step: both predictions alive at once, float32 torch math, no checkpointing."""
    from gpo_fast.objective import loss_from_errors
    from gpo_fast.update import group_noise, loss_spec

    x_s, u, s = group_noise(x0, cfg.rollout.group_size, cfg.train, model.schedule(cfg.rollout.steps), gen)
    embeds = model.encode_prompts(prompts)
    with torch.no_grad(), model.reference() as ref:
        ref_pred = ref.predict(x_s, s, embeds)
    pred = model.predict(x_s, s, embeds)
    e = ((pred.float() - u.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    f = ((ref_pred.float() - u.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    loss = loss_from_errors(e, f, rewards, loss_spec(cfg))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def ours_step(model, x0, prompts, rewards, cfg, gen, opt):
    from gpo_fast.update import gpo_update

    stats = gpo_update(model, x0, prompts, rewards, cfg, gen)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats["loss"]


def run_one(impl: str, resolution: int, g: int, base: str, train: str, args, device, dtype, tiny: bool) -> dict:
    from gpo_fast.config import load_config
    from gpo_fast.update import make_optimizer

    ours = impl == "ours"
    cfg = load_config(preset="sd35m-counting", overrides=[
        f"rollout.group_size={g}", "rollout.prompts=1", f"train.micro_batch={args.micro_batch if ours else 0}",
        f'train.optimizer="{"adamw8bit" if ours and not tiny else "adamw"}"'])
    model = make_model(TINY if tiny else SD35M, base, device, dtype, TINY_TOKENS if tiny else TOKENS)
    if train == "lora":
        rank = 4 if tiny else cfg.lora.rank
        model.add_lora(rank, float(rank) if tiny else cfg.lora.alpha, cfg.lora.targets)
    else:
        model.enable_full_finetune()
    if ours:  # what gpo_fast.components.build_model does with train.gradient_checkpointing
        model.transformer.enable_gradient_checkpointing()
    model.train()
    opt = make_optimizer(model.trainable_parameters(), cfg.train)
    side = resolution // 8  # SD3's VAE: 8 pixels per latent
    x0 = torch.randn((g, 16, side, side), generator=torch.Generator().manual_seed(2)).to(device)
    rewards = torch.arange(g, dtype=torch.float32, device=device)  # every member a different reward
    prompts = ["a photo of three cats"] * g
    step = ours_step if ours else eager_step
    gen = torch.Generator().manual_seed(3)
    cuda = device.type == "cuda"
    times, last = [], None
    if cuda:  # peaks from here: the model, its optimizer and the steps; nothing of an earlier configuration
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # the trainer's amp on a GPU
            last = step(model, x0, prompts, rewards, cfg, gen, opt)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    gb = 2 ** 30
    return dict(step_ms_median=f"{statistics.median(times):.1f}", loss_last=f"{last:.6g}",
                peak_alloc_gb=f"{torch.cuda.max_memory_allocated() / gb:.2f}" if cuda else "",
                peak_reserved_gb=f"{torch.cuda.max_memory_reserved() / gb:.2f}" if cuda else "",
                status="ok")


def planned_update_gb(resolution: int, group_size: int, base: str, train: str, micro_batch: int) -> str:
    """`gpo-fast plan`'s peak of the update phase for a row's configuration (fake tensors on the CPU), less the
    VAE, which this benchmark's model does not hold: the planned figure beside the measured peak_alloc_gb."""
    from gpo_fast.config import load_config
    from gpo_fast.plan import GIB, plan

    config = load_config(preset="sd35m-counting", overrides=[
        f"model.resolution={resolution}", f"rollout.group_size={group_size}", "rollout.prompts=1",
        f"train.micro_batch={micro_batch}", f'model.quantize="{"nf4" if base == "nf4" else "none"}"',
        f"lora.enabled={'true' if train == 'lora' else 'false'}"])
    update = plan(config, only="update").phase("update")
    return f"{(update.peak_bytes - update.holders.get('vae', 0)) / GIB:.2f}"


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows to a CSV (its header first when the file is new), at once: a run cut short by a timeout
    keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def ratio(row: dict) -> str:
    """Measured peak over planned peak of a row, or '-'."""
    try:
        return f"{float(row['peak_alloc_gb']) / float(row['planned_gb']):.3f}"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "-"


def summary(rows: list[dict]) -> str:
    lines = ["| px | G | base | train | eager ms | ours ms | speed-up | eager peak GB | ours peak GB | memory | "
             "ours planned GB | measured / planned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = ("resolution", "group_size", "base", "train")
    for r in rows:
        if r["impl"] != "ours":
            continue
        e = next((x for x in rows if x["impl"] == "eager" and all(x[k] == r[k] for k in key)), None)
        if e is None:
            continue
        both = e["status"] == r["status"] == "ok"
        speed = f"{float(e['step_ms_median']) / float(r['step_ms_median']):.2f}x" if both else "-"
        mem = (f"{float(r['peak_alloc_gb']) / float(e['peak_alloc_gb']):.2f}x"
               if both and e["peak_alloc_gb"] and float(e["peak_alloc_gb"]) > 0 else "-")
        lines.append(f"| {r['resolution']} | {r['group_size']} | {r['base']} | {r['train']} | "
                     f"{e['step_ms_median'] or e['status']} | {r['step_ms_median'] or r['status']} | {speed} | "
                     f"{e['peak_alloc_gb'] or '-'} | {r['peak_alloc_gb'] or '-'} | {mem} | "
                     f"{r.get('planned_gb') or '-'} | {ratio(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--bases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    ap.add_argument("--trains", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--micro-batch", type=int, default=0, help="ours: images per forward (0: the whole group)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="512 px, G = 8, bf16 and nf4, LoRA (gpu_check.sh)")
    ap.add_argument("--tiny", action="store_true", help="a tiny transformer on the CPU, float32 (smoke test)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "step.csv")
    args = ap.parse_args(argv)
    if args.quick:
        args.resolutions, args.group_sizes, args.trains = [512], [8], ["lora"]
    if args.tiny:
        device, dtype, gpu = torch.device("cpu"), torch.float32, "cpu-tiny"
        args.resolutions, args.bases = [TINY_RESOLUTION], ["bf16"]  # "bf16" = not quantized (float32 here)
    elif not torch.cuda.is_available():
        print("bench_step needs a CUDA GPU; nothing measured (use --tiny for a CPU smoke run)")
        return 0
    else:
        device, dtype, gpu = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_kernels import commit  # noqa: E402

    rev = commit()
    rows, failed = [], False
    for res in args.resolutions:
        for g in args.group_sizes:
            for base in args.bases:
                for train in args.trains:
                    if base == "nf4" and train == "full":
                        continue  # a quantized base trains through a LoRA only
                    for impl in ("eager", "ours"):
                        row = dict(gpu=gpu, commit=rev, resolution=res, group_size=g, base=base, train=train,
                                   impl=impl)
                        row["planned_gb"] = ""
                        if impl == "ours" and device.type == "cuda":  # planned (CPU) first: a timeout in it
                            try:  # loses no measured row
                                row["planned_gb"] = planned_update_gb(res, g, base, train, args.micro_batch)
                            except Exception:  # noqa: BLE001 - a planning failure must not sink the measurement
                                traceback.print_exc()
                        try:
                            row.update(run_one(impl, res, g, base, train, args, device, dtype, args.tiny))
                        except Exception as e:  # noqa: BLE001 - one configuration must not sink the grid
                            status = "oom" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:120]}"
                            if status != "oom":
                                failed = True
                                traceback.print_exc()
                            row.update(step_ms_median="", peak_alloc_gb="", peak_reserved_gb="", loss_last="",
                                       status=status.replace("\n", " "))
                        gc.collect()  # the model, its optimizer and any failed step's frames, before the next
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
                        append_rows(args.csv, FIELDS, [row])
                        print(f"{res} px G={g} {base} {train} {impl}: {row['step_ms_median'] or '-'} ms, "
                              f"peak {row['peak_alloc_gb'] or '-'} GB allocated, {row['peak_reserved_gb'] or '-'} GB "
                              f"reserved ({row['status']})", flush=True)
    print(f"\n{gpu}, commit {rev}: one GPO update, median of {args.steps} steps\n")
    print(summary(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
