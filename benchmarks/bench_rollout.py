"""Rollout throughput: images/s for one group at 512 px, 10 steps, CFG 4.5, gpo-fast's sampler
(`gpo_fast.sampling.rollout` on an SD3Model) against `StableDiffusion3Pipeline.__call__` on the same model
(shared/notes/benchmarks.md). Both produce final latents (output_type="latent": the VAE decode is the
same code for both and is left out) from cached prompt embeddings (passed to the pipeline as
prompt_embeds, since the trainer encodes each prompt once). bf16 on the GPU.

The model is SD3.5-Medium-shaped with random weights (the transformer from its config, SD3's VAE, tiny CLIP
encoders: the text encoders are not timed), or a real pipeline folder with --model. Rows are appended to
benchmarks/results/rollout.csv ($OUT/rollout.csv when set) keyed by the GPU. Needs a CUDA GPU; --tiny runs
the tiny test pipeline on the CPU (a smoke test: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
FIELDS = ["gpu", "commit", "model", "resolution", "group_size", "steps", "cfg", "impl", "seconds_median",
          "images_per_s", "max_abs_diff"]


def build(folder: Path, tiny: bool) -> Path:
    from gpo_fast.models.testing import build_tiny_sd3

    if tiny:
        return build_tiny_sd3(folder)
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from bench_step import SD35M

    sd35m = dict(SD35M, joint_attention_dim=32, pooled_projection_dim=32)  # fed by the tiny CLIP encoders
    folder = build_tiny_sd3(folder, transformer=SD3Transformer2DModel(**sd35m))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE config
    vae.save_pretrained(str(folder / "vae"))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a local SD3 pipeline folder (default: SD3.5-M-shaped random weights)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--csv", type=Path, default=RESULTS / "rollout.csv")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench_rollout needs a CUDA GPU; nothing measured (use --tiny for a CPU smoke run)")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_kernels import commit
    from diffusers import StableDiffusion3Pipeline

    from gpo_fast.models.sd3 import SD3Model
    from gpo_fast.sampling import rollout

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    resolution = 32 if args.tiny else 512
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or str(build(Path(tmp), args.tiny))
        prompt = "a photo of three cats"
        model = SD3Model.from_pretrained(folder, resolution=resolution, device=device, dtype=dtype, t5="off",
                                         prompts=[prompt])
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=dtype, text_encoder_3=None,
                                                        tokenizer_3=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    g = args.group_size
    cond, uncond = model.encode_prompts([prompt] * g), model.encode_prompts([""] * g)
    noise = torch.randn((g, *model.latent_shape), generator=torch.Generator().manual_seed(0))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return rollout(model, [prompt], g, steps=args.steps, cfg_scale=args.cfg, generator=torch.Generator(),
                           noise=noise)[1]

    def theirs():
        return pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.hidden,
                    negative_pooled_prompt_embeds=uncond.pooled, latents=noise.to(device, dtype),
                    num_inference_steps=args.steps, guidance_scale=args.cfg, height=resolution, width=resolution,
                    output_type="latent").images

    rows, outs = [], {}
    for impl, fn in (("pipeline", theirs), ("ours", ours)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            outs[impl] = fn().float()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append(dict(gpu="cpu-tiny" if args.tiny else torch.cuda.get_device_name(), commit=commit(),
                         model=args.model or ("tiny" if args.tiny else "sd35m-random"), resolution=resolution,
                         group_size=g, steps=args.steps, cfg=args.cfg, impl=impl, seconds_median=f"{med:.4f}",
                         images_per_s=f"{g / med:.2f}"))
    diff = (outs["ours"] - outs["pipeline"]).abs().max().item()
    for r in rows:
        r["max_abs_diff"] = f"{diff:.3g}"
        print(f"{r['impl']:8s} {r['images_per_s']} images/s ({r['seconds_median']} s per group of {g})")
    print(f"largest latent difference, ours vs pipeline: {diff:.3g}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
