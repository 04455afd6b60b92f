"""Rollout throughput: images/s for one group at 512 px, 10 steps, CFG 4.5, gpo-fast's sampler against
`StableDiffusion3Pipeline.__call__` on the same model (docs/benchmarks.md).

    ours      gpo_fast.sampling on an SD3Model, under bf16 autocast as the trainer runs it: `sample` for
              latents, `rollout` (sample + SD3Model.decode) for images
    pipeline  StableDiffusion3Pipeline.__call__ on the very same components (the SD3Model wraps the pipeline
              object), output_type="latent" for latents, "pt" for decoded images

Fair by construction: the same transformer, VAE (sliced decoding for both) and scheduler objects; the same
starting noise (passed as `latents`), steps, guidance and batch (the G images and their unconditional
twins in one forward of 2G); the prompt embeddings cached once and passed to the pipeline as
prompt_embeds / negative_prompt_embeds (the trainer encodes each prompt once, so text encoding is timed
by neither). Both outputs are timed by default (`--outputs latent images`): latents compare the samplers,
images add the VAE decode a rollout needs for its rewards. The largest difference between the two outputs
is reported (exactly 0 for latents in float32 on the CPU; bf16 on a GPU differs a little, since the
pipeline keeps its latents in bf16 between steps and gpo-fast in float32).

Compiled (`--outputs compiled`): the trainer's sampler for latents with the denoiser eager, then compiled as
`model.compile = true` compiles it (SD3Model.compile_denoiser, torch.compile of the transformer's forward);
first_call_s is the first compiled call (the compile itself, paid once per run and adapter state), the median is
of the calls after it, and max_abs_diff the largest difference between the two latents.

Scored rollouts (`--outputs scored`): the trainer's rollout of --prompts prompts x G images, drawn one group
per sampler batch and scored by the counting reward (YOLO, --detector: yolo11n.yaml builds random weights
offline, a .pt loads trained ones) with rollout.overlap_scoring off (serial: score, then draw the next
batch) and on (overlap: a worker thread scores each batch while the next is drawn); images/s counts the
whole rollout, rewards included; max_abs_diff is the largest difference between the two runs' rewards
(0: the overlap changes nothing).

The model: SD3.5-Medium-shaped with random weights, built in memory on the GPU in bf16 (the transformer
from SD3.5 Medium's config, see bench_step.SD35M; the VAE from SD3.5 Medium's vae/config.json; its
scheduler, FlowMatchEulerDiscreteScheduler with shift 3.0; two tiny random CLIP text encoders whose
projections add up to the 2048 pooled dimensions, and no T5, whose 256 tokens the pipeline fills with
zeros, so the transformer sees SD3.5's shapes, 333 x 4096 tokens and 2048 pooled), or a local SD3 / SD3.5
pipeline folder with --model (loaded with T5 off). Rows are appended to benchmarks/results/rollout.csv
($OUT/rollout.csv when set) keyed by the GPU. Needs a CUDA GPU; --tiny runs a tiny pipeline on the CPU in
float32 (a smoke test and a parity check; its numbers mean nothing).

    python benchmarks/bench_rollout.py                     # SD3.5-M-shaped, random weights (GPU)
    python benchmarks/bench_rollout.py --model /models/sd3.5m
    python benchmarks/bench_rollout.py --tiny              # CPU smoke run
    python benchmarks/bench_rollout.py --tiny --outputs scored --prompts 4   # the overlap on the CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
FIELDS = ["gpu", "commit", "model", "resolution", "group_size", "steps", "cfg", "output", "impl", "seconds_median",
          "images_per_s", "peak_alloc_gb", "max_abs_diff", "first_call_s"]
PROMPT = "a photo of three cats"
# SD3.5 Medium's vae/config.json (https://huggingface.co/Prgckwb/trpfrog-sd3.5-medium/blob/12d3330/vae/config.json,
# saved from stabilityai/stable-diffusion-3.5-medium snapshot b940f670; SD3 Medium's VAE is the same)
# shipped in the package as gpo_fast/data/sd35-medium.json (which `gpo-fast plan` reads too)
SD35M_VAE = {k: v for k, v in json.loads(resources.files("gpo_fast").joinpath("data/sd35-medium.json").read_text())[
    "vae"].items() if not k.startswith("_")}
# gpo_fast.models.testing's tiny pipeline (32 px, VAE scale 2)
TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                        pooled_projection_dim=32, pos_embed_max_size=16)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=16, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5305)


def build_pipeline(tiny: bool, device, dtype):
    """A random StableDiffusion3Pipeline in memory: SD3.5-Medium-shaped (tiny CLIP encoders, no T5) or tiny."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from gpo_fast.models.testing import _write_tokenizer
    from bench_step import SD35M  # noqa: E402 - benchmarks/ is on sys.path

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    transformer_cfg, vae_cfg = (TINY_TRANSFORMER, TINY_VAE) if tiny else (SD35M, SD35M_VAE)
    # the pooled projection is [CLIP-L pooled, CLIP-G pooled]: 768 + 1280 = 2048 in SD3.5, 16 + 16 in the tiny one
    projections = (16, 16) if tiny else (768, 1280)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tokenizer),
        projection_dim=p, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)) for p in projections]
    with torch.device(device):  # random initialisation where it runs: seconds on a GPU for 2.5 B parameters
        transformer = SD3Transformer2DModel(**transformer_cfg)
        vae = AutoencoderKL(**vae_cfg)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    try:
        transformer.to(device=device, dtype=dtype)
        vae.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=encoders[0].to(device, dtype), tokenizer=tokenizer,
        text_encoder_2=encoders[1].to(device, dtype), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a local SD3 / SD3.5 pipeline folder (default: SD3.5-M-shaped random weights)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed rollouts per implementation (median reported)")
    ap.add_argument("--outputs", nargs="+", default=["latent", "images", "scored"],
                    choices=["latent", "images", "scored", "compiled"])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per scored rollout (one group per batch)")
    ap.add_argument("--detector", default="yolo11n.yaml", help="the counting reward's YOLO for scored rollouts")
    ap.add_argument("--tiny", action="store_true", help="a tiny pipeline on the CPU, float32 (smoke test)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "rollout.csv")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench_rollout needs a CUDA GPU; nothing measured (use --tiny for a CPU smoke run)")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_kernels import commit
    from bench_step import append_rows

    from gpo_fast.models.sd3 import SD3Model
    from gpo_fast.sampling import rollout, sample

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    resolution = 32 if args.tiny else args.resolution
    cuda = device.type == "cuda"
    if args.model:
        model = SD3Model.from_pretrained(args.model, resolution=resolution, device=device, dtype=dtype, t5="off",
                                         prompts=[PROMPT])
        pipe = model._pipe  # the pipeline object the SD3Model wraps: the same components
    else:
        pipe = build_pipeline(args.tiny, device, dtype)
        model = SD3Model(pipe, resolution, device, dtype, prompts=[PROMPT])  # encodes and caches PROMPT and ""
    pipe.to(device)  # the text encoders too (SD3Model parked them on the CPU; neither side uses them when timed)
    pipe.set_progress_bar_config(disable=True)
    model.eval()
    g = args.group_size
    cond, uncond = model.encode_prompts([PROMPT] * g), model.encode_prompts([""] * g)  # the cache: no encoding
    noise = torch.randn((g, *model.latent_shape), generator=torch.Generator().manual_seed(0))

    def ours(output):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # the trainer's amp
            if output == "latent":
                return sample(model, [PROMPT] * g, steps=args.steps, cfg_scale=args.cfg, generator=torch.Generator(),
                              batch_size=g, noise=noise)
            return (rollout(model, [PROMPT], g, steps=args.steps, cfg_scale=args.cfg, generator=torch.Generator(),
                            noise=noise)[2] + 1) / 2  # [-1, 1] -> [0, 1], the pipeline's "pt" range

    def pipeline(output):
        return pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.hidden,
                    negative_pooled_prompt_embeds=uncond.pooled, latents=noise.to(device, dtype),
                    num_inference_steps=args.steps, guidance_scale=args.cfg, height=resolution, width=resolution,
                    output_type="latent" if output == "latent" else "pt").images

    gpu = "cpu-tiny" if args.tiny else torch.cuda.get_device_name()
    name = args.model or ("tiny" if args.tiny else "sd35m-random")
    rev = commit()
    rows = []
    for output in [o for o in args.outputs if o in ("latent", "images")]:
        outs, pair = {}, []
        for impl, fn in (("pipeline", pipeline), ("ours", ours)):
            fn(output)  # warm-up (kernels, allocator)
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result = fn(output)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            outs[impl] = result.float().cpu()
            med = statistics.median(times)
            pair.append(dict(gpu=gpu, commit=rev, model=name, resolution=resolution, group_size=g, steps=args.steps,
                             cfg=args.cfg, output=output, impl=impl, seconds_median=f"{med:.4f}",
                             images_per_s=f"{g / med:.2f}",
                             peak_alloc_gb=f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else ""))
        diff = (outs["ours"] - outs["pipeline"]).abs().max().item()
        for r in pair:
            r["max_abs_diff"] = f"{diff:.3g}"
        rows += pair
        append_rows(args.csv, FIELDS, pair)
        p, o = (float(r["seconds_median"]) for r in pair)
        print(f"{output:6s}: pipeline {pair[0]['images_per_s']} images/s, ours {pair[1]['images_per_s']} images/s "
              f"({p / o:.2f}x); largest difference {diff:.3g}", flush=True)

    def keep(pair, output):  # the run's columns on each row, then the rows to the CSV at once
        for r in pair:
            r.update(gpu=gpu, commit=rev, model=name, resolution=resolution, group_size=g, steps=args.steps,
                     cfg=args.cfg, output=output)
        rows.extend(pair)
        append_rows(args.csv, FIELDS, pair)

    pair = scored_rollouts(model, args, g, cuda) if "scored" in args.outputs else []
    if pair:
        keep(pair, "scored")
        s_, o_ = (float(r["seconds_median"]) for r in pair)
        print(f"scored: serial {pair[0]['images_per_s']} images/s, overlap {pair[1]['images_per_s']} images/s "
              f"({s_ / o_:.2f}x); largest reward difference {pair[0]['max_abs_diff']}", flush=True)
    if "compiled" in args.outputs:  # last: the compile changes the model for everything after it
        pair = compiled(model, noise, args, g, cuda)
        keep(pair, "compiled")
        e_, c_ = (float(r["seconds_median"]) for r in pair)
        print(f"compiled: eager {pair[0]['images_per_s']} images/s, compiled {pair[1]['images_per_s']} images/s "
              f"({e_ / c_:.2f}x) after a first call of {pair[1]['first_call_s']} s; largest difference "
              f"{pair[0]['max_abs_diff']}", flush=True)
    print(f"\n{gpu}, commit {rev}, {name}: one group of {g} at {resolution} px, {args.steps} steps, CFG {args.cfg}\n")
    print("| output | first images/s | second images/s | speed-up | first peak GB | second peak GB |\n|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        p, o = rows[i], rows[i + 1]
        print(f"| {p['output']} ({p['impl']} / {o['impl']}) | {p['images_per_s']} | {o['images_per_s']} | "
              f"{float(p['seconds_median']) / float(o['seconds_median']):.2f}x | {p['peak_alloc_gb'] or '-'} | "
              f"{o['peak_alloc_gb'] or '-'} |")
    return 0


def timed(fn, repeats: int, cuda: bool) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each of `repeats` calls after it), synchronized on a GPU."""
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def compiled(model, noise, args, g: int, cuda: bool) -> list[dict]:
    """The sampler's latents with the denoiser eager, then compiled in place (model.compile = true): two rows
    (impl ours-eager, ours-compiled); the model stays compiled."""
    from gpo_fast.sampling import sample

    out = {}

    def draw(impl):
        def fn():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out[impl] = sample(model, [PROMPT] * g, steps=args.steps, cfg_scale=args.cfg,
                                   generator=torch.Generator(), batch_size=g, noise=noise).float().cpu()
        return fn

    rows = []
    for impl in ("ours-eager", "ours-compiled"):
        if impl == "ours-compiled":
            torch._dynamo.reset()
            model.compile_denoiser()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first, times = timed(draw(impl), args.repeats, cuda)
        med = statistics.median(times)
        rows.append(dict(impl=impl, seconds_median=f"{med:.4f}", images_per_s=f"{g / med:.2f}",
                         peak_alloc_gb=f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "",
                         first_call_s=f"{first:.2f}"))
    diff = (out["ours-compiled"] - out["ours-eager"]).abs().max().item()
    for r in rows:
        r["max_abs_diff"] = f"{diff:.3g}"
    return rows


def scored_rollouts(model, args, g: int, cuda: bool) -> list[dict]:
    """The trainer's rollout with its reward, serial and overlapped: two rows (impl ours-serial, ours-overlap)."""
    from gpo_fast.language import Prompt
    from gpo_fast.rewards.counting import YoloCountReward
    from gpo_fast.sampling import rollout

    if importlib.util.find_spec("ultralytics") is None:
        print("scored: the counting reward needs ultralytics, which is not installed here; not measured")
        return []
    reward = YoloCountReward(args.detector, conf=0.01)
    prompts = [Prompt(text=f"a photo of {n} cats", task="counting", cls="cat", n=n) for n in
               (1 + i % 5 for i in range(args.prompts))]
    per_sample = [p for p in prompts for _ in range(g)]
    if hasattr(model, "cache_prompts"):
        model.cache_prompts([p.text for p in prompts])
    noise = torch.randn((len(per_sample), *model.latent_shape), generator=torch.Generator().manual_seed(1))

    def run(overlap):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # rollout runs under no_grad itself
            parts = rollout(model, [p.text for p in prompts], g, steps=args.steps, cfg_scale=args.cfg,
                            generator=torch.Generator(), batch_size=g, noise=noise, overlap=overlap,
                            score=lambda images, start: reward.measure(images, per_sample[start:start + len(images)]))[3]
        return torch.cat([r.reward for r in parts])

    out, rewards = [], {}
    for impl, overlap in (("ours-serial", False), ("ours-overlap", True)):
        run(overlap)  # warm-up (the detector loads on the first call)
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            rewards[impl] = run(overlap)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out.append(dict(impl=impl, seconds_median=f"{med:.4f}", images_per_s=f"{len(per_sample) / med:.2f}",
                        peak_alloc_gb=f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else ""))
    diff = (rewards["ours-serial"] - rewards["ours-overlap"]).abs().nan_to_num(0.0).max().item()
    same_nan = torch.equal(rewards["ours-serial"].isnan(), rewards["ours-overlap"].isnan())
    for r in out:
        r["max_abs_diff"] = f"{diff:.3g}" if same_nan else "nan-mismatch"
    return out


if __name__ == "__main__":
    sys.exit(main())
