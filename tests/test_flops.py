"""What a run computes (gpo_fast.flops): the unit FLOPs of the run's own model, and the loop's count of them in
metrics.jsonl and summary.json."""

import json

import pytest
import torch

from gpo_fast.config import load_config
from gpo_fast.flops import UnitFlops, measure_unit_flops
from gpo_fast.toy.model import ToyModel
from gpo_fast.train import train

LORA = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _model(lora: bool, checkpointing: bool = False) -> ToyModel:
    torch.manual_seed(0)
    model = ToyModel()
    if lora:
        model.add_lora(8, 8.0, LORA)
    else:
        model.enable_full_finetune()
    if checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model


def test_a_training_pass_costs_what_its_backward_must_compute():
    """A backward computes the gradient of each layer's input (one forward's matmuls) and, for trained weights, of
    the weights (another): about 3 forwards when every weight trains, 2 with a LoRA (the frozen base needs no
    weight gradient), and with gradient checkpointing the blocks' forward once more (the recompute: nearly a whole
    forward, the embeddings and the output layer are not checkpointed)."""
    full = measure_unit_flops(_model(lora=False), "three dots")
    lora = measure_unit_flops(_model(lora=True), "three dots")
    recompute = measure_unit_flops(_model(lora=True, checkpointing=True), "three dots")
    assert full.forward > 0 and full.decode == 0  # the toy's latents are its images
    assert lora.forward > full.forward  # the adapter's own matmuls
    assert 2.9 < full.train_pass / full.forward < 3.1
    assert 2.0 <= lora.train_pass / lora.forward < 2.3
    assert 0.95 * lora.forward < recompute.train_pass - lora.train_pass <= lora.forward


def test_measuring_leaves_no_gradient_and_the_mode_as_it_was():
    model = _model(lora=True)
    model.eval()
    measure_unit_flops(model, "two dots")
    assert not model.training and all(p.grad is None for p in model.trainable_parameters())


@pytest.mark.slow
def test_a_run_counts_its_rollouts_updates_and_evaluations(tmp_path):
    """Two rollouts of 2 x 4 images, 2 steps with guidance; updates that cut groups (micro-batch 2 of groups of 4:
    every sample through two forwards and one training pass); validation every rollout."""
    cfg = load_config(overrides=[f'out="{tmp_path / "run"}"', "train.rollouts=2", "train.inner_updates=3",
                                 "rollout.prompts=2", "rollout.group_size=4", "rollout.steps=2", "rollout.cfg_scale=2",
                                 "train.micro_batch=2", "eval.samples=20", "eval.steps=3", "eval.cfg_scale=1",
                                 "eval.every=1", 'log.report_to=["none"]'])
    result = train(cfg, log=lambda *a: None)
    unit = UnitFlops(**result.summary["flops"]["unit"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_rollout = 8 * (2 * 2 * unit.forward + unit.decode)
    per_update = 8 * (2 * unit.forward + unit.train_pass)
    assert [r["flops_rollout"] for r in rows] == [per_rollout, 2 * per_rollout]
    assert [r["flops_update"] for r in rows] == [3 * per_update, 6 * per_update]
    assert [r["flops"] for r in rows] == [r["flops_rollout"] + r["flops_update"] for r in rows]
    per_eval = 20 * 3 * unit.forward  # no guidance in the evaluations: one forward per step
    guided = 2 * per_eval  # and the base once with guidance (eval.base_cfg_scale): two forwards per step
    # before (twice), the base's validation, ...
    assert [r["flops_eval"] for r in rows] == [3 * per_eval + guided, 4 * per_eval + guided]
    flops = result.summary["flops"]
    assert flops["eval"] == 5 * per_eval + guided and flops["train"] == rows[-1]["flops"]  # ... and after
    kept = result.summary["best_rollout"]
    assert flops["train_to_kept"] == ([0] + [r["flops"] for r in rows])[kept]
    assert unit == measure_unit_flops(result.model, "one dot")  # the run's own model, as configured


def test_bitsandbytes_quantized_matmuls_are_counted():
    """model.quantize: bitsandbytes' 4-bit layers multiply through its own op (gemm_4bit), which torch's table
    does not know; counted, an nf4 layer costs what the float layer it replaces costs."""
    import bitsandbytes as bnb

    from gpo_fast.flops import flop_counter

    dense = torch.nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.support_avx512bf16_for_cpu = False  # the portable path, as the GPU takes (tests/test_sd3.py, _quantize_nf4)
    q = q.to("cpu")
    x = torch.randn(3, 5, 64)
    counts = []
    for layer in (dense, q):
        with torch.no_grad(), flop_counter() as counter:
            layer(x)
        counts.append(counter.get_total_flops())
    assert counts == [2 * 15 * 64 * 32] * 2
