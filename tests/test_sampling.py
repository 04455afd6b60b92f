"""Sampling (gpo_fast.sampling): the Euler ODE with guidance, seeded; group rollouts; batching and given
noise change nothing."""

import threading

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
    assert latents.shape == (6, 1, 16, 16)
    torch.testing.assert_close(images, model.decode(latents))  # the images are the latents decoded
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


# ------------------------------------------------------------------------------ scoring overlapped with sampling


def _toy_rollout(score, overlap, batch_size=4):
    torch.manual_seed(0)
    model = ToyModel()
    return rollout(model, ["one dot", "two dots", "three dots"], 4, steps=2, cfg_scale=2.0,
                   generator=torch.Generator().manual_seed(0), batch_size=batch_size, score=score, overlap=overlap)


def test_overlapped_scoring_gives_the_serial_results_in_order():
    from gpo_fast.language import Prompt
    from gpo_fast.toy.data import count_in_prompt
    from gpo_fast.toy.reward import DotCountReward

    reward = DotCountReward(partial_credit=True)
    seen = []

    def score(images, start):
        texts = ([t for t in ["one dot", "two dots", "three dots"] for _ in range(4)])[start:start + len(images)]
        seen.append((start, len(images), threading.current_thread().name))
        return reward.measure(images, [Prompt(text=t, task="toy", n=count_in_prompt(t)) for t in texts])

    serial = _toy_rollout(score, overlap=False)
    assert [s[:2] for s in seen] == [(0, 4), (4, 4), (8, 4)]
    assert all(not name.startswith("gpo-fast-score") for *_, name in seen)  # scored in the caller's thread
    seen.clear()
    overlapped = _toy_rollout(score, overlap=True)
    assert [s[:2] for s in seen] == [(0, 4), (4, 4), (8, 4)]
    assert all(name.startswith("gpo-fast-score") for *_, name in seen)
    assert torch.equal(serial[1], overlapped[1]) and torch.equal(serial[2], overlapped[2])
    for a, b in zip(serial[3], overlapped[3]):
        assert torch.equal(a.reward, b.reward) and torch.equal(a.correct, b.correct) and a.details == b.details
    whole = torch.cat([r.reward for r in serial[3]])
    expected = reward.measure(serial[2], [Prompt(text=t, task="toy", n=count_in_prompt(t))
                                          for t in ["one dot", "two dots", "three dots"] for _ in range(4)])
    assert torch.equal(whole, expected.reward)  # the batches' scores are the whole rollout's


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_worker_scores_on_the_models_device_and_one_side_stream():
    """On CUDA the worker thread's current device is the model's (a fresh thread's is cuda:0) and every batch of
    every rollout is scored on the same side stream of that device (one stream, made once)."""
    from gpo_fast.sampling import side_stream

    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: not cuda:0 where there are two
    model = ToyModel().to(device)
    seen = []

    def score(images, start):
        seen.append((torch.cuda.current_device(), torch.cuda.current_stream(device)))
        return torch.zeros(len(images))

    for _ in range(2):
        rollout(model, ["one dot", "two dots"], 4, steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                batch_size=4, score=score, overlap=True)
    assert len(seen) == 4 and {d for d, _ in seen} == {device.index}
    assert all(stream == side_stream(device) for _, stream in seen)
    assert side_stream(device) != torch.cuda.default_stream(device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_scored_rollout_keeps_no_decoded_image_on_the_gpu(tmp_path):
    """When batch k is scored, the GPU holds the final latents of batches 0..k and no decoded image (each batch
    is copied off the GPU and dropped there before it is scored): what gpo_fast.plan counts."""
    from gpo_fast.models.sd3 import SD3Model
    from gpo_fast.models.testing import IMAGE_SIZE, build_tiny_sd3

    model = SD3Model.from_pretrained(str(build_tiny_sd3(tmp_path)), resolution=IMAGE_SIZE, t5="off", device="cuda",
                                     dtype=torch.float32)
    prompts, batch = ["a photo of three cats", "a photo of two dogs"], 4
    held = []

    def score(images, start):
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)
        assert images.device.type == "cpu"
        return len(images)

    def draw():
        return rollout(model, prompts, 4, steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0),
                       batch_size=batch, score=score, overlap=False)

    before = torch.cuda.memory_allocated()
    draw()  # the prompts' embeddings are cached on the GPU by the first rollout
    held.clear()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _, latents, images, _ = draw()
    latent_batch = batch * latents[0].numel() * 4  # float32, a multiple of 512 B
    image_batch = batch * images[0].numel() * 4
    assert len(held) == 2 and image_batch > 16384
    for k, bytes_held in enumerate(held):
        assert bytes_held <= (k + 1) * latent_batch + 16384, (k, bytes_held, latent_batch, image_batch)


def test_the_first_batch_is_scored_while_the_sampler_draws_the_next():
    """Scoring batch 0 waits until the sampler has started batch 1: with the overlap it is drawn meanwhile;
    scored in line, the wait times out."""
    drawing = threading.Event()
    model = ToyModel()
    predict = model.predict
    calls = []

    def watched_predict(x, s, embeds):
        calls.append(x.shape[0])
        if len(calls) > 2:  # 2 steps per batch (one guided forward each): the 3rd call draws batch 1
            drawing.set()
        return predict(x, s, embeds)

    model.predict = watched_predict

    def run(overlap):
        drawing.clear()
        calls.clear()
        waited = []

        def score(images, start):
            if start == 0:
                waited.append(drawing.wait(timeout=0.5 if not overlap else 30))
            return images.mean()

        rollout(model, ["one dot", "two dots", "three dots"], 4, steps=2, cfg_scale=2.0,
                generator=torch.Generator().manual_seed(0), batch_size=4, score=score, overlap=overlap)
        return waited

    assert run(overlap=True) == [True]
    assert run(overlap=False) == [False]


def test_an_error_in_the_scorer_reaches_the_caller_and_the_worker_stops():
    def score(images, start):
        if start == 4:
            raise RuntimeError("engine broke")
        return start

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="engine broke"):
        _toy_rollout(score, overlap=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("gpo-fast-score") and t.name not in before]


def test_without_a_scorer_the_rollout_is_three_things_and_one_batch_is_not_threaded():
    assert len(_toy_rollout(None, overlap=True)) == 3
    names = []
    _toy_rollout(lambda images, start: names.append(threading.current_thread().name), overlap=True, batch_size=0)
    assert len(names) == 1 and not names[0].startswith("gpo-fast-score")


@pytest.mark.slow
def test_dpm_solver_on_the_toy_schedule_comes_closer_to_many_steps_than_euler():
    """rollout.solver = "dpm++2m": the toy's equal-step schedule (diffusers' flow sigmas with no shift start at
    0.999), and 6 second-order steps land nearer 24 Euler steps than 6 Euler steps do, on the shipped model."""
    model = ToyModel.from_pretrained().eval()
    sigmas = model.schedule(6, "dpm++2m")
    assert len(sigmas) == 7 and sigmas[0] == pytest.approx(0.999) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[:-1], torch.linspace(0.999, 0.999 / 6, 6))  # equal steps, no shift
    prompts = [f"{w} dots" for w in ("two", "three", "four", "five")] * 8
    noise = torch.randn((len(prompts), *model.latent_shape), generator=torch.Generator().manual_seed(1))

    def draw(steps, solver):
        return sample(model, prompts, steps=steps, cfg_scale=3.0, generator=torch.Generator(), noise=noise,
                      solver=solver)

    reference = draw(24, "euler")
    euler, dpm = draw(6, "euler"), draw(6, "dpm++2m")
    assert (dpm - reference).abs().mean() < 0.8 * (euler - reference).abs().mean()


def test_an_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        sample(ToyModel(), ["one dot"], steps=2, cfg_scale=1.0, generator=torch.Generator(), solver="heun")
