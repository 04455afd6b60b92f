"""The toy world: data, reward, model, pretraining and the shipped base (docs/toy-world.md)."""

import hashlib
import json

import pytest
import torch

from gpo_fast.toy.evaluate import evaluate_toy
from gpo_fast.toy.model import SHIPPED, ToyModel
from gpo_fast.toy.reward import DotCountReward, count_dots
from gpo_fast.toy.data import MAX_DOTS, count_in_prompt, render_dots
from gpo_fast.toy.pretrain import PretrainConfig, caption_posterior, noisy_captions, pretrain


def test_rendered_dots_are_counted_exactly():
    counts = torch.tensor([0, 1, 2, 3, 4, 5] * 100)
    images = render_dots(counts, torch.Generator().manual_seed(0))
    assert set(images.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(count_dots(images), counts)
    assert torch.equal((images > 0).sum(dim=(1, 2, 3)), counts * 9)  # 3x3 dots, none overlapping


@pytest.mark.parametrize("prompt, n", [("one dot", 1), ("three dots", 3), ("5 dots", 5), (" Two Dots ", 2)])
def test_count_in_prompt(prompt, n):
    assert count_in_prompt(prompt) == n


def test_a_prompt_without_a_count_is_named_in_the_error():
    with pytest.raises(ValueError, match="'a cat'"):
        count_in_prompt("a cat")


def test_reward_strict_lenient_and_partial():
    images = torch.full((2, 1, 16, 16), -1.0)
    images[:, 0, 1:4, 1:4] = 1.0  # two 3x3 dots
    images[:, 0, 8:11, 8:11] = 1.0
    images[1, 0, 14, 1] = 1.0  # and, in the second image, a one-pixel speck
    images[0, 0, 4, 4] = 1.0  # diagonal contact joins a pixel to the first dot (8-connectivity)
    assert count_dots(images).tolist() == [2, 3]
    assert count_dots(images, min_size=5).tolist() == [2, 2]
    assert DotCountReward().measure(images, ["two dots", "2 dots"]).reward.tolist() == [1.0, 0.0]
    assert DotCountReward(min_size=5).measure(images, ["two dots", "2 dots"]).reward.tolist() == [1.0, 1.0]
    partial = DotCountReward(partial_credit=True).measure(images, ["four dots", "two dots"]).reward
    assert partial.tolist() == pytest.approx([0.5, 0.5])  # 1 - |2 - 4| / 4 and 1 - |3 - 2| / 2


def test_noisy_captions_rate_range_and_dropout():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, MAX_DOTS + 1, (20000,), generator=g)
    rows = noisy_captions(counts, noise=0.5, dropout=0.1, generator=g)
    assert (rows == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    from gpo_fast.toy.data import PROMPTS

    kept = rows != 0
    said = torch.tensor([count_in_prompt(PROMPTS[r]) for r in rows[kept].tolist()])
    wrong = said != counts[kept]
    assert wrong.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert ((said - counts[kept]).abs()[wrong] == 1).all()
    assert said.min() >= 1 and said.max() <= MAX_DOTS


@pytest.mark.parametrize("noise", [0.5, 0.2])
def test_caption_posterior_matches_the_captions_drawn(noise):
    """The analytic P(count | caption) is what noisy_captions draws: 60k captions of uniform counts, every cell."""
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(1, MAX_DOTS + 1, (60000,), generator=g)
    rows = noisy_captions(counts, noise=noise, dropout=0.0, generator=g)
    from gpo_fast.toy.data import PROMPTS

    said = torch.tensor([count_in_prompt(PROMPTS[r]) for r in rows.tolist()])
    drawn = torch.zeros(MAX_DOTS, MAX_DOTS, dtype=torch.float64)
    drawn.index_put_((said - 1, counts - 1), torch.ones(len(said), dtype=torch.float64), accumulate=True)
    drawn /= drawn.sum(dim=1, keepdim=True)
    expected = caption_posterior(noise)
    assert torch.allclose(expected.sum(dim=1), torch.ones(MAX_DOTS, dtype=torch.float64))
    assert (drawn - expected).abs().max().item() < 0.02
    if noise == 0.5:  # the shipped model's: the end captions are right 2/3 of the time, "two" and "four" 2/5
        assert expected.diagonal().tolist() == pytest.approx([2 / 3, 0.4, 0.5, 0.4, 2 / 3])


def test_pretrain_is_deterministic_for_a_seed():
    a, la = pretrain(PretrainConfig(steps=2, batch_size=8, seed=3))
    b, lb = pretrain(PretrainConfig(steps=2, batch_size=8, seed=3))
    c, _ = pretrain(PretrainConfig(steps=2, batch_size=8, seed=4))
    assert la == lb
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_load_round_trip(tmp_path):
    model = ToyModel()
    model.save_pretrained(tmp_path)
    loaded = ToyModel.from_pretrained(tmp_path)
    x = torch.randn(3, 1, 16, 16)
    emb = model.encode_prompts(["one dot", "", "4 dots"])
    torch.testing.assert_close(loaded.predict(x, torch.tensor(0.5), loaded.encode_prompts(["one dot", "", "4 dots"])),
                               model.predict(x, torch.tensor(0.5), emb), rtol=0, atol=0)


def test_missing_model_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpo-fast toy pretrain"):
        ToyModel.from_pretrained(tmp_path / "nope")


def test_unknown_prompt_is_rejected_by_the_toy_model():
    with pytest.raises(ValueError, match="'six dots'"):
        ToyModel().encode_prompts(["six dots"])


@pytest.mark.slow
def test_shipped_base_model_matches_its_manifest_and_draws_clean_dots():
    meta = json.loads((SHIPPED / "model.json").read_text())
    assert hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest() == meta["sha256"]
    model = ToyModel.from_pretrained()
    metrics, images = evaluate_toy(model, n_samples=200, seed=meta["eval"]["n_samples"] + 7)
    # the regime of toy-world.md: clean dots, counts often wrong
    assert abs(metrics["accuracy"] - meta["eval"]["accuracy"]) < 0.15
    assert 0.2 < metrics["accuracy"] < 0.7
    assert metrics["accuracy_lenient"] - metrics["accuracy"] < 0.1  # few specks to filter
    for n, row in metrics["counts_per_n"].items():  # what is drawn per count asked: its diagonal is accuracy
        assert len(row) == 7 and abs(sum(row) - 1) < 1e-6
        assert row[n] == pytest.approx(metrics["accuracy_per_n"][n])
    # 40 samples per count: the blank column's mean is the blank fraction
    assert sum(r[0] for r in metrics["counts_per_n"].values()) / 5 == pytest.approx(metrics["blank_fraction"])


def test_counts_per_n_is_the_confusion_of_asked_and_drawn_counts_with_an_overflow_bucket():
    from gpo_fast.toy.evaluate import counts_per_n

    table = counts_per_n(torch.tensor([0, 1, 1, 2, 3, 9, 5, 5]), torch.tensor([1, 1, 1, 2, 2, 2, 5, 5]))
    assert table[1] == pytest.approx([1 / 3, 2 / 3, 0, 0, 0, 0, 0])
    assert table[2] == pytest.approx([0, 0, 1 / 3, 1 / 3, 0, 0, 1 / 3])  # 9 components: the 6+ bucket
    assert table[5][5] == 1.0 and table[3] == [0.0] * 7  # a count never asked: an empty row


def test_an_adapter_with_alpha_not_rank_loads_at_full_strength_where_alpha_is_ignored(tmp_path):
    """alpha / rank is folded into lora_B: a loader that applies B @ A at scale 1 (ComfyUI without `.alpha`
    tensors, diffusers issue #9134) adds what the trained adapter adds; diffusers still loads the same policy."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = ToyModel.from_pretrained()
    model.add_lora(4, 12.0, ["to_q", "to_v", "add_k_proj"])  # scale 3
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_adapter(tmp_path)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert not any(k.endswith(".alpha") for k in saved)
    assert metadata["transformer.lora_alpha"] == metadata["transformer.r"] == 4  # alpha / rank = 1: folded
    layers = [(n, m) for n, m in model.transformer.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) > 3
    for name, layer in layers:
        trained = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        at_scale_one = saved[f"transformer.{name}.lora_B.weight"] @ saved[f"transformer.{name}.lora_A.weight"]
        assert layer.scaling["default"] == 3.0
        torch.testing.assert_close(at_scale_one, trained.detach(), rtol=1e-6, atol=1e-7)
    fresh = ToyModel.from_pretrained()
    fresh.load_adapter(tmp_path)
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor(0.7)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x, sigma, fresh.encode_prompts(["two dots", "4 dots"])),
                                   model.predict(x, sigma, model.encode_prompts(["two dots", "4 dots"])),
                                   rtol=1e-5, atol=1e-6)


def test_adapter_saved_in_diffusers_format_loads_back_to_the_same_policy(tmp_path):
    torch.manual_seed(0)
    lora = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    model = ToyModel.from_pretrained()
    model.add_lora(4, 4.0, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_adapter(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = ToyModel.from_pretrained()
    fresh.load_adapter(tmp_path)
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor(0.7)
    with torch.no_grad():
        expected = model.predict(x, sigma, model.encode_prompts(["two dots", "4 dots"]))
        got = fresh.predict(x, sigma, fresh.encode_prompts(["two dots", "4 dots"]))
        base = ToyModel.from_pretrained().predict(x, sigma, fresh.encode_prompts(["two dots", "4 dots"]))
    assert not torch.allclose(expected, base)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
