"""One checkpoint file per run, written atomically (temporary file in the same folder, fsync, rename).

Checkpoints and backbone exports hold tensors and plain values only (dicts, lists, tuples, numbers,
strings): they are read with `torch.load(weights_only=True)`, which refuses any other pickled object, so
a file from elsewhere cannot run code when it is loaded. The random-number states are stored in that
form too (numpy's as a dict with a list of ints). Checkpoints written before that change hold numpy's
state as an array; for them exactly numpy's array-rebuilding types are allowed, nothing else.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from shards.atomic import write_atomically

from .errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"

# What a legacy checkpoint's numpy RNG state (a uint32 array) needs to be rebuilt; no code runs from it.
_LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class UnsafeOrDamagedFile(ValueError):
    """A checkpoint or export that cannot be read as tensors and plain values."""


def load_plain(path: Path, map_location="cpu", what: str = "checkpoint"):
    """torch.load limited to tensors and plain values; raises UnsafeOrDamagedFile naming the file."""
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, foreign, or holding objects that would run code: one line, no trace
        reason = str(e)
        if "Unsupported global" in reason:  # keep the name of the refused object, drop torch's advice
            reason = "it holds a pickled object other than tensors and plain values (" + \
                reason.split("Unsupported global: ", 1)[1].split(" was not", 1)[0] + "); refused: loading it could run code"
        else:
            reason = f"{type(e).__name__}: {reason.splitlines()[0] if reason else ''}"
        raise UnsafeOrDamagedFile(f"cannot read {what} {path}: {reason}") from None


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete what saves of `path` killed before their rename left behind (any process id; also the
    `.<name>.tmp<pid>` of earlier versions)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.tmp*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_atomic(obj: dict, path: Path) -> None:
    """Readers see the old file or the new one, never half of one (shards.atomic)."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def load(path: Path, map_location="cpu") -> dict:
    """A training checkpoint; raises CheckpointError (one line) when it is damaged or holds anything unsafe."""
    try:
        return load_plain(path, map_location)
    except UnsafeOrDamagedFile as e:
        raise CheckpointError(str(e)) from None


def resolve_resume(resume: str, out: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        path = out / CHECKPOINT_NAME
        return path if path.exists() else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
    return path


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # a legacy checkpoint holds numpy's own tuple, accepted as it is
        numpy_state = {**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], np.uint32),
                                                "pos": numpy_state["state"]["pos"]}}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
