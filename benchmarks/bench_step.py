"""One GPO update of the SD3.5-Medium transformer (random weights, built from its config): gpo-fast's step
against the straightforward eager step, in the same run (shared/notes/benchmarks.md, "Step benchmark").

    ours   gpo_fast.train.gpo_update: reference errors under no_grad with the adapter disabled and the
           reference prediction freed at once, the policy pass with gradient checkpointing, the fused
           loss, group-exact micro-batching (`--micro-batch`), bitsandbytes 8-bit AdamW
    eager  what a first trainer writes: the reference prediction kept beside the policy's, per-sample
           errors with torch ops in float32, the loss of gpo_fast.objective, no checkpointing, torch AdamW

Both: bf16 weights (or an nf4 base through bitsandbytes), LoRA rank 32 on the attention projections or
full fine-tuning, one group of G images, random prompt embeddings of SD3.5's shapes (333 x 4096 tokens,
2048 pooled: the text encoders are not part of a step once prompts are cached). Reported: median step
time over `--steps` after `--warmup`, peak allocated and reserved memory; rows appended to
benchmarks/results/step.csv ($OUT/step.csv when set) keyed by the GPU. Needs a CUDA GPU; `--tiny` runs the same code on a tiny
transformer on the CPU (a smoke test: its numbers mean nothing).

    python benchmarks/bench_step.py                 # the full grid (GPU)
    python benchmarks/bench_step.py --quick         # 512 px, G = 8, bf16 and nf4, LoRA (gpu_check.sh)
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

RESULTS = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")  # $OUT: gpu_check.sh
# SD3.5 Medium's transformer (shared/notes/benchmarks.md; diffusers' SD3Transformer2DModel config of
# stabilityai/stable-diffusion-3.5-medium)
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
             dual_attention_layers=tuple(range(13)))
TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
TOKENS = 333
FIELDS = ["gpu", "commit", "resolution", "group_size", "base", "train", "impl", "step_ms_median", "peak_alloc_gb",
          "peak_reserved_gb", "loss_last", "status"]
LORA = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def make_model(cfg: dict, base: str, device, dtype):
    """A model behind gpo-fast's interface around a random SD3 transformer (nf4: quantized on load)."""
    from diffusers import SD3Transformer2DModel

    from gpo_fast.models.base import AdapterMixin, PromptEmbeds

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**cfg)
    if dtype != torch.float32:
        transformer.to(dtype)
    if base == "nf4":  # the honest route for a random model: save it, reload it quantized as a user would
        from diffusers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            transformer.save_pretrained(tmp)
            transformer = SD3Transformer2DModel.from_pretrained(
                tmp, torch_dtype=dtype, device_map={"": str(device)}, quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    else:
        transformer.to(device)

    class BenchModel(AdapterMixin, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer
            g = torch.Generator().manual_seed(1)
            self.hidden = torch.randn(1, TOKENS if cfg is SD35M else 8, cfg["joint_attention_dim"], generator=g)
            self.pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)

        def encode_prompts(self, prompts):
            n = len(prompts)
            return PromptEmbeds(self.hidden.expand(n, -1, -1).to(device, dtype), self.pooled.expand(n, -1).to(device, dtype))

        def predict(self, latents, sigmas, embeds):
            net = self.denoiser()
            t = (torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device) * 1000).expand(latents.shape[0])
            return net(hidden_states=latents.to(net.dtype), encoder_hidden_states=embeds.hidden,
                       pooled_projections=embeds.pooled, timestep=t, return_dict=False)[0]

        def schedule(self, steps):
            return torch.linspace(1.0, 0.0, steps + 1)

    return BenchModel()


def eager_step(model, x0, prompts, rewards, cfg, gen, opt):
    """The straightforward step: both predictions alive at once, float32 torch math, no checkpointing."""
    from gpo_fast.objective import loss_from_errors
    from gpo_fast.train import group_noise

    t, r = cfg.train, cfg.rollout
    x_s, u, s = group_noise(x0, r.group_size, t, model.schedule(r.steps), gen)
    embeds = model.encode_prompts(prompts)
    with torch.no_grad(), model.reference() as ref:
        ref_pred = ref.predict(x_s, s, embeds)
    pred = model.predict(x_s, s, embeds)
    e = ((pred.float() - u.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    f = ((ref_pred.float() - u.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    loss = loss_from_errors(e, f, rewards, group_size=r.group_size, beta=t.beta, objective=t.objective)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def ours_step(model, x0, prompts, rewards, cfg, gen, opt):
    from gpo_fast.train import gpo_update

    stats = gpo_update(model, x0, prompts, rewards, cfg, gen)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats["loss"]


def run_one(impl: str, resolution: int, g: int, base: str, train: str, args, device, dtype, tiny: bool) -> dict:
    from gpo_fast.config import load_config
    from gpo_fast.train import make_optimizer

    cfg_model = TINY if tiny else SD35M
    latent = (16, resolution // 8, resolution // 8) if not tiny else (16, 8, 8)
    model = make_model(cfg_model, base, device, dtype)
    if train == "lora":
        model.add_lora(32 if not tiny else 4, 32.0 if not tiny else 4.0, LORA)
    else:
        model.enable_full_finetune()
    ours = impl == "ours"
    if ours:
        model.transformer.enable_gradient_checkpointing()
    cfg = load_config(overrides=[f"rollout.group_size={g}", "rollout.prompts=1", "train.beta=1000",
                                 f"train.micro_batch={args.micro_batch if ours else 0}",
                                 f'train.optimizer="{"adamw8bit" if ours and not tiny else "adamw"}"'])
    opt = make_optimizer(model.trainable_parameters(), cfg.train)
    x0 = torch.randn((g, *latent), generator=torch.Generator().manual_seed(2)).to(device)
    rewards = torch.arange(g, dtype=torch.float32, device=device)  # every member a different reward
    prompts = ["a photo of three cats"] * g
    step = ours_step if ours else eager_step
    gen = torch.Generator().manual_seed(3)
    times, last = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = step(model, x0, prompts, rewards, cfg, gen, opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        last = loss
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    gb = 2 ** 30
    return dict(step_ms_median=f"{statistics.median(times):.1f}", loss_last=f"{last:.6g}",
                peak_alloc_gb=f"{torch.cuda.max_memory_allocated() / gb:.2f}" if device.type == "cuda" else "",
                peak_reserved_gb=f"{torch.cuda.max_memory_reserved() / gb:.2f}" if device.type == "cuda" else "",
                status="ok")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--bases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    ap.add_argument("--trains", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--micro-batch", type=int, default=0, help="ours: images per forward (0: the whole group)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="512 px, G = 8, bf16 and nf4, LoRA")
    ap.add_argument("--tiny", action="store_true", help="a tiny transformer on the CPU (smoke test)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "step.csv")
    args = ap.parse_args(argv)
    if args.quick:
        args.resolutions, args.group_sizes, args.trains = [512], [8], ["lora"]
    if args.tiny:
        device, dtype, gpu = torch.device("cpu"), torch.float32, "cpu-tiny"
        args.resolutions, args.bases = args.resolutions[:1], ["bf16"]
    elif not torch.cuda.is_available():
        print("bench_step needs a CUDA GPU; nothing measured (use --tiny for a CPU smoke run)")
        return 0
    else:
        device, dtype, gpu = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_kernels import commit  # noqa: E402

    rows = []
    for res in args.resolutions:
        for g in args.group_sizes:
            for base in args.bases:
                for train in args.trains:
                    if base == "nf4" and train == "full":
                        continue  # a quantized base trains through a LoRA only
                    for impl in ("eager", "ours"):
                        row = dict(gpu=gpu, commit=commit(), resolution=res, group_size=g, base=base, train=train,
                                   impl=impl)
                        try:
                            row.update(run_one(impl, res, g, base, train, args, device, dtype, args.tiny))
                        except torch.cuda.OutOfMemoryError:
                            row.update(step_ms_median="", peak_alloc_gb="", peak_reserved_gb="", loss_last="",
                                       status="oom")
                        torch.cuda.empty_cache() if device.type == "cuda" else None
                        rows.append(row)
                        print(f"{res} px G={g} {base} {train} {impl}: {row['step_ms_median']} ms, "
                              f"peak {row['peak_alloc_gb']} GB ({row['status']})", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print("\n| px | G | base | train | eager ms | ours ms | speed-up | eager GB | ours GB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["impl"] != "ours":
            continue
        e = next(x for x in rows if x["impl"] == "eager" and all(x[k] == r[k] for k in
                                                               ("resolution", "group_size", "base", "train")))
        speed = (f"{float(e['step_ms_median']) / float(r['step_ms_median']):.2f}x"
                 if e["status"] == r["status"] == "ok" else "-")
        print(f"| {r['resolution']} | {r['group_size']} | {r['base']} | {r['train']} | {e['step_ms_median'] or e['status']} "
              f"| {r['step_ms_median'] or r['status']} | {speed} | {e['peak_alloc_gb']} | {r['peak_alloc_gb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
