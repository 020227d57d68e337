"""--deterministic: what it takes on CUDA, and what is refused (docs/TRAIN.md, "Determinism").

On CUDA, torch.use_deterministic_algorithms(True) needs cuBLAS's fixed workspace
(CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts, so set here before the first CUDA work) and raises
at the first op without a deterministic CUDA kernel. The 2-D models avoid every such op (the
encoders' global pooling is a mean, the code statistics count with a sort); the 3-D DenseNet's
MaxPool3d layers have no deterministic CUDA backward, so that combination is refused up front.
"""
from __future__ import annotations

import os

CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


class DeterminismError(RuntimeError):
    pass


def refusal(cfg, device_type: str) -> str | None:
    """Why ``cfg.deterministic`` cannot hold on ``device_type`` (None: it can)."""
    if not cfg.deterministic or device_type != "cuda":
        return None
    if cfg.arch == "densenet3d":
        return ("--deterministic on CUDA: densenet3d uses MaxPool3d, whose backward has no deterministic "
                "CUDA kernel (run it without --deterministic, or on the CPU)")
    return None


def prepare_environment(device_type: str) -> None:
    """Set cuBLAS's deterministic workspace unless the user chose one; refuse a value that is not one."""
    if device_type != "cuda":
        return
    value = os.environ.get(CUBLAS_VAR)
    if value is None:
        os.environ[CUBLAS_VAR] = CUBLAS_DETERMINISTIC[0]
    elif value not in CUBLAS_DETERMINISTIC:
        raise DeterminismError(f"--deterministic on CUDA needs {CUBLAS_VAR}={' or '.join(CUBLAS_DETERMINISTIC)} "
                               f"(set before the run starts), not {CUBLAS_VAR}={value}")
