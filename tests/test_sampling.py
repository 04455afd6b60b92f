"""Sampling (gpo_fast.sampling): the Euler ODE with guidance, seeded; group rollouts; batching and given
noise change nothing."""

import pytest
import torch

from gpo_fast.sampling import rollout, sample
from gpo_fast.toy.model import ToyModel


def test_sampling_is_seeded_and_guidance_changes_it():
    model = ToyModel()
    prompts = ["one dot", "three dots"]
    a = sample(model, prompts, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, prompts, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    c = sample(model, prompts, steps=3, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rollout_groups_are_contiguous_with_their_own_noise():
    model = ToyModel()
    per_sample, latents, images = rollout(model, ["one dot", "two dots"], 3, steps=2, cfg_scale=2.0,
                                          generator=torch.Generator().manual_seed(0))
    assert per_sample == ["one dot"] * 3 + ["two dots"] * 3
    assert latents.shape == (6, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert not torch.equal(latents[0], latents[1])


def test_batches_and_given_noise_draw_the_same_images():
    torch.manual_seed(0)
    model = ToyModel()
    prompts = ["one dot", "two dots", "three dots", "four dots", "five dots"]
    whole = sample(model, prompts, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    split = sample(model, prompts, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), batch_size=2)
    noise = torch.randn((5, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    given = sample(model, prompts, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(99), noise=noise)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(given, whole)


def test_one_euler_step_without_guidance_is_x_minus_v():
    torch.manual_seed(0)
    model = ToyModel()
    noise = torch.randn((2, *model.latent_shape))
    out = sample(model, ["one dot", "two dots"], steps=1, cfg_scale=1.0, generator=None, noise=noise)
    with torch.no_grad():
        v = model.predict(noise, torch.tensor(1.0), model.encode_prompts(["one dot", "two dots"]))
    torch.testing.assert_close(out, noise - v)  # sigma goes 1 -> 0 in one step


def test_zero_steps_are_refused():
    with pytest.raises(ValueError, match="steps"):
        sample(ToyModel(), ["one dot"], steps=0, cfg_scale=1.0, generator=torch.Generator())
