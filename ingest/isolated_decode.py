"""GDCM decodes in a child process: `python -m ingest.isolated_decode MODE FILE FRAME` writes the pixels
as .npy to stdout.

python-gdcm aborts the whole process (SIGABRT, an uncaught C++ exception) on some codestreams that
disagree with their header (found by benchmarks.fuzz: 12 of 6,000 mutated files). In a Dask worker that
would kill the worker, then the next one the task is retried on, and fail the job. GDCM is the last
decoder tried (ingest.decoders), only after every other one failed, so the cost of a child process per
such frame (a few hundred ms) is paid rarely; an abort becomes a "pixel decoding failed" rejection.
MODE is "plugin" (pydicom's GDCM plugin, one frame) or "whole" (GDCM's own reader, every frame: JPEG
Extended 12-bit, which the plugin refuses).
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

TIMEOUT_S = 120


def gdcm_in_child(ds, frame: int, mode: str) -> np.ndarray:
    """The frame ("plugin") or every frame ("whole") of `ds` decoded by GDCM in a child process;
    ValueError naming what happened when the child fails or dies."""
    from .decoders import file_of

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    try:
        with file_of(ds) as path:
            done = subprocess.run([sys.executable, "-m", "ingest.isolated_decode", mode, path, str(frame)],
                                  capture_output=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ValueError(f"gdcm: no result within {TIMEOUT_S} s") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise ValueError(f"gdcm: the decoder ended its process ({name})")
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ValueError(last[0][:300])
    return np.load(io.BytesIO(done.stdout), allow_pickle=False)


def main(argv: list[str]) -> int:
    mode, path, frame = argv[0], argv[1], int(argv[2])
    from .convert import load_dataset
    from .decoders import gdcm_whole_file

    ds = load_dataset(path)
    try:
        if mode == "whole":
            arr = gdcm_whole_file(ds)
        else:
            from pydicom.pixels import pixel_array

            arr = pixel_array(ds, index=frame, decoding_plugin="gdcm")
    except Exception as e:
        print(f"gdcm: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return 1
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(arr), allow_pickle=False)
    sys.stdout.buffer.write(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
