"""Rank-0 run log: console lines, metrics.jsonl (one JSON object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from shards.atomic import write_text_atomically


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A run killed while appending leaves a partial last line: it is
    dropped. A damaged line before the last one is an error (ValueError naming path and line)."""
    lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: damaged line ({e})") from None
    return rows


class MetricsLogger:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # Steps after the checkpoint were lost with the crash: drop them so the file reads as one run.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            # replaced whole: a crash now must not cut the history of the steps before the checkpoint
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step or None)
        self._t0 = time.time()

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3), **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.tb is not None:
                self.tb.close()
