"""medswav augmentations as custom DALI operators (``nvidia.dali.fn.medswav.*``).

The operators live in the plugin ``augment_dali/_lib/libmedswav_dali.so`` built by
``python -m augment_dali.build``. Importing this package loads nothing: the code that builds DALI graphs
with the operators (`pipeline`, `normalize`, `stats`) calls `load_plugin()` first, so the configuration,
the plan and the NumPy references import without DALI or the plugin (training on NPZ or synthetic data, the
build itself, the kernel harness on a bare GPU machine). It needs no GPU: the CUDA backend is only used by
GPU pipelines.
"""
from __future__ import annotations

import json
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "_lib"
LIB_NAME = "libmedswav_dali.so"
BUILD_COMMAND = "python -m augment_dali.build"
OPERATORS = ("gamma", "linear", "intensity", "robust_window", "energy_bands", "band_energies", "rescale", "multicrop")

_loaded: set[str] = set()


class PluginError(ImportError):
    """The medswav DALI plugin is missing, stale or cannot be loaded."""


def load_plugin(lib_dir: str | Path = LIB_DIR) -> Path:
    """Load the plugin from ``lib_dir`` (idempotent) after checking it matches the installed DALI."""
    lib_dir = Path(lib_dir)
    lib = lib_dir / LIB_NAME
    if str(lib) in _loaded:
        return lib
    if not lib.is_file():
        raise PluginError(f"medswav DALI plugin not built: {lib} is missing. Run `{BUILD_COMMAND}`.")
    try:
        import nvidia.dali as dali
        from nvidia.dali import plugin_manager
    except ImportError as e:
        raise PluginError(f"NVIDIA DALI is not installed ({e}); install medswav[dali], then run "
                          f"`{BUILD_COMMAND}`.") from e
    try:
        stamp = json.loads((lib_dir / "build_stamp.json").read_text())
    except (OSError, ValueError):
        stamp = {}
    built_for = stamp.get("dali_version")
    if built_for != dali.__version__:
        raise PluginError(f"medswav DALI plugin {lib} was built against DALI {built_for or 'unknown'} "
                          f"but DALI {dali.__version__} is installed. Rebuild it: "
                          f"`{BUILD_COMMAND} --force`.")
    try:
        plugin_manager.load_library(str(lib))
    except RuntimeError as e:
        raise PluginError(f"cannot load {lib}: {e}. Rebuild it: `{BUILD_COMMAND} --force`.") from e
    _loaded.add(str(lib))
    return lib


def plugin_has_cuda(lib_dir: str | Path = LIB_DIR) -> bool:
    """True when the plugin was compiled with the CUDA backend (nvcc was found at build time)."""
    try:
        return bool(json.loads((Path(lib_dir) / "build_stamp.json").read_text()).get("cuda"))
    except (OSError, ValueError):
        return False


def gpu_backend_usable(lib_dir: str | Path = LIB_DIR) -> bool:
    """True when GPU pipelines can run here: the plugin holds the CUDA backend and DALI sees a device."""
    if not plugin_has_cuda(lib_dir):
        return False
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return GetCUDADeviceCount() > 0
    except Exception:  # no driver at all
        return False
