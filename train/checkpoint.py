"""One checkpoint file per run, written atomically (temporary file in the same folder, fsync, rename)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(obj: dict, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why, in one line
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def resolve_resume(resume: str, out: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        path = out / CHECKPOINT_NAME
        return path if path.exists() else None
    path = Path(resume)
    if not path.exists():
        raise SystemExit(f"error: --resume {resume}: no such checkpoint")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
