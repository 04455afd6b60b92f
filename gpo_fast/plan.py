"""Know before you download: the peak memory and the FLOPs of a configured run, planned on a CPU from the
model's configs alone (no weights read, nothing downloaded), by running the trainer's own code on fake
tensors.

How it is measured:
- torch's FakeTensorMode runs the real modules (the SD3 transformer and VAE built from their configs, the
  LoRA through peft, gradient checkpointing) and the trainer's own functions (gpo_fast.sampling's sampler
  step, gpo_fast.update.forward_backward) with shapes, dtypes and autograd, but no storage;
- LiveBytes, a TorchDispatchMode, follows every storage from the op that makes it to its last reference,
  each rounded up to 512 B (the CUDA caching allocator's block), and keeps the peak and what was alive;
- torch.utils.flop_counter.FlopCounterMode counts the FLOPs of the same run.
The text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL) are built from their configs and traced the same way.
What fake tensors cannot see is added by name and priced from sizes: int8 / nf4 weights (bitsandbytes'
byte layout), the optimizer's states, and the CUDA context with the caching allocator's slack (MARGIN_*),
which `fits` subtracts from the card.

Traced under the CPU's bf16 autocast with CUDA's rules added (cuda_autocast_rules): the two treat linear
layers (the fp32 LoRA included), matmuls, convolutions and attention alike, and CUDA's also runs normalization
layers, pow, rsqrt, exp, softmax, sums and nearest/bilinear upsampling in fp32, whose fp32 outputs and input
copies are part of the GPU's peak.
A phase that repeats exactly is traced once: one micro-batch of the update (with the gradients of an
earlier micro-batch already alive) and one sampler step; FLOPs are multiplied out.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import types
import weakref
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from gpo_fast.config import Config
from gpo_fast.errors import InputError
from gpo_fast.flops import flop_counter

GIB = 1024 ** 3
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 B
MARGIN_CONTEXT = int(0.6 * GIB)  # CUDA context, cuBLAS workspace and kernels' own buffers (0.3-0.6 GiB seen)
MARGIN_FRACTION = 0.10  # the caching allocator's fragmentation (typically 5-15% of what is allocated)
TEXT_TOKENS = 77 + 256  # SD3's prompt: CLIP's 77 tokens, then T5's 256 (zeros when T5 is off)
# SD3 / SD3.5's text encoders, as transformers' configs: CLIP ViT-L/14's text tower (123,650,304 parameters),
# OpenCLIP bigG's (694,659,840) and T5 v1.1 XXL's encoder (4,762,310,656); tests/test_plan.py counts them.
TEXT_ENCODERS = {
    "clip_l": ("clip", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768), 77),
    "clip_g": ("clip", dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=1280), 77),
    "t5_xxl": ("t5", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          feed_forward_proj="gated-gelu"), 256),
}
ENCODE_BATCH = 16  # prompts per encoder call (SD3Model.cache_prompts)
SHIPPED = {"stabilityai/stable-diffusion-3.5-medium": "sd35-medium",
           "stabilityai/stable-diffusion-3.5-large": "sd35-large"}


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # what the card has
    bf16_tflops: float  # dense bf16 tensor-core peak, no sparsity
    bandwidth_gbs: float


CARDS = {c.name: c for c in (
    Card("rtx3090", 24, 71, 936), Card("rtx4090", 24, 165, 1008), Card("rtx5090", 32, 209, 1792),
    Card("a100-40", 40, 312, 1555), Card("a100-80", 80, 312, 2039), Card("l40s", 48, 362, 864),
    Card("h100", 80, 989, 3350),
)}
UTILISATION = 0.35  # the share of the bf16 peak a time estimate assumes (an estimate, not a measurement)


def _blocks(nbytes: int) -> int:
    """Bytes rounded up to the caching allocator's 512 B blocks."""
    return -(-nbytes // BLOCK) * BLOCK


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of tensor storages: every output storage of every op counted once, until it dies.
    `track` registers tensors that exist before (weights), under a kind; `kind` tags what ops make now."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.made_by: dict[int, str] = {}  # storage -> "op shape dtype", for the largest temporaries
        self.now = self.peak = self._snapshot = 0
        self.at_peak: dict[str, int] = {}
        self.largest: list[tuple[int, str]] = []  # the largest activations alive near the peak
        self.kind = "activations"
        self._op = ""

    def track(self, tensor: torch.Tensor, kind: str) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = _blocks(storage.nbytes())
        self.live[key] = (size, kind)
        if self._op:
            self.made_by[key] = f"{self._op} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
        self.now += size
        weakref.finalize(storage, self._free, key)
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = self.by_kind()
            if self.peak > self._snapshot * 1.005:  # the largest temporaries, within 0.5% of the peak
                self._snapshot = self.peak
                biggest = sorted(((s, k) for k, (s, kd) in self.live.items() if kd == "activations"), reverse=True)
                self.largest = [(s, self.made_by.get(k, "?")) for s, k in biggest[:3]]

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, ""))
        self.made_by.pop(key, None)
        self.now -= size

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for size, kind in self.live.values():
            out[kind] = out.get(kind, 0) + size
        return out

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = func.__name__
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, self.kind)
        self._op = ""
        return out


@contextlib.contextmanager
def _fake_modules_may_move():
    """Module.to() of fake parameters swaps tensors, and torch.utils.swap_tensors refuses any tensor with a weak
    reference, which the fake-tensor converter's memo holds: skip that check while the model is built."""
    import torch.utils as tu

    real = tu.weakref
    tu.weakref = types.SimpleNamespace(getweakrefs=lambda t: [])
    try:
        yield
    finally:
        tu.weakref = real


def model_configs(config: Config) -> tuple[dict, dict]:
    """(transformer config, VAE config) of the configured model: a local folder's own, or the ones shipped
    for SD3.5 Medium and Large; InputError for a hub id without a shipped config (nothing is downloaded)."""
    from gpo_fast.models.sd3 import DEFAULT_MODEL, is_local_path

    path = config.model.path or DEFAULT_MODEL
    if config.model.kind != "sd3":
        raise InputError("gpo-fast plan plans SD3-family models (the toy world fits any machine); use --preset "
                         "sd35m-counting or sd35m-text, or --set model.kind=sd3")
    if is_local_path(path):
        folder = Path(path).expanduser()
        files = [folder / "transformer" / "config.json", folder / "vae" / "config.json"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InputError(f"model.path {path} has no {missing[0]}; pass a diffusers SD3 folder "
                             "(transformer/ and vae/ with their config.json)")
        try:
            return tuple(json.loads(f.read_text()) for f in files)
        except ValueError as e:
            raise InputError(f"model.path {path}: a config.json is not valid JSON ({e}); pass an intact diffusers "
                             "SD3 folder") from None
    name = SHIPPED.get(path)
    if name is None:
        raise InputError(f"no config is shipped for {path} and nothing is downloaded to plan; download the model "
                         f"and pass its folder with --set model.path=/path, or plan one of: {', '.join(SHIPPED)}")
    shipped = json.loads(resources.files("gpo_fast").joinpath(f"data/{name}.json").read_text())
    return shipped["transformer"], shipped["vae"]


def _clean(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _dtype(config: Config) -> torch.dtype:
    """The weights' dtype on a GPU (what is planned): bfloat16 unless model.dtype says float32."""
    return torch.float32 if config.model.dtype == "float32" else torch.bfloat16


def build_fake_model(config: Config, fake_mode):
    """The trainer's SD3Model over fake transformer and VAE weights, with its adapter (or frozen copy) and
    gradient checkpointing as the config asks; prompt embeddings are fake zeros of SD3's shape."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from gpo_fast.components import prepare_for_training
    from gpo_fast.models.sd3 import SD3Model

    transformer_cfg, vae_cfg = model_configs(config)
    dtype = _dtype(config)
    from diffusers.utils import logging as diffusers_logging

    default, level = torch.get_default_dtype(), diffusers_logging.get_verbosity()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # real: its sigmas are read as numbers
    diffusers_logging.set_verbosity_error()  # its advice on .to(dtype) is for loaded weights, not these
    with fake_mode, _fake_modules_may_move():
        torch.set_default_dtype(dtype)  # made in their dtype: no conversion of fake weights
        try:
            # buffers made in float32 on purpose (pos_embed) are cast as from_pretrained(torch_dtype=...) casts them
            try:
                transformer = SD3Transformer2DModel(**_clean(transformer_cfg)).to(dtype)
                vae = AutoencoderKL(**_clean(vae_cfg)).to(dtype)
            except TypeError as e:  # a config of another model family
                raise InputError(f"model.path {config.model.path}: not an SD3 transformer and VAE config ({e}); "
                                 "gpo-fast plan plans SD3 / SD3.5 models") from None
        finally:
            torch.set_default_dtype(default)
            diffusers_logging.set_verbosity(level)
        pipe = types.SimpleNamespace(transformer=transformer, vae=vae, scheduler=scheduler,
                                     text_encoder=None, text_encoder_2=None, text_encoder_3=None)
        model = SD3Model(pipe, config.model.resolution, torch.device("cpu"), dtype)
        model.requires_grad_(False)
        prepare_for_training(model, config)
        c = transformer.config
        for text in ("", "plan"):
            model._cache[text] = _fake_embeds(c.joint_attention_dim, c.pooled_projection_dim, dtype)
    return model


def _fake_embeds(hidden: int, pooled: int, dtype):
    from gpo_fast.models.base import PromptEmbeds

    return PromptEmbeds(torch.zeros(1, TEXT_TOKENS, hidden, dtype=dtype), torch.zeros(1, pooled, dtype=dtype))


@dataclass
class Phase:
    name: str
    peak_bytes: int  # traced live bytes at the phase's peak, plus what is priced
    holders: dict[str, int]  # what holds the peak, by kind
    flops: int = 0  # per rollout (rollout, decode) or per update (update)
    note: str = ""
    largest: list = field(default_factory=list)  # (bytes, "op shape dtype") of the largest temporaries


@dataclass
class Plan:
    config: Config
    phases: list[Phase] = field(default_factory=list)
    seconds: float = 0.0
    images_per_rollout: int = 0

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def budget(self, card: Card) -> int:
        """The bytes a run may allocate on the card: its memory less the context and the allocator's slack."""
        return card_budget(card.memory_gib * GIB)

    def _flops(self, name: str) -> int:
        return sum(p.flops for p in self.phases if p.name == name)

    def _flops_json(self) -> dict:
        """Per rollout (sampling and decoding), per update, and the sampler's share of a rollout and its updates."""
        rollout, update = self._flops("rollout") + self._flops("decode"), self._flops("update")
        both = rollout + self.config.train.inner_updates * update
        return {"rollout": rollout, "update": update, "sampler_share": rollout / both if both else None}

    def to_json(self, card: Card | None = None) -> dict:
        out = {
            "peak_bytes": self.peak_bytes,
            "phases": {p.name: p.peak_bytes for p in self.phases},
            "holders": {p.name: p.holders for p in self.phases},
            "largest_temporaries": {p.name: [{"bytes": b, "what": w} for b, w in p.largest] for p in self.phases},
            "flops": self._flops_json(),
            "images_per_rollout": self.images_per_rollout,
            "card": None, "fits": None,
            "margin": {"context_bytes": MARGIN_CONTEXT, "allocator_fraction": MARGIN_FRACTION},
            "planned_seconds": round(self.seconds, 1),
            "label": "planned on fake tensors (a CPU trace), not measured on a GPU",
        }
        if card is not None:
            rate = card.bf16_tflops * 1e12 * UTILISATION
            out.update(card=card.name, fits=self.peak_bytes <= self.budget(card),
                       budget_bytes=self.budget(card),
                       fits_by_phase={p.name: p.peak_bytes <= self.budget(card) for p in self.phases},
                       estimate_seconds={"rollout": out["flops"]["rollout"] / rate,
                                         "update": out["flops"]["update"] / rate,
                                         "utilisation": UTILISATION})
        return out


def card_budget(total_bytes: float) -> int:
    """The bytes a run may allocate on a card of total_bytes: less the CUDA context and the allocator's slack."""
    return int((total_bytes - MARGIN_CONTEXT) / (1 + MARGIN_FRACTION))


def auto_vram(total_bytes: int) -> tuple[int | None, str]:
    """`--vram auto`: the largest --vram preset whose planned peak (VRAM_PLANNED_PEAK_GIB, the planner's, held
    equal to it by tests/test_plan.py) fits a card of total_bytes, and why; None when none fits."""
    from gpo_fast.config import VRAM_PLANNED_PEAK_GIB

    budget = card_budget(total_bytes)
    for vram in sorted(VRAM_PLANNED_PEAK_GIB, reverse=True):
        peak = VRAM_PLANNED_PEAK_GIB[vram]
        if peak * GIB <= budget:
            return vram, (f"--vram {vram}: its planned peak of {peak:.2f} GiB is the largest preset's that fits the "
                          f"{budget / GIB:.2f} GiB a card of {total_bytes / GIB:.2f} GiB leaves after the CUDA "
                          f"context and the allocator's slack")
    smallest = min(VRAM_PLANNED_PEAK_GIB, key=VRAM_PLANNED_PEAK_GIB.get)
    return None, (f"no --vram preset fits a card of {total_bytes / GIB:.2f} GiB ({budget / GIB:.2f} GiB usable; the "
                  f"smallest planned peak is --vram {smallest}'s {VRAM_PLANNED_PEAK_GIB[smallest]:.2f} GiB)")


def _weights_bytes(module: torch.nn.Module, quantize: str) -> dict[str, int]:
    """Bytes of a module's weights by kind, with the weights of its Linear layers priced in bitsandbytes' layout
    where quantized: int8 1 B per weight + one fp32 scale per row; nf4 half a byte + one fp32 absmax per 64."""
    out = {"weights": 0, "lora": 0}
    for module_name, sub in module.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            full = f"{module_name}.{name}"
            kind = "lora" if "lora_" in full else "weights"
            n = p.numel()
            quantized = isinstance(sub, torch.nn.Linear) and name == "weight" and "lora_" not in full
            if quantize == "int8" and quantized:
                size = n + p.shape[0] * 4
            elif quantize == "nf4" and quantized:
                size = n // 2 + math.ceil(n / 64) * 4
            else:
                size = n * p.element_size()
            out[kind] = out.get(kind, 0) + _blocks(size)
    for b in module.buffers():
        out["weights"] += _blocks(b.untyped_storage().nbytes())
    return out


def _optimizer_bytes(params: list[torch.nn.Parameter], optimizer: str) -> int:
    """AdamW's two moments: fp32 (8 B per weight), or bitsandbytes' 8-bit blocks (2 B per weight and an fp32
    absmax per 256 for each moment; tensors under 4096 weights keep fp32 moments)."""
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw8bit" and n >= 4096:
            total += 2 * (n + math.ceil(n / 256) * 4)
        else:
            total += 8 * n
    return total


# CUDA's autocast runs these in fp32 and the CPU's does not (torch/include/ATen/autocast_mode.h, AT_FORALL_FP32
# and AT_FORALL_FP32_SET_OPT_DTYPE); the ops the CPU's autocast already runs in fp32 keep its own kernel
CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa")
CUDA_FP32_SET_OPT_DTYPE_OPS = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList")
_LOWER = (torch.bfloat16, torch.float16)


def _overload(name: str):
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _cuda_autocast_kernel(op, set_dtype: bool):
    """A kernel for the CPU's autocast key that does what CUDA's does for `op`: cast bf16/fp16 tensors to fp32
    (policy fp32), or set an unset `dtype` argument to fp32 when the first tensor is eligible (fp32_set_opt_dtype)."""
    from torch.utils._pytree import tree_map

    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    names = [a.name for a in op._schema.arguments]
    at = names.index("dtype") if "dtype" in names else None

    def eligible(t) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(below):
            if not set_dtype:
                def cast(t):
                    return t.float() if eligible(t) and t.dtype in _LOWER else t
                return op(*tree_map(cast, args), **tree_map(cast, kwargs))
            if eligible(args[0]):
                if at is not None and at < len(args):
                    if args[at] is None:
                        args = (*args[:at], torch.float32, *args[at + 1:])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)
    return kernel


@contextlib.contextmanager
def cuda_autocast_rules():
    """While open, the CPU's autocast also follows CUDA's fp32 rules (CUDA_FP32_OPS): the trace then makes the fp32
    tensors a GPU run makes. Registered on the CPU's autocast key for the duration only."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for names, set_dtype in ((CUDA_FP32_OPS, False), (CUDA_FP32_SET_OPT_DTYPE_OPS, True)):
            for name in names:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCPU"):
                    continue  # the CPU's autocast has a policy of its own for it (fp32 for all of these)
                lib.impl(name, _cuda_autocast_kernel(_overload(name), set_dtype), "AutocastCPU")
        yield
    finally:
        lib._destroy()


def _track_residents(model, live: LiveBytes) -> None:
    """The weights already on the GPU when a phase starts: the transformer (LoRA apart), a frozen copy, the VAE."""
    for name, p in model.transformer.named_parameters():
        live.track(p, "lora" if "lora_" in name else "trained weights" if p.requires_grad else "weights")
    for b in model.transformer.buffers():
        live.track(b, "weights")
    frozen = getattr(model, "_frozen_transformer", None)
    for t in [*(frozen.parameters() if frozen is not None else []), *(frozen.buffers() if frozen is not None else [])]:
        live.track(t, "reference copy")
    for t in [*model.vae.parameters(), *model.vae.buffers()]:
        live.track(t, "vae")


def trace_phase(name: str, model, config: Config, fake_mode=None) -> Phase:
    """One phase of a run on `model` (fake, inside fake_mode, or real): its peak live bytes with what holds
    them, and its FLOPs multiplied out to a rollout (rollout, decode) or an update. The same function traces
    the planner's fake model and, in the tests, a real one."""
    from gpo_fast.kernels import plain_pytorch
    from gpo_fast.sampling import _solve
    from gpo_fast.update import forward_backward, group_noise, loss_spec

    ro, tr = config.rollout, config.train
    n = ro.prompts * ro.group_size
    batch = min(ro.batch_size or n, n)
    mb = tr.micro_batch if 0 < tr.micro_batch < n else n
    # micro-batches of whole groups repeat exactly: trace one; others cut groups: trace whole groups covering one
    traced_n = mb if mb % ro.group_size == 0 else min(n, ro.group_size * math.ceil(mb / ro.group_size))
    trainable = model.trainable_parameters()

    def kept_latents(live):  # the final latents of the rollout's earlier batches stay on the GPU for the updates
        live.kind = "latents"
        kept = torch.zeros((n - batch, *model.latent_shape))
        live.kind = "activations"
        return kept

    def rollout(live):  # one sampler step of `batch` images (2x the batch with guidance), under no_grad
        model.eval()
        kept = kept_latents(live)  # noqa: F841 (alive through the step)
        with torch.no_grad():
            _solve(model, ["plan"] * batch, torch.zeros((batch, *model.latent_shape)), 1, ro.cfg_scale)

    def decode(live):  # the last batch decoded whole (the VAE goes one image at a time, sliced, and the batch's
        model.eval()   # images are alive until they are copied off the GPU), the earlier batches' latents alive
        kept = kept_latents(live)  # noqa: F841
        live.kind = "latents"
        latents = torch.zeros((batch, *model.latent_shape))
        live.kind = "activations"
        model.decode(latents)

    def update(live):  # one micro-batch forward + backward
        model.train()
        if mb < n:  # the gradients of an earlier micro-batch
            live.kind = "gradients"
            for p in trainable:
                p.grad = torch.zeros_like(p)
            live.kind = "activations"
        x0 = torch.zeros((traced_n, *model.latent_shape))
        rewards = torch.arange(traced_n, dtype=torch.float32)  # every group non-degenerate: the most work
        x_s, u, s = group_noise(x0, ro.group_size, tr, model.schedule(ro.steps), torch.Generator().manual_seed(0))
        embeds = model.encode_prompts(["plan"] * traced_n)
        forward_backward(model, x_s, s, u, embeds, rewards, loss_spec(config), mb, 1.0,
                         [True] * (traced_n // ro.group_size))
        for p in trainable:
            p.grad = None

    fn, scale, note = {
        "rollout": (rollout, ro.steps * math.ceil(n / batch), f"one sampler step of {batch} images traced"),
        "decode": (decode, n / batch, f"one batch of {batch} images traced (the VAE decodes sliced), the rollout's "
                   "latents alive"),
        "update": (update, n / traced_n, f"one micro-batch of {traced_n} traced"
                   + (", the gradients of an earlier one alive" if mb < n else "")),
    }[name]
    # memory and FLOPs in two runs: FlopCounterMode's module tracking keeps activations alive that gradient
    # checkpointing frees (seen: 5x the live bytes of a checkpointed SD3 update)
    live, flops = LiveBytes(), flop_counter()
    _track_residents(model, live)
    # the trainer runs every phase under CUDA's bf16 autocast (components.autocast_for); here the CPU's with
    # CUDA's fp32 rules added
    def precision():
        if _dtype(config) != torch.bfloat16:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(cuda_autocast_rules())
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack
    with plain_pytorch(), (fake_mode or contextlib.nullcontext()), precision(), live:
        fn(live)
    with plain_pytorch(), (fake_mode or contextlib.nullcontext()), precision(), flops:
        fn(LiveBytes())  # a fresh one, outside its mode: only `kind` is set on it
    holders = dict(live.at_peak)
    if config.model.quantize != "none":  # the base's Linear weights in bitsandbytes' layout, not bf16
        holders["weights"] = _weights_bytes(model.transformer, config.model.quantize)["weights"]
    if name == "update":
        holders["optimizer state"] = _optimizer_bytes(trainable, tr.optimizer)
    return Phase(name, sum(holders.values()), holders, int(flops.get_total_flops() * scale), note, live.largest)


def fake_text_encoders(config: Config, fake_mode) -> dict[str, tuple[torch.nn.Module, int]]:
    """The text encoders the config loads, on fake weights in bf16: name -> (encoder, tokens per prompt)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    default = torch.get_default_dtype()
    out = {}
    with fake_mode, _fake_modules_may_move():
        torch.set_default_dtype(torch.bfloat16)
        try:
            for name, (family, cfg, tokens) in TEXT_ENCODERS.items():
                if name == "t5_xxl" and config.model.t5 == "off":
                    continue
                model = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg)) if family == "clip"
                         else T5EncoderModel(T5Config(**cfg)))
                out[name] = (model.eval().requires_grad_(False), tokens)
        finally:
            torch.set_default_dtype(default)
    return out


def trace_encode(config: Config, fake_mode, model) -> Phase:
    """The prompt encoding: every text encoder on the GPU at once (SD3Model moves them together), one batch of
    ENCODE_BATCH prompts through each, under no_grad; T5 in 8 bits is priced in bitsandbytes' int8 layout.
    A quantized transformer is on the GPU already (bitsandbytes loads it there); a bf16 one joins after."""
    holders = {}
    if config.model.quantize != "none":
        holders["weights"] = _weights_bytes(model.transformer, config.model.quantize)["weights"]
    if config.model.text_encoders == "cpu":
        return Phase("encode", sum(holders.values()), holders,
                     note="the text encoders run on the CPU (model.text_encoders = 'cpu')")
    encoders = fake_text_encoders(config, fake_mode)
    live = LiveBytes()
    for module, _ in encoders.values():
        for t in [*module.parameters(), *module.buffers()]:
            live.track(t, "text encoders")
    with fake_mode, torch.no_grad(), live:
        for name, (module, tokens) in encoders.items():
            ids = torch.zeros((ENCODE_BATCH, tokens), dtype=torch.long)
            if name.startswith("clip"):
                module(ids, output_hidden_states=True)  # the pipeline takes hidden_states[-2]
            else:
                module(ids)
    holders.update(live.at_peak)
    if config.model.t5 == "8bit" and "t5_xxl" in encoders:
        t5 = encoders["t5_xxl"][0]
        holders["text encoders"] += _weights_bytes(t5, "int8")["weights"] - _weights_bytes(t5, "none")["weights"]
    return Phase("encode", sum(holders.values()), holders,
                 note=f"one batch of {ENCODE_BATCH} prompts through {', '.join(encoders)} traced",
                 largest=live.largest)


def plan(config: Config, only: str | None = None) -> Plan:
    """Plan the configured run: the phases' peak memory on the GPU and their FLOPs (`only`: one phase)."""
    if only not in (None, "encode", "rollout", "decode", "update"):
        raise ValueError(f"only must be one of encode, rollout, decode, update; got {only!r}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.time()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_fake_model(config, fake)
    ro = config.rollout
    schedules = {k: model.schedule(k, ro.solver) for k in (1, ro.steps)}  # numbers, made outside the fake mode
    model.schedule = lambda steps, solver=ro.solver: schedules[steps]
    result = Plan(config, images_per_rollout=ro.prompts * ro.group_size)

    if only in (None, "encode"):
        result.phases.append(trace_encode(config, fake, model))
    for name in ("rollout", "decode", "update"):
        if only in (None, name):
            result.phases.append(trace_phase(name, model, config, fake))
    result.seconds = time.time() - start
    return result


def render(result: Plan, card: Card | None = None) -> str:
    """The plan as a person reads it: one line per phase, what holds its peak, FLOPs, and the card's verdict."""
    c = result.config
    from gpo_fast.models.sd3 import DEFAULT_MODEL

    lines = [f"planned for {c.model.path or DEFAULT_MODEL} at {c.model.resolution} px: "
             f"{result.images_per_rollout} images per rollout ({c.rollout.prompts} prompts x {c.rollout.group_size}), "
             f"{'LoRA rank ' + str(c.lora.rank) if c.lora.enabled else 'full fine-tuning'}, base "
             f"{c.model.quantize if c.model.quantize != 'none' else 'bf16'}, micro-batch {c.train.micro_batch or 'all'}, "
             f"gradient checkpointing {'on' if c.train.gradient_checkpointing else 'off'}, T5 {c.model.t5}",
             f"(fake tensors on this CPU, {result.seconds:.0f} s: planned, not measured on a GPU)", ""]
    for p in result.phases:
        held = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(p.holders.items(), key=lambda kv: -kv[1]) if v)
        flops = f"{p.flops / 1e12:8.1f} TFLOP" if p.flops else " " * 14
        lines.append(f"  {p.name:<8} peak {p.peak_bytes / GIB:6.2f} GiB  {flops}  ({held})")
        lines.append(f"  {'':<8} {p.note}")
        if p.largest:
            lines.append(f"  {'':<8} largest temporaries: " + "; ".join(f"{what} {size / 2**20:.0f} MiB"
                                                                     for size, what in p.largest))
    out = result.to_json(card)
    lines += ["", f"  peak over the run {result.peak_bytes / GIB:.2f} GiB; FLOPs per rollout "
                  f"{out['flops']['rollout'] / 1e12:.1f} T (sampling and decoding), per update "
                  f"{out['flops']['update'] / 1e12:.1f} T"]
    if out["flops"]["sampler_share"] is not None:
        lines.append(f"  the sampler is {out['flops']['sampler_share']:.0%} of a rollout and its "
                     f"{result.config.train.inner_updates} updates (guidance doubles its forwards: "
                     "rollout.cfg_scale = 1 runs one per step)")
    if card is not None:
        budget = out["budget_bytes"]
        verdict = "fits" if out["fits"] else "does NOT fit"
        lines.append(f"  {card.name} ({card.memory_gib:g} GiB): {verdict}; the run may use {budget / GIB:.1f} GiB after "
                     f"{MARGIN_CONTEXT / GIB:.1f} GiB for the CUDA context and {MARGIN_FRACTION:.0%} for the "
                     "caching allocator's slack")
        over = [f"{p.name} by {(p.peak_bytes - budget) / GIB:.2f} GiB" for p in result.phases if p.peak_bytes > budget]
        if over:
            lines.append(f"  over the budget: {', '.join(over)}")
        est = out["estimate_seconds"]
        lines.append(f"  estimate (FLOPs at {UTILISATION:.0%} of {card.bf16_tflops:g} bf16 TFLOPS, not a "
                     f"measurement): {est['rollout']:.0f} s per rollout, {est['update']:.1f} s per update")
    return "\n".join(lines)
