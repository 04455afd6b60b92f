"""Experiment trackers (`log.report_to`): what metrics.jsonl holds, sent to the tools people already use.

accelerate's tracker classes do the talking (TensorBoardTracker, WandBTracker, TrackioTracker,
MLflowTracker), created and started the way `Accelerator.init_trackers` does. The loop does not build an
`Accelerator`: it owns its processes (gpo_fast.distributed), and only rank 0 builds trackers; accelerate's
`PartialState` (which its trackers and their logging consult) joins the process group already set up.

Each rollout's scalars go to every tracker at step = rollout; the resolved config once to each tracker, when
the run first logs to it; the validation grids and the final pictures as images where the tracker takes images
(an artifact for mlflow). A resumed run continues the same tracker runs (their ids are kept in trackers.json).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from gpo_fast.config import Config
from gpo_fast.errors import InputError

IDS_FILE = "trackers.json"  # the tracker runs of this run folder, for a resume


class TrackerError(InputError):
    """A tracker named in log.report_to cannot be used; the message says what to install."""


def check_trackers(config: Config) -> None:
    """Fail, before anything is written, when a tracker's package is not installed."""
    for name in config.log.trackers:
        if importlib.util.find_spec(name) is None:  # each tracker's module is named as the tracker
            extra = f'pip install "gpo-fast[{name}]"' if name != "tensorboard" else "pip install tensorboard"
            raise TrackerError(f"log.report_to names {name}, which is not installed; run {extra} or drop {name} "
                               "from log.report_to (--report-to)")


def flat_config(config: Config) -> dict:
    """The resolved config as dotted keys with values a tracker's hyperparameter table takes (str, int, float,
    bool); lists and tables as JSON, unset values left out."""
    flat = {}
    for key, value in config.model_dump().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if v is None:
                continue
            flat[key if sub is None else f"{key}.{sub}"] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    return flat


class Trackers:
    """The run's trackers (rank 0 only). `step` is the rollout."""

    def __init__(self, config: Config, out: Path, resume_step: int | None):
        """resume_step: the rollout a resumed run continues from (None: a fresh run)."""
        self.trackers = []
        if not config.log.trackers:  # log.report_to = ["none"]: nothing started, nothing written
            return
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its process state; this reads the running one
        ids_path = out / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        started = set(ids.get("trackers", []))  # the trackers this run already logged to (they have its config)
        ids.setdefault("name", f"{out.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}")
        project, values = config.log.project, flat_config(config)
        for kind in config.log.trackers:
            tracker = _make(kind, project, ids, out, values, resume_step)
            try:
                tracker.start()
            except Exception as e:  # a tracker's own settings (an account, a server, a store) are the user's to fix
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise TrackerError(f"log.report_to: {kind} could not start ({reason}); fix its settings "
                                   f"(docs/tracking.md) or drop {kind} from log.report_to (--report-to)") from e
            if kind not in started and kind != "trackio":  # trackio took the config in its init
                tracker.store_init_configuration(values)
            if kind == "wandb":
                ids["wandb"] = tracker.run.id
            elif kind == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            self.trackers.append(tracker)
        ids["trackers"] = sorted(started | set(config.log.trackers))  # ids of trackers left out now are kept
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def log(self, row: dict, step: int) -> None:
        """The finite numbers of a metrics row."""
        values = {k: v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """A picture the run wrote (a sample grid, before_after.png, reward_curve.png)."""
        import numpy as np
        from PIL import Image

        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                image = np.asarray(Image.open(path).convert("RGB"))
                tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({key: [Image.open(path).convert("RGB")]}, step=step)
            elif tracker.name == "trackio":
                import trackio

                tracker.log({key: trackio.Image(str(path))}, step=step)
            else:
                tracker.log_artifact(str(path), artifact_path=key.rpartition("/")[0] or None)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _make(kind: str, project: str, ids: dict, out: Path, values: dict, resume_step: int | None):
    """accelerate's tracker of that kind, not started; each class imported only when used (TrackioTracker is in
    accelerate from 1.9 on)."""
    import accelerate.tracking as at

    if kind == "tensorboard":  # events in RUN/tensorboard; a resume drops the events after its checkpoint
        return at.TensorBoardTracker("tensorboard", out, purge_step=(resume_step or 0) + 1)
    if kind == "wandb":
        return at.WandBTracker(project, name=ids["name"], dir=str(out), id=ids.get("wandb"), resume="allow")
    if kind == "trackio":  # accelerate's store_init_configuration updates trackio's module-level dict, not the run
        return at.TrackioTracker(project, name=ids["name"], resume="allow", config=values)
    return at.MLflowTracker(project, run_name=ids["name"], run_id=ids.get("mlflow"))
