"""The SD3-family adapter on a tiny SD3 pipeline built in code (no download): sampling as the diffusers
pipeline samples, prompt caching, two GPO steps through the loop, the adapter loaded by
StableDiffusion3Pipeline.load_lora_weights giving the trainer's images, and load errors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpo_fast.models.sd3 import ModelLoadError, SD3Model
from gpo_fast.sampling import sample
from gpo_fast.models.testing import IMAGE_SIZE, build_tiny_sd3
from sd3_util import BrightnessReward

PROMPT = "a photo of three cats"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


def _pipeline(folder, t5: bool = False):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), **({} if t5 else {"text_encoder_3": None,
                                                                                 "tokenizer_3": None}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(pipe, noise, steps=3, cfg=4.0):
    return pipe([PROMPT] * noise.shape[0], latents=noise.clone(), num_inference_steps=steps, guidance_scale=cfg,
                height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="latent").images


def test_sampler_takes_the_pipelines_steps(tiny_sd3):
    model = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off")
    assert model.latent_shape == (16, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    sigmas = model.schedule(3)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and sigmas[1] > 2 / 3  # shift 3 keeps more steps at high noise
    ours = sample(model, [PROMPT] * 2, steps=3, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
    noise = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, _pipeline_latents(_pipeline(tiny_sd3), noise), rtol=1e-5, atol=1e-5)
    images = model.decode(ours)
    vae = _pipeline(tiny_sd3).vae  # the pipeline's own decode of these latents
    with torch.no_grad():
        expected = vae.decode(ours / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_t5_on_encodes_the_prompts_as_the_pipelines_encode_prompt(tiny_sd3):
    """model.t5 = "full", as both SD3.5 presets run it: the embeddings are StableDiffusion3Pipeline.encode_prompt's
    with its T5 (the tiny SD3 has a one-layer T5), and T5's part of them is not the zeros of t5 = "off"."""
    prompts = [PROMPT, "a sign that reads open", ""]
    model = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="full")
    ours = model.encode_prompts(prompts)
    pipe = _pipeline(tiny_sd3, t5=True)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)
    off = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off").encode_prompts(prompts)
    assert torch.equal(off.pooled, ours.pooled)  # CLIP's pooled vectors, T5 or not
    t5_part = ours.hidden[:, 77:]  # CLIP's 77 tokens, then T5's
    assert t5_part.abs().max() > 0.1 and off.hidden[:, 77:].abs().max() == 0


def test_the_presets_bf16_precision_samples_as_the_float32_pipeline_to_bf16_rounding(tiny_sd3, monkeypatch):
    """The presets' precision (bf16 weights, bf16 autocast; on the CPU here) draws what the float32 pipeline
    draws to within bf16's rounding, and one GPO update through the loop's own code under it (bf16 prediction,
    float32 target, into the loss) gives the float32 model's gradient on the float32 LoRA to bf16's rounding."""
    from gpo_fast.config import load_config
    from gpo_fast.models.sd3 import SD3_LORA_TARGETS
    from gpo_fast.update import gpo_update

    model = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="full", dtype=torch.bfloat16)
    assert model.transformer.dtype == torch.bfloat16
    noise = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sample(model, [PROMPT] * 2, steps=3, cfg_scale=4.0, generator=None, noise=noise)
    reference = _pipeline_latents(_pipeline(tiny_sd3, t5=True), noise)
    assert ours.dtype == torch.float32  # the sampler's state stays float32
    err = (ours - reference).abs().max().item()
    assert 0 < err < 0.05 * reference.abs().max().item()  # bf16 (8 bits of mantissa) over 3 steps, not float32's

    cfg = load_config(preset="sd35m-counting", overrides=["rollout.group_size=4", "rollout.prompts=1",
                                                          "rollout.steps=3", "train.micro_batch=4"])
    x0 = sample(model, [PROMPT] * 4, steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, m in (("bf16", model), ("fp32", SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE,
                                                                       t5="full", dtype=torch.float32))):
        torch.manual_seed(3)  # the same LoRA in both
        m.add_lora(4, 4.0, SD3_LORA_TARGETS)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.01, generator=torch.Generator().manual_seed(len(n)))
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            stats = gpo_update(m, x0, [PROMPT] * 4, torch.arange(4.0), cfg, torch.Generator().manual_seed(2))
        assert math.isfinite(stats["loss"]) and all(p.dtype == torch.float32 for p in m.trainable_parameters())
        grads[name] = torch.cat([p.grad.reshape(-1) for p in m.trainable_parameters()])
    assert grads["fp32"].abs().max() > 0 and torch.isfinite(grads["bf16"]).all()
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0).item()
    assert cosine > 0.99, cosine  # the same direction to bf16's rounding


def test_prompt_embeddings_are_cached_on_disk_and_encoders_released(tiny_sd3, tmp_path):
    model = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off", embeds_cache=str(tmp_path))
    model.cache_prompts([PROMPT, "two dogs"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # the two prompts and '' (unconditional)
    first = model.encode_prompts([PROMPT, ""])
    fresh = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off", embeds_cache=str(tmp_path))
    fresh._pipe.text_encoder = None  # from the disk cache, no encoder may run
    fresh._pipe.text_encoder_2 = None
    again = fresh.encode_prompts([PROMPT, ""])
    assert torch.equal(first.hidden, again.hidden) and torch.equal(first.pooled, again.pooled)
    assert not torch.equal(first.hidden[0], first.hidden[1])
    # another model (or T5 setting) never reads these files: its embeddings are keyed apart
    import shutil

    copy = shutil.copytree(tiny_sd3, tmp_path / "other_model")
    other = SD3Model.from_pretrained(str(copy), resolution=IMAGE_SIZE, t5="off", embeds_cache=str(tmp_path / "c"))
    other._disk = tmp_path  # the same cache folder as above
    other.cache_prompts([PROMPT])
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


@pytest.mark.slow
@pytest.mark.parametrize("t5", ["off", "full"])
def test_two_gpo_steps_then_the_pipeline_loads_the_adapter_and_draws_the_same(t5, tiny_sd3, tmp_path, monkeypatch):
    """The SD3.5 preset's loop on the tiny SD3, with T5 as the presets run it ("full") and without: the adapter
    trains, and StableDiffusion3Pipeline (with its T5 where the run had one) draws the trainer's images with it."""
    from gpo_fast import components
    from gpo_fast.config import load_config
    from gpo_fast.train import train

    monkeypatch.setattr(components, "build_reward", lambda config, device: BrightnessReward())
    cfg = load_config(preset="sd35m-counting", overrides=[
        f'model.path="{tiny_sd3}"', f"model.resolution={IMAGE_SIZE}", f'model.t5="{t5}"', f'out="{tmp_path / "run"}"',
        "lora.rank=4", "lora.alpha=8.0",  # alpha != rank: the file must carry it
        "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2",
        "rollout.batch_size=4", "train.rollouts=1", "train.inner_updates=2", "train.lr=0.01", "train.warmup_updates=0",
        "train.micro_batch=4", 'train.optimizer="adamw"', "eval.samples=10", "eval.steps=2", "eval.every=0",
    ])
    result = train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "prompts.jsonl").is_file() and result.summary["steps"] == 2
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # two steps moved the adapter off zero

    noise = torch.randn((2, *result.model.latent_shape), generator=torch.Generator().manual_seed(7))
    ours = sample(result.model, [PROMPT] * 2, steps=3, cfg_scale=4.0, generator=torch.Generator().manual_seed(7))
    pipe = _pipeline(tiny_sd3, t5=t5 == "full")
    base = _pipeline_latents(pipe, noise)
    pipe.load_lora_weights(str(run / "adapter"))
    tuned = _pipeline_latents(pipe, noise)
    assert (tuned - base).abs().max() > 1e-4  # the adapter changes the pipeline's images ...
    torch.testing.assert_close(tuned, ours, rtol=1e-4, atol=1e-5)  # ... into the trainer's policy's


def _quantize_nf4(module):
    """Every nn.Linear as a bitsandbytes nf4 Linear4bit with the same weights, on the CPU: the layers diffusers'
    BitsAndBytesConfig(load_in_4bit, nf4) loads on a GPU (diffusers refuses to quantize without one)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first no-grad forward
            # (it needs out_features % 32 == 0, which the tiny model lacks); the GPU route this test stands for
            # never repacks, so keep the portable CPU path on every processor
            q.support_avx512bf16_for_cpu = False
            setattr(module, name, q.to("cpu"))  # quantizes the weight
        else:
            _quantize_nf4(child)


def test_lora_on_an_nf4_base_trains_only_the_adapter(tiny_sd3, tmp_path):
    """The QLoRA route (model.quantize = "nf4", bench_step's nf4 rows) on the CPU: LoRA on 4-bit layers, gradient
    checkpointing, gpo_update and 8-bit AdamW move the adapter alone; the reference stays the quantized base, bit
    for bit; the adapter file loads onto a fresh nf4 base and gives the trained policy."""
    import bitsandbytes as bnb

    from gpo_fast.config import load_config
    from gpo_fast.models.sd3 import SD3_LORA_TARGETS
    from gpo_fast.update import gpo_update, make_optimizer

    def nf4_model():
        m = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off")
        _quantize_nf4(m.transformer)
        return m

    def weights_4bit(m):  # in module order, which peft's wrapping (`x.base_layer`) keeps
        return [q.weight.data.clone() for q in m.transformer.modules() if isinstance(q, bnb.nn.Linear4bit)]

    model = nf4_model()
    quantized = weights_4bit(model)
    assert len(quantized) > 20 and all(w.dtype == torch.uint8 for w in quantized)
    cfg = load_config(preset="sd35m-counting", overrides=["rollout.group_size=4", "rollout.prompts=1",
                                                          "rollout.steps=2", "train.lr=0.01"])
    assert cfg.train.optimizer == "adamw8bit"
    x0 = torch.randn((4, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    probe = (x0, torch.full((4,), 0.5), model.encode_prompts([PROMPT] * 4))
    with torch.no_grad():
        base = model.predict(*probe)
    model.add_lora(4, 8.0, SD3_LORA_TARGETS)
    model.transformer.enable_gradient_checkpointing()
    model.train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    opt = make_optimizer(model.trainable_parameters(), cfg.train)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    gen, losses = torch.Generator().manual_seed(2), []
    for _ in range(3):
        losses.append(gpo_update(model, x0, [PROMPT] * 4, torch.arange(4.0), cfg, gen)["loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert abs(losses[0] - 0.6931472) < 1e-5 and losses[-1] < losses[0]  # B = 0 at first, then it learns
    model.eval()
    with torch.no_grad():
        policy = model.predict(*probe)
        with model.reference() as ref:
            reference = ref.predict(*probe)
    assert torch.equal(reference, base)  # the frozen 4-bit base, untouched
    assert (policy - base).abs().max() > 1e-4
    after = weights_4bit(model)
    assert len(after) == len(quantized) and all(torch.equal(a, b) for a, b in zip(after, quantized))
    model.save_adapter(tmp_path)
    fresh = nf4_model()
    fresh.load_adapter(tmp_path)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(*probe), policy, rtol=1e-5, atol=1e-6)


def test_a_model_path_that_does_not_exist_is_one_sentence():
    with pytest.raises(ModelLoadError, match="does not exist"):
        SD3Model.from_pretrained("/nowhere/sd3", t5="off")


def test_a_hub_id_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model.path"):
        SD3Model.from_pretrained("someone/not-a-model", t5="off")


def test_xformers_without_cuda_is_refused_clearly(tiny_sd3):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have xformers")
    with pytest.raises(ModelLoadError, match="xformers"):
        SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off", attention="xformers")


@pytest.mark.parametrize("kw", [{"quantize": "nf4"}, {"quantize": "int8"}, {"t5": "8bit"}])
def test_bitsandbytes_paths_without_cuda_are_refused_clearly(tiny_sd3, kw):
    if torch.cuda.is_available():
        pytest.skip("on a GPU these load for real")
    kw = {"t5": "off", **kw}
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, **kw)


GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))


@pytest.mark.slow
def test_cli_missing_model_path_exit_2_no_traceback(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--preset", "sd35m-counting", "--set", 'model.path="/nowhere/sd3"',
                          "--set", 'reward.detector="yolo11n.yaml"', "--out", str(tmp_path / "r")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr
    assert "/nowhere/sd3" in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_bad_prompt_line_names_the_line_exit_2(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a photo of two cats", "task": "counting", "class": "cat", "n": 2}\n'
                   '{"prompt": "a photo of two unicorns", "task": "counting", "class": "unicorn", "n": 2}\n')
    out = subprocess.run([GPO_FAST, "train", "--preset", "sd35m-counting", "--set", f'data.prompts="{bad}"',
                          "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "line 2" in out.stderr and "unicorn" in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_trains_the_tiny_sd3_with_a_yaml_built_yolo(tiny_sd3, tmp_path):
    """The real path end to end: gpo-fast train, an SD3 pipeline folder, YOLO counting (random weights
    from its yaml, so only the plumbing is tested), the built-in counting prompt set."""
    run = tmp_path / "run"
    out = subprocess.run([
        GPO_FAST, "train", "--preset", "sd35m-counting", "--out", str(run),
        "--set", f'model.path="{tiny_sd3}"', "--set", f"model.resolution={IMAGE_SIZE}", "--set", 'model.t5="off"',
        "--set", 'reward.detector="yolo11n.yaml"', "--set", "reward.conf=0.001", "--set", "reward.partial_credit=true",
        "--set", "rollout.prompts=2", "--set", "rollout.group_size=2", "--set", "rollout.steps=2",
        "--set", "train.rollouts=1", "--set", "train.inner_updates=1", "--set", 'train.optimizer="adamw"',
        "--set", "eval.samples=10", "--set", "eval.steps=2", "--set", "eval.every=1",
    ], capture_output=True, text=True, env={**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "yolo")})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval_after"]["n_samples"] == 10
    assert summary["accuracy_after"] * 10 == pytest.approx(round(summary["accuracy_after"] * 10))  # k of 10 samples
    # the built-in set holds out val items: the adapter is chosen on them, the gain measured on eval
    assert summary["prompts"]["val"] > 0 and "val split" in summary["validation"] and "val split" in out.stdout
    splits = [__import__("json").loads(line)["split"] for line in (run / "prompts.jsonl").read_text().splitlines()]
    assert {"train", "val", "eval"} == set(splits)
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert "accuracy before" in out.stdout


@pytest.mark.slow
def test_cli_hub_id_without_network_exit_2_no_traceback(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--preset", "sd35m-counting", "--set", 'model.path="someone/not-a-model"',
                          "--set", 'reward.detector="yolo11n.yaml"', "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "someone/not-a-model" in out.stderr and "model.path" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_missing_detector_weights_exit_2_says_where(tmp_path):
    out = subprocess.run([GPO_FAST, "train", "--preset", "sd35m-counting", "--set",
                          f'reward.detector="{tmp_path / "yolo-missing.pt"}"', "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env={**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "y")})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "yolo-missing.pt" in out.stderr and "reward.detector" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content, needle", [(None, "no such prompt file"), ("\n# only a comment\n", "no prompts")])
def test_cli_missing_or_empty_prompt_file_exit_2(tmp_path, content, needle):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    out = subprocess.run([GPO_FAST, "train", "--preset", "sd35m-text", "--set", f'data.prompts="{path}"',
                          "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_text_encoders_on_the_cpu_encode_the_same_prompts(tiny_sd3):
    """model.text_encoders = "cpu": the prompts are encoded on the CPU (on a GPU machine the encoders never take
    GPU memory); the embeddings, T5's part included, are those of the default path."""
    from gpo_fast.components import build_model
    from gpo_fast.config import load_config

    on_cpu = build_model(load_config(preset="sd35m-counting", overrides=[
        f'model.path="{tiny_sd3}"', f"model.resolution={IMAGE_SIZE}", 'model.t5="full"', 'model.text_encoders="cpu"',
        'device="cpu"']), torch.device("cpu"), trainable=False)
    default = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="full")
    assert on_cpu._encode_device == torch.device("cpu")
    a, b = on_cpu.encode_prompts([PROMPT]), default.encode_prompts([PROMPT])
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)


@pytest.mark.slow
def test_model_compile_compiles_the_denoiser_whole_and_changes_no_output(tiny_sd3, monkeypatch):
    """model.compile: the tiny SD3 with a LoRA adapter compiles as one graph (no graph break) with the adapter on
    and off (the reference), and the compiled forward, and its gradient, are the eager one's."""
    from gpo_fast.components import build_model
    from gpo_fast.config import load_config

    config = load_config(preset="sd35m-counting", overrides=[
        f'model.path="{tiny_sd3}"', f"model.resolution={IMAGE_SIZE}", 'model.t5="off"', 'model.dtype="float32"',
        "model.compile=true", "train.gradient_checkpointing=false"])
    model = build_model(config, torch.device("cpu"), prompts=[PROMPT])
    eager = build_model(config.model_copy(update={"model": config.model.model_copy(update={"compile": False})}),
                        torch.device("cpu"), prompts=[PROMPT])
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in [*model.trainable_parameters(), *eager.trainable_parameters()]:
            p.fill_(0.01)  # a nonzero adapter, the same in both
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    sigma, embeds = torch.tensor([0.7, 0.3]), model.encode_prompts([PROMPT, ""])

    inner = model.transformer.forward  # Module.compile leaves forward itself eager; explain traces it
    kwargs = dict(hidden_states=x, encoder_hidden_states=embeds.hidden, pooled_projections=embeds.pooled,
                  timestep=sigma * 1000, return_dict=False)
    assert torch._dynamo.explain(inner)(**kwargs).graph_break_count == 0
    with model.reference():
        assert torch._dynamo.explain(inner)(**kwargs).graph_break_count == 0

    outputs = []
    for m in (model, eager):
        out = m.predict(x, sigma, embeds)
        out.square().mean().backward()
        with torch.no_grad(), m.reference():
            ref = m.predict(x, sigma, embeds)
        outputs.append((out.detach(), ref, [p.grad for p in m.trainable_parameters()]))
    (out, ref, grads), (out_e, ref_e, grads_e) = outputs
    assert model.transformer._compiled_call_impl is not None and eager.transformer._compiled_call_impl is None
    torch.testing.assert_close(out, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref, ref_e, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, ref)  # the adapter is on in one, off in the other
    for g, g_e in zip(grads, grads_e):
        torch.testing.assert_close(g, g_e, rtol=1e-3, atol=1e-6)


def test_dpm_solver_draws_what_the_pipeline_draws_with_diffusers_dpm_scheduler(tiny_sd3):
    """rollout.solver = "dpm++2m" on SD3: the trainer's sampler equals StableDiffusion3Pipeline given diffusers'
    DPMSolverMultistepScheduler for flow matching on the model's shift, with and without guidance."""
    from diffusers import DPMSolverMultistepScheduler

    model = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="off")
    pipe = _pipeline(tiny_sd3)
    shift = pipe.scheduler.config.shift
    pipe.scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                 prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=shift)
    noise = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    for cfg in (4.0, 1.0):
        ours = sample(model, [PROMPT] * 2, steps=4, cfg_scale=cfg, generator=torch.Generator(), noise=noise,
                      solver="dpm++2m")
        theirs = _pipeline_latents(pipe, noise, steps=4, cfg=cfg)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    euler = sample(model, [PROMPT] * 2, steps=4, cfg_scale=1.0, generator=torch.Generator(), noise=noise)
    assert (euler - ours).abs().max() > 1e-3  # the solvers differ


def test_bitsandbytes_int8_cast_notice_is_said_once(caplog):
    """bitsandbytes logs a notice at every int8 matmul with bf16 inputs; once filtered it passes the first only,
    and other records of that logger still pass. The logger and message are the installed bitsandbytes' own."""
    import logging

    import bitsandbytes.autograd._functions as bnb_functions

    from gpo_fast.models.sd3 import INT8_CAST_LOGGER, INT8_CAST_MESSAGE, say_int8_cast_once

    assert bnb_functions.logger.name == INT8_CAST_LOGGER
    assert INT8_CAST_MESSAGE in Path(bnb_functions.__file__).read_text()
    say_int8_cast_once()
    say_int8_cast_once()  # a second model in the same process adds no second filter
    logger = logging.getLogger(INT8_CAST_LOGGER)
    with caplog.at_level(logging.WARNING, logger=INT8_CAST_LOGGER):
        for _ in range(3):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        logger.warning("something else")
    said = [r.getMessage() for r in caplog.records if r.name == INT8_CAST_LOGGER]
    assert said == ["MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
                    "something else"]


def _sd3_run_config(tiny_sd3, out, *extra):
    from gpo_fast.config import load_config

    return load_config(preset="sd35m-counting", overrides=[
        f'model.path="{tiny_sd3}"', f"model.resolution={IMAGE_SIZE}", 'model.t5="full"', f'out="{out}"',
        'reward.detector="yolo11n.yaml"', "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2",
        "rollout.batch_size=4", "train.inner_updates=2", "train.lr=0.01", "train.micro_batch=4",
        'train.optimizer="adamw"', "eval.samples=10", "eval.steps=2", 'log.report_to=["none"]', *extra])


@pytest.mark.slow
def test_a_crashed_sd3_run_resumes_to_the_uninterrupted_result(tiny_sd3, tmp_path, monkeypatch):
    """The SD3.5 preset's loop on the tiny SD3 (T5 on, the warm-up schedule, the final weights kept) dies
    after its second checkpoint; resumed from it, the run ends with the uninterrupted run's adapter and metrics,
    bit for bit on the CPU."""
    import json

    import gpo_fast.train as train_module
    from safetensors.torch import load_file

    from gpo_fast import components
    from gpo_fast.checkpoint import list_checkpoints
    from gpo_fast.train import train

    monkeypatch.setattr(components, "build_reward", lambda config, device: BrightnessReward())
    extra = ["train.rollouts=3", "train.checkpoint_every=1", "eval.every=0", "train.warmup_updates=6"]
    full = train(_sd3_run_config(tiny_sd3, tmp_path / "full", *extra), log=lambda *a: None).summary
    real, calls = train_module.sample_and_score, []

    def dies_in_the_third_rollout(run):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(run)

    monkeypatch.setattr(train_module, "sample_and_score", dies_in_the_third_rollout)
    with pytest.raises(RuntimeError, match="killed"):
        train(_sd3_run_config(tiny_sd3, tmp_path / "crashed", *extra), log=lambda *a: None)
    monkeypatch.setattr(train_module, "sample_and_score", real)
    checkpoint = list_checkpoints(tmp_path / "crashed")[-1]
    assert checkpoint.name == "rollout-000002"
    resumed = train(_sd3_run_config(tiny_sd3, tmp_path / "crashed", *extra), log=lambda *a: None,
                    resume=checkpoint).summary

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "step_seconds"}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a = load_file(str(tmp_path / "full" / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    assert len(rows("full")) == 3 and rows("crashed") == rows("full")
    assert [r["lr"] for r in rows("full")][0] < [r["lr"] for r in rows("full")][-1]  # still warming up
    for key in ("accuracy_after", "best_rollout", "flops"):
        assert resumed[key] == full[key], key


@pytest.mark.slow
def test_a_full_fine_tune_of_sd3_saves_the_transformer_that_eval_and_sample_load(tiny_sd3, tmp_path, monkeypatch):
    """lora.enabled = false on the tiny SD3: the run saves the whole transformer (diffusers' format), and
    `gpo-fast eval --adapter RUN` and `gpo-fast sample --adapter RUN` load it: the tuned images are the trained
    model's, not the base's."""
    import json

    from typer.testing import CliRunner

    from gpo_fast import cli, components
    from gpo_fast.evaluate import load_tuned
    from gpo_fast.train import train

    monkeypatch.setattr(components, "build_reward", lambda config, device: BrightnessReward())
    run = tmp_path / "run"
    result = train(_sd3_run_config(tiny_sd3, run, "lora.enabled=false", "train.rollouts=1", "eval.every=0",
                                   'model.dtype="float32"'), log=lambda *a: None)
    assert (run / "model" / "config.json").is_file() and not (run / "adapter").exists()
    fresh = SD3Model.from_pretrained(str(tiny_sd3), resolution=IMAGE_SIZE, t5="full")
    base = {k: v.clone() for k, v in fresh.transformer.state_dict().items()}
    assert load_tuned(fresh, run).startswith("transformer")
    trained = result.model.transformer.state_dict()
    assert all(torch.equal(fresh.transformer.state_dict()[k], trained[k]) for k in base)
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the run changed the weights

    monkeypatch.undo()  # the CLI below builds the run's own reward (YOLO from its yaml)
    runner = CliRunner()
    res = runner.invoke(cli.app, ["eval", str(run / "config.toml"), "--adapter", str(run), "--out",
                                  str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["loaded"].startswith("transformer")
    assert report["tuned"]["image_stats"] != report["base"]["image_stats"]
    pictures = {}
    for name, extra in (("base", []), ("tuned", ["--adapter", str(run)])):
        res = runner.invoke(cli.app, ["sample", str(run / "config.toml"), "--prompt", PROMPT, "--n", "1",
                                      "--steps", "2", "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
        (png,) = (tmp_path / name).glob("*.png")
        pictures[name] = png.read_bytes()
    assert pictures["base"] != pictures["tuned"]
