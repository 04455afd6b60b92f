"""Object-counting reward: detect with an ultralytics YOLO model and compare the count with the prompt's n.

count = number of detections of the prompt's class with confidence >= conf
reward = 1 if count == n else 0; with partial credit, max(0, 1 - |count - n| / n). correct = (count == n).
The prompt's class maps to the detector's own class names through gpo_fast.language (exact name,
singular/plural, synonyms, and the phrases prompts use for COCO classes: 'computer mice' is COCO's
'mouse'). A detector whose names are ultralytics' defaults '0'..'79' (a model built from a
.yaml) is taken to be in COCO order. An image the detector fails on gets reward NaN and correct False.

`detector` is a weights file (.pt), a model .yaml (random init: for tests), or a name ultralytics knows
('yolo11n.pt', downloaded into the working directory where there is network). A YOLO .pt is a pickle: it
runs code when loaded, so use weights from a trusted source only.

Offline: before ultralytics is imported, `configure_ultralytics()` sets (unless already set)
YOLO_AUTOINSTALL=0 (never pip-install at run time), YOLO_OFFLINE=1 (unless GPO_FAST_ONLINE is set: it skips
the DNS probe at import and the telemetry, and makes a failed download fail at once instead of retrying for
35 s; a download is still tried once, so named weights still download where there is network) and
YOLO_CONFIG_DIR=~/.cache/gpo-fast/ultralytics, and copies matplotlib's DejaVuSans.ttf there as Arial.ttf and
Arial.Unicode.ttf (ultralytics otherwise downloads Arial the first time it draws a label).

ultralytics takes numpy images as BGR uint8 (H, W, 3), as OpenCV does; images are converted accordingly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
import torch

from gpo_fast.errors import InputError
from gpo_fast.language import COCO_CLASSES, Prompt, canonical, singular
from gpo_fast.rewards.base import RewardEngineError, RewardResult, check_batch, to_uint8_rgb


def configure_ultralytics() -> Path:
    """Offline-safe ultralytics settings (see the module docstring); returns the config dir. Idempotent."""
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    if not os.environ.get("GPO_FAST_ONLINE"):
        os.environ.setdefault("YOLO_OFFLINE", "1")
    if "YOLO_CONFIG_DIR" not in os.environ:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpo-fast" / "ultralytics"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home: a private temp dir
            cache = Path(tempfile.gettempdir()) / f"gpo-fast-ultralytics-{os.getuid()}"
        os.environ["YOLO_CONFIG_DIR"] = str(cache)
    fonts = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser() / "Ultralytics"  # ultralytics' USER_CONFIG_DIR
    try:
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        fonts.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (fonts / name).exists():
                shutil.copyfile(src, fonts / name)
    except OSError:
        pass  # only label drawing needs the font; predictions do not
    return fonts


def detector_class_ids(cls: str, names: dict[int, str]) -> set[int]:
    """Ids of the detector classes a prompt class means: same name (singular form), else same canonical class."""
    want = singular(cls)
    ids = {i for i, nm in names.items() if singular(nm) == want}
    if not ids:
        want = canonical(cls)
        ids = {i for i, nm in names.items() if want is not None and canonical(nm) == want}
    if not ids:
        shown = ", ".join(list(names.values())[:20]) + (", ..." if len(names) > 20 else "")
        raise InputError(
            f"class {cls!r} is not one of the detector's classes ({shown}); use a prompt set made for this "
            f"detector's classes or a detector that has {cls!r}")
    return ids


def count_reward(det_classes: list[int], det_confs: list[float], names: dict[int, str], prompt: Prompt,
                 conf_threshold: float, partial_credit: bool) -> tuple[float, int]:
    """(reward, count) for one image's detections (class ids and confidences)."""
    if prompt.cls is None or prompt.n is None:
        raise InputError(f"prompt {prompt.text!r} has no class or no n; counting prompts need both")
    ids = detector_class_ids(prompt.cls, names)
    count = sum(1 for c, p in zip(det_classes, det_confs) if int(c) in ids and p >= conf_threshold)
    if partial_credit:
        return max(0.0, 1.0 - abs(count - prompt.n) / prompt.n), count
    return float(count == prompt.n), count


def _is_default_names(names: dict[int, str]) -> bool:
    """ultralytics names a model built from a .yaml '0', '1', ...: no real names."""
    return all(str(nm) == str(i) for i, nm in names.items())


class YoloCountReward:
    """Counts objects with a YOLO detector; the model loads on first use."""

    def __init__(self, detector: str = "yolo11n.pt", conf: float = 0.25, partial_credit: bool = False,
                 device: str | None = None, batch_size: int = 16):
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1]; got {conf}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.detector = str(detector)
        self.conf = conf
        self.partial_credit = partial_credit
        self.device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self._model = None
        self.names: dict[int, str] = {}

    def _missing(self, why: str) -> RewardEngineError:
        where = Path(self.detector).expanduser().resolve()
        return RewardEngineError(
            f"YOLO weights {self.detector!r} are not on this machine and {why}; put the file at {where} or pass "
            f"--set reward.detector=/path/to/yolo11n.pt")

    def load(self):
        """Load the detector now (measure does it on first use); RewardEngineError when it cannot be."""
        if self._model is not None:
            return self._model
        configure_ultralytics()
        from ultralytics import YOLO
        from ultralytics.utils import SETTINGS
        from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

        path = Path(self.detector).expanduser()
        is_weights = path.suffix not in (".yaml", ".yml")
        known = path.name == self.detector and (path.name in GITHUB_ASSETS_NAMES
                                                or (Path(SETTINGS["weights_dir"]) / path.name).exists())
        if is_weights and not path.exists() and not known:  # ultralytics would ask GitHub about it: fail here
            raise self._missing("ultralytics does not know that name, so it cannot download it")
        try:
            model = YOLO(str(path) if path.exists() else self.detector)
        except Exception as e:  # noqa: BLE001 - a failed download (offline) or an unreadable file
            if is_weights and not path.exists():
                raise self._missing(f"could not be downloaded ({type(e).__name__})") from e
            raise RewardEngineError(f"cannot load YOLO model {self.detector!r} ({type(e).__name__}: {e}); check "
                                    f"the file or pass --set reward.detector=/path/to/yolo11n.pt") from e
        names = dict(model.names)
        if _is_default_names(names) and len(names) == len(COCO_CLASSES):
            names = dict(enumerate(COCO_CLASSES))  # an 80-class model without names: COCO layout
        self.names = names
        self._model = model
        return model

    def _detect(self, batch) -> list[tuple[list[int], list[float]]]:
        """(class ids, confidences) per image of a list of BGR uint8 arrays."""
        results = self._model.predict(batch, conf=self.conf, device=self.device, verbose=False)
        return [(r.boxes.cls.int().tolist(), r.boxes.conf.float().tolist()) for r in results]

    def measure(self, images: torch.Tensor, prompts: list[Prompt]) -> RewardResult:
        check_batch(images, prompts)
        for p in prompts:
            if p.cls is None or p.n is None:
                raise InputError(f"prompt {p.text!r} has no class or no n; counting prompts need both")
        self.load()  # engine errors (missing weights) raise here, before any image is scored
        for cls in {p.cls for p in prompts}:
            detector_class_ids(cls, self.names)  # a class the detector lacks is wrong input: raise now
        bgr = [im[..., ::-1].copy() for im in to_uint8_rgb(images)]  # ultralytics expects BGR numpy
        dets: list = []
        for i in range(0, len(bgr), self.batch_size):
            chunk = bgr[i : i + self.batch_size]
            try:
                dets += self._detect(chunk)
            except torch.cuda.OutOfMemoryError:
                raise  # never a reward: the loop draws the rollout again at a smaller batch
            except Exception:  # noqa: BLE001 - retry one by one so one bad image only costs itself
                for im in chunk:
                    try:
                        dets += self._detect([im])
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        dets.append(e)
        rewards, correct, details = [], [], []
        for d, p in zip(dets, prompts):
            if isinstance(d, Exception):
                rewards.append(float("nan"))
                correct.append(False)
                details.append({"class": p.cls, "n": p.n, "error": f"{type(d).__name__}: {d}"})
                continue
            r, count = count_reward(d[0], d[1], self.names, p, self.conf, self.partial_credit)
            rewards.append(r)
            correct.append(count == p.n)
            details.append({"class": p.cls, "n": p.n, "count": count})
        return RewardResult(torch.tensor(rewards, dtype=torch.float32), torch.tensor(correct, dtype=torch.bool),
                            details)
