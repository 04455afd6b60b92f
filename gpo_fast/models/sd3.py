"""Stable Diffusion 3 / 3.5 (Medium, Large) behind the loop's interface, over diffusers' components.

- Loading: `StableDiffusion3Pipeline.from_pretrained` of a hub id or a local folder; bf16 weights on a
  GPU, float32 on the CPU. T5 (the third text encoder, 4.7 B parameters) is "full", "8bit"
  (bitsandbytes) or "off" (the pipeline then feeds zeros in its place, as diffusers does).
- Prompts: encoded once each through the pipeline's own `encode_prompt` (CLIP-L, CLIP-G, T5) and
  cached on the CPU (and on disk under `embeds_cache`); `release_text_encoders()` moves the encoders
  off the GPU once the prompt set is cached.
- Latents: SD3's VAE space, `z = (vae(x) - shift) * scale`; `decode` inverts it, sliced (and tiled
  when asked) so a whole group decodes in bounded memory.
- Sampling schedule: the scheduler's own shifted sigmas (FlowMatchEulerDiscreteScheduler, shift 3
  for SD3.5), so the trainer's Euler sampler and `StableDiffusion3Pipeline.__call__` take the same steps;
  with the "dpm++2m" solver, diffusers' DPMSolverMultistepScheduler on the same shift.
- LoRA and the reference: `AdapterMixin` (peft adapter on the MMDiT attention projections; the
  reference is the same transformer with the adapter disabled).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path

import torch

from gpo_fast.errors import InputError, UserError
from gpo_fast.models.base import SOLVERS, AdapterMixin, PromptEmbeds, dpm_solver

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
# MMDiT attention: image-stream q/k/v/out and text-stream (add_*) q/k/v/out
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(UserError):
    """A model that cannot be loaded, phrased for the user: what is wrong and what to do."""


def is_local_path(path: str) -> bool:
    """A folder on disk (or meant as one), as opposed to a Hugging Face hub id 'owner/name'."""
    return Path(path).expanduser().exists() or not _HUB_ID.match(path)


class SD3Model(AdapterMixin, torch.nn.Module):
    def __init__(self, pipe, resolution: int, device: torch.device, dtype: torch.dtype,
                 embeds_cache: str | None = None, vae_tiling: bool = False, cache_key: str = "",
                 prompts: list[str] | None = None, text_encoders: str = "gpu"):
        super().__init__()
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        # not submodules: the encoders are used once per prompt and leave the GPU after caching
        object.__setattr__(self, "_pipe", pipe)
        self.scheduler = pipe.scheduler
        self.dtype = dtype
        self._device = torch.device(device)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % (self.vae_scale * self.transformer.config.patch_size):
            raise InputError(f"model.resolution {resolution} must be a multiple of "
                             f"{self.vae_scale * self.transformer.config.patch_size} for this model")
        side = resolution // self.vae_scale
        self.latent_shape = (self.transformer.config.in_channels, side, side)
        self.resolution = resolution
        self._cache: dict[str, PromptEmbeds] = {}
        self._disk = Path(embeds_cache).expanduser() if embeds_cache else None
        self._cache_key = cache_key  # model and text-encoder setup: a disk cache never mixes them
        self._encoders_on_device = False
        # where prompts are encoded: the model's device, or the CPU (the encoders never take GPU memory)
        self._encode_device = torch.device("cpu") if text_encoders == "cpu" else self._device
        self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()
        if prompts:  # encode while the GPU holds only the text encoders, then swap in the transformer
            self.cache_prompts(prompts)
        _move(self.transformer, self._device)  # a quantized transformer was loaded onto the GPU already
        self.vae.to(self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_MODEL, *, resolution: int = 512, device="cpu",
                        dtype: torch.dtype | None = None, t5: str = "full", attention: str = "sdpa",
                        embeds_cache: str | None = None, vae_tiling: bool = False,
                        prompts: list[str] | None = None, quantize: str = "none",
                        text_encoders: str = "gpu") -> "SD3Model":
        """Load SD3 / SD3.5 from a hub id or a local folder (ModelLoadError, one sentence, on failure).
        `prompts` are encoded and cached before the transformer moves to the device."""
        from diffusers import StableDiffusion3Pipeline

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        local = is_local_path(path)
        if local and not Path(path).expanduser().is_dir():
            raise ModelLoadError(f"model path {path} does not exist; pass a folder holding a diffusers SD3 "
                                 "pipeline (model_index.json) or a hub id such as "
                                 f"{DEFAULT_MODEL} with --set model.path=...")
        source = str(Path(path).expanduser()) if local else path
        kwargs: dict = {"torch_dtype": dtype}
        if t5 == "off":
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        if t5 == "8bit" or quantize == "int8":
            say_int8_cast_once()
        try:
            if t5 == "8bit":
                kwargs["text_encoder_3"] = _t5_8bit(source, dtype, device)
            if quantize != "none":
                kwargs["transformer"] = _quantized_transformer(source, quantize, dtype, device)
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its "Couldn't connect to the Hub" lines: our error says it
            try:
                with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype; older ones know only it
                    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                    pipe = StableDiffusion3Pipeline.from_pretrained(source, **kwargs)
            finally:
                diffusers_logging.set_verbosity(level)
        except ModelLoadError:
            raise
        except (OSError, ValueError, ConnectionError) as e:
            raise ModelLoadError(_load_error(path, local, e)) from None
        if attention == "xformers":
            _enable_xformers(pipe.transformer, device)
        key = f"{Path(source).resolve() if local else source}|t5={t5}|{dtype}|encoders={text_encoders}"
        return cls(pipe, resolution, device, dtype, embeds_cache=embeds_cache, vae_tiling=vae_tiling, cache_key=key,
                   prompts=prompts, text_encoders=text_encoders)

    # -- prompts ------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self._encode(missing)
        return PromptEmbeds.cat([self._cache[p] for p in prompts]).to(self._device)

    def cache_prompts(self, prompts: list[str], batch_size: int = 16) -> None:
        """Encode every prompt (and '', the unconditional one) now; then free the encoders' GPU memory."""
        todo = [p for p in dict.fromkeys(["", *prompts]) if p not in self._cache]
        for i in range(0, len(todo), batch_size):
            self._encode(todo[i:i + batch_size])
        self.release_text_encoders()

    def release_text_encoders(self) -> None:
        for enc in self._text_encoders():
            _move(enc, "cpu")
        self._encoders_on_device = False
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _text_encoders(self):
        pipe = self._pipe
        return [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> None:
        todo = []
        for p in prompts:
            hit = self._load_cached(p)
            if hit is not None:
                self._cache[p] = hit
            else:
                todo.append(p)
        if not todo:
            return
        if not self._encoders_on_device:
            for enc in self._text_encoders():
                _move(enc, self._encode_device)
            self._encoders_on_device = True
        hidden, _, pooled, _ = self._pipe.encode_prompt(
            prompt=todo, prompt_2=None, prompt_3=None, device=self._encode_device, do_classifier_free_guidance=False,
        )
        for i, p in enumerate(todo):
            e = PromptEmbeds(hidden[i:i + 1].to(self.dtype).cpu(), pooled[i:i + 1].to(self.dtype).cpu())
            self._cache[p] = e
            self._store_cached(p, e)

    def _cache_file(self, prompt: str) -> Path | None:
        if self._disk is None:
            return None
        key = f"{self._cache_key}|{prompt}"
        return self._disk / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _load_cached(self, prompt: str) -> PromptEmbeds | None:
        from safetensors.torch import load_file

        f = self._cache_file(prompt)
        if f is None or not f.is_file():
            return None
        try:
            t = load_file(str(f))
        except Exception:  # noqa: BLE001 - a damaged cache file is re-encoded, not fatal
            return None
        if t.get("hidden") is None or t.get("pooled") is None or t["hidden"].dim() != 3:
            return None
        return PromptEmbeds(t["hidden"].to(self.dtype), t["pooled"].to(self.dtype))

    def _store_cached(self, prompt: str, e: PromptEmbeds) -> None:
        from safetensors.torch import save_file

        f = self._cache_file(prompt)
        if f is None:
            return
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        save_file({"hidden": e.hidden.contiguous(), "pooled": e.pooled.contiguous()}, str(tmp),
                  metadata={"prompt": prompt})
        tmp.replace(f)  # atomic: a killed run never leaves half a file under the final name

    def save_pretrained(self, directory: Path) -> None:
        """The fully fine-tuned transformer in diffusers' format (loads with SD3Transformer2DModel)."""
        self.transformer.save_pretrained(str(directory))

    # -- denoising ----------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, sigmas: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        timestep = (torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device) * 1000.0
                    ).expand(latents.shape[0])
        net = self.denoiser()
        dt = net.dtype  # bf16 weights, or float32 when every weight trains (autocast computes in bf16)
        return net(
            hidden_states=latents.to(dt), encoder_hidden_states=embeds.hidden.to(dt),
            pooled_projections=embeds.pooled.to(dt), timestep=timestep, return_dict=False,
        )[0]

    def schedule(self, steps: int, solver: str = "euler") -> torch.Tensor:
        import copy

        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
        if solver != "euler":
            return self.dpm_solver(steps).sigmas.float()
        sched = copy.deepcopy(self.scheduler)  # set_timesteps mutates the scheduler
        mu = self._mu()
        sched.set_timesteps(steps, device="cpu", **({"mu": mu} if mu is not None else {}))
        return sched.sigmas.float()

    def dpm_solver(self, steps: int):
        """DPM-Solver++(2M) with this model's flow shift: what StableDiffusion3Pipeline samples when given
        `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")`."""
        c = self.scheduler.config
        return dpm_solver(steps, shift=c.get("shift", 1.0), dynamic_shifting=c.get("use_dynamic_shifting", False),
                          mu=self._mu())

    def _mu(self) -> float | None:
        """The resolution-dependent shift exponent of a scheduler with dynamic shifting (as the pipeline computes
        it), or None."""
        c = self.scheduler.config
        if not c.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.transformer.config.patch_size
        seq = (self.latent_shape[1] // p) * (self.latent_shape[2] // p)
        return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        z = latents.to(self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0)


def _move(module: torch.nn.Module, device) -> None:
    """Move an encoder; an 8-bit bitsandbytes model moves too where the versions allow it (transformers
    with bitsandbytes >= 0.48), and otherwise stays where it was loaded."""
    try:
        module.to(device)
    except (ValueError, RuntimeError, TypeError):
        pass


def _t5_8bit(source: str, dtype: torch.dtype, device: torch.device):
    """T5-XXL in 8 bits through bitsandbytes (about 5 GB instead of 9.5 GB in bf16); needs a CUDA GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelLoadError("model.t5 = '8bit' needs a CUDA GPU (bitsandbytes 8-bit layers); "
                             "use 'full' or 'off' on this machine")
    from transformers import BitsAndBytesConfig, T5EncoderModel

    return T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", torch_dtype=dtype,
                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                          device_map={"": str(device)})


# bitsandbytes logs this on every int8 matmul whose input is not float16 (bitsandbytes/autograd/_functions.py,
# MatMul8bitLt.forward): every forward of an int8 transformer or T5 under bf16 autocast
INT8_CAST_LOGGER, INT8_CAST_MESSAGE = "bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"


class _FirstOnly(logging.Filter):
    """Passes the first record whose message starts with `prefix`, drops the ones after it, passes the rest."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def say_int8_cast_once() -> None:
    """bitsandbytes' int8 cast notice, said once per process instead of at every matmul."""
    logger = logging.getLogger(INT8_CAST_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        logger.addFilter(_FirstOnly(INT8_CAST_MESSAGE))


def _quantized_transformer(source: str, quantize: str, dtype: torch.dtype, device: torch.device):
    """The transformer's Linear weights in int8 or nf4 (bitsandbytes; QLoRA-style: the LoRA trains in
    float32 on top, compute in bf16). 2.5 B parameters: ~5 GB in bf16, ~2.7 GB int8, ~1.6 GB nf4."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelLoadError(f"model.quantize = '{quantize}' needs a CUDA GPU (bitsandbytes); use 'none' on this machine")
    from diffusers import BitsAndBytesConfig, SD3Transformer2DModel

    if quantize == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", quantization_config=q,
                                                 torch_dtype=dtype, device_map={"": str(device)})


def _enable_xformers(transformer, device: torch.device) -> None:
    from diffusers.utils import is_xformers_available

    if device.type != "cuda" or not is_xformers_available():
        raise ModelLoadError("model.attention = 'xformers' needs the xformers package and a CUDA GPU; install "
                             "it with `pip install gpo-fast[xformers]` or keep the default 'sdpa'")
    transformer.enable_xformers_memory_efficient_attention()


def _load_error(path: str, local: bool, err: Exception) -> str:
    if local:
        first = (str(err).strip().splitlines() or [""])[0]
        return (f"{path} is not a loadable SD3 pipeline folder ({type(err).__name__}: {first}); "
                "it needs model_index.json and the component folders that `save_pretrained` writes")
    return (f"could not load '{path}' from the Hugging Face hub (no network, or a gated model not yet accepted: "
            f"accept its licence on huggingface.co and run `hf auth login`); download it where there is "
            "network and pass the folder with --set model.path=/path/to/folder")
