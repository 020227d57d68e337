"""Shared plumbing of the benchmarks: command line, machine description, table, JSON figures."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path


def parser(description: str) -> argparse.ArgumentParser:
    """The benchmark's parser; its usage line names the command as run: `python -m benchmarks.<name>`."""
    import sys

    spec = sys._getframe(1).f_globals.get("__spec__")  # the calling benchmark's module, also under -m
    module = spec.name if spec is not None else sys._getframe(1).f_globals["__name__"]
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in about a minute on 2 cores")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    return p


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


@contextmanager
def timed(store: dict, name: str):
    start = time.perf_counter()
    yield
    store[name] = store.get(name, 0.0) + time.perf_counter() - start


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """Rows of dicts as an aligned text table; floats with 3 significant decimals."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]   # rows may be none
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


def write_json(path: str | None, name: str, figures: dict, settings: dict) -> None:
    if not path:
        return
    record = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        **figures,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"figures written to {path}")
