"""Training checkpoints: everything needed to continue a run exactly, written so a crash never costs more.

A checkpoint is a folder `run/checkpoints/rollout-NNNNNN/` holding only safetensors and JSON (never a
pickle: loading one runs no code):
    tensors.safetensors   trained weights, optimizer tensors (8-bit states included), RNG states,
                          the best snapshot's weights, the images of the "before" evaluation
    state.json            step counters, optimizer / scheduler scalars, python and numpy RNG states,
                          the best snapshot's score, the before metrics, the config
    manifest.json         sha256 of both files (written last: a folder without it is incomplete)
Written atomically: into a hidden temporary folder, files fsynced, then renamed into place; the last
`keep` checkpoints are kept. A checkpoint whose files do not match the manifest is reported by name;
a resume passes over it to the newest intact one and moves it aside (`latest_intact`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gpo_fast.errors import UserError

PREFIX = "rollout-"


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be resumed; the message says what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split_state(state, prefix: str, tensors: dict, scalars: dict | None = None):
    """Nested dicts/lists of tensors and plain values: tensors go to `tensors` under dotted keys, the
    rest is returned as JSON-able structure with {"__tensor__": key} placeholders."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[_key(k), _split_state(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return {"__list__": [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)],
                "tuple": isinstance(state, tuple)}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot checkpoint a {type(state).__name__} at {prefix}")


def _unshare(tensors: dict) -> None:
    """Give every tensor its own memory: safetensors refuses tensors that share it, and bitsandbytes' 8-bit
    Adam keeps one quantization map (qmap1, qmap2) shared by the states of every parameter it quantizes
    (those of 4096 elements or more: SD3.5's LoRA matrices, any full fine-tune). Loaded back, each state
    holds its own copy of the same values, which the optimizer reads the same way."""
    seen = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            tensors[key] = t.clone()
        else:
            seen.add(ptr)


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def _join_state(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {(k["int"] if isinstance(k, dict) else k): _join_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_join_state(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loop": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loop"])


def save_checkpoint(run_dir: Path, rollout: int, state: dict, keep: int = 2) -> Path:
    """Write state (nested dicts of tensors and plain values) as checkpoint `rollout`, atomically."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{rollout:06d}"
    tmp = root / f".tmp-{PREFIX}{rollout:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tensors: dict = {}
    structure = _split_state(state, "s", tensors)
    _unshare(tensors)
    files = ["tensors.safetensors", "state.json"]
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(structure))
        for name in files:
            _fsync(tmp / name)
        manifest = {"rollout": rollout, "sha256": {name: _sha256(tmp / name) for name in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _fsync(tmp / "manifest.json")
    except OSError as e:  # a full disk, a quota: drop the half-written folder, keep the previous checkpoints
        shutil.rmtree(tmp, ignore_errors=True)
        last = list_checkpoints(run_dir)
        kept = f"the last good one, {last[-1]}, is intact" if last else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final.name} ({e.strerror or e}); {kept}; free disk "
                              f"space and continue with --resume {run_dir}") from None
    if final.exists():  # a rerun of the same rollout: replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "manifest.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, unparseable or fail their checksums (not a passing I/O error)."""

    def __init__(self, path: Path, what: str):
        self.what = f"checkpoint {path} is corrupted ({what})"
        super().__init__(f"{self.what}; delete it to resume from the one before")


_verified: dict = {}  # path -> the files' (size, mtime) when they last passed their checksums in this process


def _fingerprint(path: Path) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_file())


def verify_checkpoint(path: Path) -> None:
    """DamagedCheckpoint naming the checkpoint when a file is missing or fails its checksum; CheckpointError
    when it cannot be read at all (permissions, an I/O error: the checkpoint may be fine)."""
    path = Path(path)
    try:
        fingerprint = _fingerprint(path)
        if _verified.get(path.resolve()) == fingerprint:  # hashed already, unchanged since: no second pass
            return
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            digests = dict(manifest["sha256"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedCheckpoint(path, f"manifest.json: {type(e).__name__}") from None
        for name, digest in digests.items():
            if not (path / name).is_file() or _sha256(path / name) != digest:
                raise DamagedCheckpoint(path, f"{name} does not match its checksum")
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e}); fix the folder's access "
                              "and resume again") from None
    _verified[path.resolve()] = fingerprint


def latest_intact(run_dir: Path, move_aside: bool = True) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of run_dir that passes its checksums, and one sentence per newer damaged one
    passed over. With move_aside (the main process), a damaged one is renamed `damaged-rollout-N`: kept for
    a look, out of the `keep` count and of later resumes; the other processes of a multi-GPU resume only
    pass over it. An I/O error is raised, not passed over: that checkpoint may well be fine."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as e:
            if move_aside:
                aside = path.with_name("damaged-" + path.name)
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(path, aside)
                skipped.append(f"{e.what}; moved aside to {aside.name}")
            else:
                skipped.append(e.what)
            continue
        except CheckpointError:
            if not move_aside and not path.exists():  # the main process moved it aside meanwhile
                continue
            raise
        return path, skipped
    return None, skipped


def load_checkpoint(path: Path) -> dict:
    """The state saved at path; CheckpointError naming the checkpoint when a file is damaged."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        structure = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); "
                              "delete it to resume from the one before") from None
    return _join_state(structure, tensors)
