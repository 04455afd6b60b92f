"""What a run computes, in FLOPs: measured once on the run's own model, then counted as the loop runs.

`torch.utils.flop_counter.FlopCounterMode` counts the matrix products, convolutions and attention (not the
elementwise ops: its convention, and the planner's) of three unit operations of the run's model:
- one denoiser forward of one image, without gradients (a sampler step, or a reference or statistics pass);
- one forward and backward of one sample in training mode (a policy pass of an update; the recompute of
  gradient checkpointing is inside its backward, so it is counted);
- one decode of one latent (the VAE; nothing for the toy world, whose latents are its images).
The loop then counts what it runs: a rollout draws P x G images with `steps` sampler steps each (two
forwards per step with guidance, one without) and decodes them; an update runs the passes that
gpo_fast.update.forward_backward reports; an evaluation draws its samples like a rollout. Everything is
summed over all processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def flop_counter():
    """FlopCounterMode that also counts what torch's table leaves out: attention on the CPU
    (`_scaled_dot_product_flash_attention_for_cpu`, forward and backward; the table knows the CUDA kernels) and
    bitsandbytes' own quantized matmuls (model.quantize: `gemm_4bit`, the int8 matmuls), when they are loaded."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    mapping.update(_bitsandbytes_matmuls())
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def _bitsandbytes_matmuls() -> dict:
    """FLOPs of bitsandbytes' matmul ops (2 x rows of A x N x K), for those registered in this process: a quantized
    model has imported bitsandbytes, which registers them (bitsandbytes/_ops.py)."""
    import math

    def gemm_4bit(a, b, shape_b, *args, out_shape=None, **kwargs):  # A (..., K) times the [N, K] weight
        return 2 * math.prod(a) * math.prod(shape_b) // a[-1]

    def int8_matmul(a, b, *args, out_shape=None, **kwargs):  # A (..., K) int8 times B (N, K) int8
        return 2 * math.prod(a) * b[0]

    found = {}
    for name, count in (("gemm_4bit", gemm_4bit), ("int8_linear_matmul", int8_matmul), ("int8_scaled_mm", int8_matmul)):
        try:
            found[getattr(torch.ops.bitsandbytes, name)] = count
        except (AttributeError, RuntimeError):  # bitsandbytes not imported, or an older one without this op
            pass
    return found


@dataclass(frozen=True)
class UnitFlops:
    """FLOPs of the unit operations of one model, one image or sample each."""

    forward: int  # a denoiser forward, no gradients
    train_pass: int  # a denoiser forward and backward in training mode
    decode: int  # a latent decoded to an image

    def sampling(self, images: int, steps: int, cfg_scale: float) -> int:
        """Drawing and decoding `images` images (a rollout, or an evaluation)."""
        per_step = self.forward * (1 if cfg_scale == 1.0 else 2)
        return images * (steps * per_step + self.decode)

    def update(self, forward_samples: int, train_samples: int) -> int:
        """One update: samples through a forward without gradients, and through a training pass."""
        return forward_samples * self.forward + train_samples * self.train_pass

    def to_json(self) -> dict:
        return {"forward": self.forward, "train_pass": self.train_pass, "decode": self.decode}


def measure_unit_flops(model, prompt: str, precision=None) -> UnitFlops:
    """The run's unit FLOPs, on its model as configured (adapter, checkpointing). Leaves no gradient behind and
    the model in the mode it was in; draws from no generator the run uses."""
    import contextlib

    precision = precision or contextlib.nullcontext
    x = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0)).to(model.device)
    sigma = torch.full((1,), 0.5, device=model.device)
    embeds = model.encode_prompts([prompt])
    was_training = model.training
    params = model.trainable_parameters()
    grads = [p.grad for p in params]
    try:
        model.eval()
        with torch.no_grad(), precision(), flop_counter() as counter:
            model.predict(x, sigma, embeds)
        forward = counter.get_total_flops()
        with torch.no_grad(), precision(), flop_counter() as counter:
            model.decode(x)
        decode = counter.get_total_flops()
        model.train()
        with precision(), flop_counter() as counter:
            model.predict(x, sigma, embeds).float().square().mean().backward()
        train_pass = counter.get_total_flops()
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        model.train(was_training)
    return UnitFlops(forward=int(forward), train_pass=int(train_pass), decode=int(decode))
