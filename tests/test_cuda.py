"""The paths that only run on a CUDA GPU, each on a small SD3 built in code (benchmarks/gpu_check.sh runs them with
`pytest -m cuda`; elsewhere they are skipped): nf4 and int8 bases loaded through SD3Model.from_pretrained and
training a LoRA, T5 in 8 bits, xformers attention against SDPA, and the planned update peak against the CUDA
allocator's. Read against the installed libraries: diffusers' BitsAndBytesConfig replaces every nn.Linear with
bitsandbytes' Linear4bit / Linear8bitLt (diffusers/quantizers/bitsandbytes/utils.py), transformers keeps T5's `wo`
in float32 (T5 _keep_in_fp32_modules)."""

import math

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = "a photo of three cats"
SIZE = 64  # px: 32 x 32 latents, 256 tokens of 2 x 2 patches


@pytest.fixture(scope="module")
def small_sd3(tmp_path_factory):
    """Widths that bitsandbytes' kernels take without special cases (multiples of 64), T5 beside CLIP."""
    from diffusers import SD3Transformer2DModel

    from gpo_fast.models.testing import build_tiny_sd3

    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
        pos_embed_max_size=SIZE // 2)
    return build_tiny_sd3(tmp_path_factory.mktemp("small_sd3"), transformer=transformer)


def _config(folder, *extra):
    from gpo_fast.config import load_config

    return load_config(preset="sd35m-counting", overrides=[
        f'model.path="{folder}"', f"model.resolution={SIZE}", "rollout.group_size=4", "rollout.prompts=1",
        "rollout.steps=4", "train.micro_batch=4", "lora.rank=8", *extra])


def _update(model, config):
    """One GPO update under the trainer's bf16 autocast; the loss and the LoRA's gradients."""
    from gpo_fast.update import gpo_update

    x0 = torch.randn((4, *model.latent_shape), generator=torch.Generator().manual_seed(0)).cuda()
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stats = gpo_update(model, x0, [PROMPT] * 4, torch.arange(4.0).cuda(), config,
                           torch.Generator().manual_seed(1))
    return stats["loss"], [p.grad for p in model.trainable_parameters()]


@pytest.mark.parametrize("quantize, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_a_quantized_base_loads_through_from_pretrained_and_trains_only_a_lora(quantize, layer, small_sd3):
    import bitsandbytes as bnb

    from gpo_fast.components import build_model

    config = _config(small_sd3, f'model.quantize="{quantize}"', 'model.t5="full"')
    model = build_model(config, torch.device("cuda"), prompts=[PROMPT])
    quantized = [m for m in model.transformer.modules() if isinstance(m, getattr(bnb.nn, layer))]
    assert len(quantized) > 20 and all(m.weight.device.type == "cuda" for m in quantized)
    frozen = [m.weight.data.clone() for m in quantized]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    loss, grads = _update(model, config)
    assert math.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    moved = [n for n, g in zip(names, grads) if g.abs().max() > 0]
    # lora_B starts at zero, so A's gradients are zero at first; every B has one but the last block's add_q_proj
    # (its context output is dropped: context_pre_only); 14 of 30 on the CPU with float32 weights
    assert all("lora_B" in n for n in moved) and len(moved) >= len(names) // 2 - 1
    assert all(torch.equal(m.weight.data, w) for m, w in zip(quantized, frozen))  # the base stays as loaded


def test_t5_in_8_bits_encodes_close_to_t5_in_bf16(small_sd3):
    import bitsandbytes as bnb

    from gpo_fast.models.sd3 import SD3Model

    prompts = [PROMPT, "a sign that reads open"]
    full = SD3Model.from_pretrained(str(small_sd3), resolution=SIZE, device="cuda", t5="full").encode_prompts(prompts)
    model = SD3Model.from_pretrained(str(small_sd3), resolution=SIZE, device="cuda", t5="8bit")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model._pipe.text_encoder_3.modules())
    eight = model.encode_prompts(prompts)
    t5_full, t5_eight = full.hidden[:, 77:].float(), eight.hidden[:, 77:].float()  # CLIP's 77 tokens, then T5's
    assert t5_full.abs().max() > 0.1
    cosine = torch.nn.functional.cosine_similarity(t5_full.flatten(), t5_eight.flatten(), dim=0).item()
    assert cosine > 0.99, cosine
    assert torch.equal(full.hidden[:, :77], eight.hidden[:, :77])  # CLIP's part does not change


def test_xformers_attention_predicts_what_sdpa_predicts(small_sd3):
    pytest.importorskip("xformers")
    from gpo_fast.models.sd3 import SD3Model

    predictions = []
    for attention in ("sdpa", "xformers"):
        model = SD3Model.from_pretrained(str(small_sd3), resolution=SIZE, device="cuda", t5="off",
                                         attention=attention).eval()
        x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            predictions.append(model.predict(x, torch.tensor([0.7, 0.3]).cuda(), model.encode_prompts([PROMPT] * 2)))
    torch.testing.assert_close(predictions[1].float(), predictions[0].float(), rtol=2e-2, atol=2e-2)


def test_the_planned_update_activations_are_what_the_cuda_allocator_adds(small_sd3):
    """gpo-fast plan's update phase (fake tensors on the CPU, CUDA's autocast rules): the bytes its peak adds on
    top of the weights, the LoRA, the VAE and the gradients, against what torch.cuda.max_memory_allocated adds
    over the same update on the GPU. Measured after a first update, so that cuBLAS's workspace (inside the plan's
    0.6 GiB margin, not modelled) is already there; the plan also counts the update's inputs, which exist here
    beforehand (a few hundred KB)."""
    from gpo_fast.components import build_model
    from gpo_fast.plan import plan
    from gpo_fast.update import forward_backward, group_noise, loss_spec

    config = _config(small_sd3, 'model.t5="off"', "train.micro_batch=2")  # micro-batches below a group
    planned = plan(config, only="update").phase("update")
    model = build_model(config, torch.device("cuda"), prompts=["plan"])
    n, ro = 4, config.rollout
    x0 = torch.zeros((n, *model.latent_shape), device="cuda")
    x_s, u, s = group_noise(x0, ro.group_size, config.train, model.schedule(ro.steps), torch.Generator().manual_seed(0))
    embeds = model.encode_prompts(["plan"] * n)
    model.train()

    def update():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward_backward(model, x_s, s, u, embeds, torch.arange(float(n), device="cuda"), loss_spec(config), 2,
                             1.0, [True])
        torch.cuda.synchronize()

    update()  # the gradients (an earlier micro-batch's, as the plan traces it) and cuBLAS's workspace now exist
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    update()
    measured = torch.cuda.max_memory_allocated() - start
    expected = planned.holders["activations"]
    print(f"update activations: planned {expected / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB "
          f"({measured / expected:.3f})")
    assert 0.75 < measured / expected < 1.33
