"""The planner (gpo_fast.plan, `gpo-fast plan`): on fake tensors it finds the live bytes and FLOPs that the
same phase run on real tensors has, for a tiny and a mid-size SD3; what it sees moves with the config; every
--vram preset of SD3.5 Medium plans under its card; bad input is one sentence."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpo_fast.config import VRAM_PLANNED_PEAK_GIB, VRAM_PRESETS, load_config
from gpo_fast.models.testing import build_tiny_sd3
from gpo_fast.flops import flop_counter
from gpo_fast.plan import (CARDS, CUDA_FP32_OPS, CUDA_FP32_SET_OPT_DTYPE_OPS, GIB, Card, Plan, cuda_autocast_rules,
                           plan, trace_phase)

GPO_FAST = str(Path(sys.executable).with_name("gpo-fast"))


def _config(folder, **extra):
    sets = {"model.path": f'"{folder}"', "model.resolution": "32", "rollout.group_size": "4", "rollout.prompts": "2",
            "train.micro_batch": "4", "rollout.batch_size": "4", "model.t5": '"off"', "lora.rank": "8", **extra}
    return load_config(preset="sd35m-counting", overrides=[f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """A mid-size SD3.5-shaped transformer: 2 blocks (one dual-attention) of width 768, 12 heads, about 50 M
    parameters."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=12, joint_attention_dim=32, caption_projection_dim=768, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    assert 20e6 < sum(p.numel() for p in transformer.parameters()) < 100e6
    return build_tiny_sd3(tmp_path_factory.mktemp("mid_sd3"), transformer=transformer)


def _real_model(folder, config):
    from gpo_fast.models.sd3 import SD3Model

    model = SD3Model.from_pretrained(str(folder), resolution=config.model.resolution, t5="off", dtype=torch.bfloat16,
                                     prompts=["plan"])
    model.requires_grad_(False)
    model.add_lora(config.lora.rank, config.lora.alpha, config.lora.targets)
    model.transformer.enable_gradient_checkpointing()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("which, phases", [("tiny", ("rollout", "update")), ("mid", ("rollout", "decode", "update"))])
def test_the_fake_plan_finds_the_live_bytes_and_flops_of_the_real_run(which, phases, request):
    folder = request.getfixturevalue(which)
    config = _config(folder)
    planned = plan(config)
    real = _real_model(folder, config)
    for name in phases:
        measured = trace_phase(name, real, config)  # the same dispatch mode, on real tensors
        assert planned.phase(name).peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02), name
        assert planned.phase(name).flops == measured.flops > 0, name
        assert planned.phase(name).holders["weights"] == measured.holders["weights"]


@pytest.mark.slow
def test_what_the_plan_sees_moves_with_the_config(mid):
    """Gradient checkpointing, a smaller micro-batch and nf4 lower the update's peak; micro-batches that cut
    groups cost an extra policy forward (more FLOPs), whole groups do not."""
    base = plan(_config(mid, **{"rollout.group_size": "4", "train.micro_batch": "4"})).phase("update")
    no_checkpointing = plan(_config(mid, **{"train.gradient_checkpointing": "false"})).phase("update")
    cutting = plan(_config(mid, **{"train.micro_batch": "2"})).phase("update")
    wider = plan(_config(mid, **{"train.micro_batch": "6"})).phase("update")  # cuts groups too, 6 at a time
    nf4 = plan(_config(mid, **{"model.quantize": '"nf4"'})).phase("update")
    assert no_checkpointing.holders["activations"] > base.holders["activations"]
    assert cutting.holders["activations"] < base.holders["activations"]
    assert cutting.flops > base.flops  # the policy errors of every sample first
    assert wider.flops == cutting.flops and wider.holders["activations"] > base.holders["activations"]
    assert nf4.holders["weights"] < 0.4 * base.holders["weights"]


def test_the_plan_counts_the_rollouts_latents_and_the_decoded_batch(tiny):
    """What a rollout keeps on the GPU: the final latents of all its images (the updates train on them) while a
    batch is drawn or decoded, and the decoded batch's images until they are copied off; decoding is planned per
    batch, so its FLOPs do not change with the batch size."""
    one, four = (plan(_config(tiny, **{"rollout.batch_size": b}), only="decode").phase("decode") for b in ("1", "4"))
    n, latent = 8, 16 * 16 * 16 * 4  # 2 prompts x 4 images; 16 channels at 16 x 16, float32
    assert one.holders["latents"] == four.holders["latents"] == n * latent  # kept ones and the batch's
    image = 3 * 32 * 32 * 4  # one decoded image, float32
    assert four.holders["activations"] - one.holders["activations"] >= 3 * image  # three more images alive
    assert one.flops == four.flops > 0
    rollout = plan(_config(tiny, **{"rollout.batch_size": "2"}), only="rollout").phase("rollout")
    assert rollout.holders["latents"] >= (n - 2) * latent  # the earlier batches' latents, beside the step's own


def test_live_bytes_counts_blocks_births_and_deaths():
    from gpo_fast.plan import LiveBytes

    live = LiveBytes()
    with live:
        a = torch.empty(1024)  # 4096 B
        b = torch.empty(100)  # 400 B -> one 512 B block
        view = a[:10]  # a view allocates nothing
        del a
        after_free = live.now  # the view keeps a's storage alive
        del view
        c = torch.empty(2048)  # 8192 B
    assert after_free == 4096 + 512 and live.peak == 512 + 8192 and live.now == 512 + 8192
    assert live.by_kind() == {"activations": 512 + 8192} and b.numel() == 100 and c.numel() == 2048


@pytest.mark.slow
def test_a_broken_model_folder_is_one_sentence(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{not json")
    (tmp_path / "vae" / "config.json").write_text("{}")
    out = _cli("--set", f'model.path="{tmp_path}"')
    assert out.returncode == 2 and "not valid JSON" in out.stderr and "Traceback" not in out.stderr


def test_attention_on_the_cpu_is_counted():
    q = torch.randn(2, 3, 50, 16)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 4 * 2 * 3 * 50 * 50 * 16  # QK^T and AV: 2 matmuls of 2 * L^2 * d


def test_the_trace_follows_cudas_autocast_rules_while_open_only():
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
        assert torch.nn.functional.group_norm(x, 2).dtype == torch.float32
        assert torch.nn.functional.interpolate(x, scale_factor=2.0).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == x.sum(1).dtype == x.pow(2).dtype == torch.float32
        assert torch.softmax(x, -1, dtype=torch.float16).dtype == torch.float16  # an explicit dtype stands
        assert (x @ x).dtype == torch.nn.functional.gelu(x).dtype == torch.bfloat16  # as on CUDA
        torch.nn.functional.layer_norm(x, (8,)).sum().backward()
    assert x.grad.dtype == torch.bfloat16  # the cast is on the autograd tape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16  # the CPU's own rules again


def test_the_cuda_rules_are_the_installed_torchs():
    """The op lists equal the ones in the installed torch's autocast header (when the wheel ships headers)."""
    import re

    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip(f"this torch install has no C++ headers ({header} is missing)")
    text = header.read_text()

    def listed(macro):
        body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.S).group(1)
        return tuple(".".join(x.strip() for x in m.split(",")) for m in re.findall(r"_\(([^)]*)\)", body))
    assert CUDA_FP32_OPS == listed("AT_FORALL_FP32")
    assert CUDA_FP32_SET_OPT_DTYPE_OPS == listed("AT_FORALL_FP32_SET_OPT_DTYPE")


@pytest.mark.slow
@pytest.mark.parametrize("vram", sorted(VRAM_PRESETS))
def test_every_vram_preset_of_sd35_medium_plans_under_its_card(vram):
    counting = load_config(preset="sd35m-counting", overrides=VRAM_PRESETS[vram])
    text = load_config(preset="sd35m-text", overrides=VRAM_PRESETS[vram])
    for section in ("model", "lora", "rollout", "train"):  # what the plan depends on is the same in both presets
        assert getattr(counting, section) == getattr(text, section)
    planned = plan(counting)
    budget = Plan.budget(planned, Card(f"{vram} GB", vram, 1, 1))
    over = {p.name: round(p.peak_bytes / GIB, 2) for p in planned.phases if p.peak_bytes > budget}
    assert over == {}, f"--vram {vram} plans over {budget / GIB:.2f} GiB"
    peak = planned.peak_bytes  # the table --vram auto chooses from (the text preset plans the same, above)
    assert VRAM_PLANNED_PEAK_GIB[vram] == round(peak / GIB, 2), \
        f"update VRAM_PLANNED_PEAK_GIB[{vram}] in gpo_fast/config.py to {round(peak / GIB, 2)}"
    assert planned.phase("update").flops > 0 and planned.phase("rollout").flops > planned.phase("update").flops


def _cli(*args):
    return subprocess.run([GPO_FAST, "plan", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_the_cli_prints_json_with_the_card_verdict(tiny):
    out = _cli("--set", f'model.path="{tiny}"', "--set", "model.resolution=32", "--set", 'model.t5="off"',
               "--card", "rtx3090", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got["phases"]) == {"encode", "rollout", "decode", "update"}
    assert got["peak_bytes"] == max(got["phases"].values()) and got["card"] == "rtx3090" and got["fits"] is True
    assert got["flops"]["rollout"] > 0 and got["flops"]["update"] > 0
    inner = load_config(preset="sd35m-counting").train.inner_updates
    assert got["flops"]["sampler_share"] == pytest.approx(
        got["flops"]["rollout"] / (got["flops"]["rollout"] + inner * got["flops"]["update"]))
    assert all(t["bytes"] > 0 and t["what"] for t in got["largest_temporaries"]["update"])


@pytest.mark.parametrize("args, needle", [
    (["--card", "gtx480"], "unknown card 'gtx480'"),
    (["--vram", "7"], "--vram 7 is not a preset"),
    (["--set", 'model.path="someone/not-shipped"'], "model.path"),
    (["--preset", "toy"], "SD3-family"),
])
@pytest.mark.slow
def test_bad_input_is_one_sentence_exit_2(args, needle):
    out = _cli(*args)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_text_encoder_configs_are_sd3s():
    """CLIP ViT-L/14's and OpenCLIP bigG's text towers and T5 v1.1 XXL's encoder, by their published sizes; T5 off
    leaves it out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpo_fast.plan import fake_text_encoders

    counts = {name: sum(p.numel() for p in module.parameters())
              for name, (module, _) in fake_text_encoders(load_config(preset="sd35m-text"), FakeTensorMode()).items()}
    assert counts == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5_xxl": 4_762_310_656}
    off = fake_text_encoders(load_config(preset="sd35m-text", overrides=['model.t5="off"']), FakeTensorMode())
    assert set(off) == {"clip_l", "clip_g"}


def test_the_cards_are_known():
    assert {"rtx3090", "rtx4090", "rtx5090", "a100-40", "a100-80", "l40s", "h100"} <= set(CARDS)
