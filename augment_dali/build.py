"""Build the medswav DALI plugin against the installed DALI wheel.

    python -m augment_dali.build [--force] [--no-cuda] [-j N]

Compiles every ``augment_dali/csrc/*.cc`` with g++ and, when nvcc is found (and ``--no-cuda`` is not
given), every ``csrc/*.cu`` with nvcc, then links ``augment_dali/_lib/libmedswav_dali.so``. A stamp
(``build_stamp.json``) records the DALI version, whether CUDA kernels are inside and a hash of the
sources; the build is skipped while all three still match, so re-running it is cheap. After a DALI
upgrade the stamp no longer matches and the plugin is rebuilt (a plugin must be compiled against the
exact DALI it is loaded into).

DALI's headers include the CUDA runtime headers even for CPU-only code: a machine without a CUDA toolkit
needs them from the ``nvidia-cuda-runtime``, ``nvidia-cuda-crt`` and ``nvidia-cuda-cccl`` wheels (found
under ``site-packages/nvidia/*/include``) or ``CUDA_HOME``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR / "csrc"
LIB_DIR = PACKAGE_DIR / "_lib"
LIB_NAME = "libmedswav_dali.so"
STAMP_NAME = "build_stamp.json"
# Ampere (A100) and Hopper (H100/H200) SASS; compute_90 PTX lets newer GPUs JIT the kernels.
CUDA_ARCHS = ("80", "90")
# -O2 keeps compile times modest; the CPU loops need GCC's vectoriser with a real cost model.
CXX_VECTORIZE = ("-ftree-vectorize", "-fvect-cost-model=dynamic")


class BuildError(RuntimeError):
    """A build failure with a message meant for the user."""


def dali_info() -> dict:
    try:
        import nvidia.dali as dali
        from nvidia.dali import sysconfig as dali_sysconfig
    except ImportError as e:
        raise BuildError(f"NVIDIA DALI is not installed in this Python ({sys.executable}): {e}. "
                         "Install it with: pip install 'medswav[dali]'") from e
    lib_dir = Path(dali_sysconfig.get_lib_dir())
    return {"version": dali.__version__, "include": dali_sysconfig.get_include_dir(),
            "lib_dir": str(lib_dir), "compile_flags": dali_sysconfig.get_compile_flags(),
            "link_flags": dali_sysconfig.get_link_flags()}


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_root(nvcc: str | None) -> Path | None:
    cands = [Path(nvcc).resolve().parent.parent] if nvcc else []
    cands += [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                                "/usr/local/cuda") if p]
    for c in cands:  # nvcc may be a wrapper outside the toolkit (e.g. /usr/local/bin/nvcc)
        if (c / "include" / "cuda_runtime_api.h").is_file():
            return c
    return None


def find_cuda_include(root: Path | None) -> Path:
    """DALI headers need the CUDA runtime headers even when only the CPU backend is compiled."""
    cands = [root / "include"] if root else []
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    cands += sorted(site.glob("*/include")) + [Path("/usr/local/cuda/include")]
    needed = ("cuda_runtime_api.h", "crt/host_config.h")
    for c in cands:
        if all((c / h).is_file() for h in needed) and any((c / d / "nv" / "target").is_file()
                                                          for d in (".", "cccl")):
            return c
    raise BuildError("CUDA headers not found (cuda_runtime_api.h, crt/host_config.h, nv/target). "
                     "Install a CUDA toolkit, or just the headers: pip install nvidia-cuda-runtime "
                     "nvidia-cuda-crt nvidia-cuda-cccl (CUDA 13 wheels; enough for a CPU-only build), "
                     "or set CUDA_HOME.")


def find_cudart_static(root: Path | None) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if root and (root / sub / "libcudart_static.a").is_file():
            return root / sub
    raise BuildError(f"libcudart_static.a not found under {root}; cannot link the CUDA kernels "
                     "(use --no-cuda for a CPU-only plugin).")


def sources_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):
        if f.is_file() and f.suffix in (".cc", ".cu", ".h", ".cuh"):
            h.update(str(f.relative_to(CSRC)).encode())
            h.update(f.read_bytes())
    h.update(Path(__file__).read_bytes())  # flags live here
    return h.hexdigest()


def local_includes(src: Path) -> set[Path]:
    """Project headers (quoted includes resolved under csrc/) that `src` includes, transitively."""
    found: set[Path] = set()
    todo = [src]
    while todo:
        for line in todo.pop().read_text().splitlines():
            m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
            if m and (CSRC / m.group(1)).is_file() and (CSRC / m.group(1)) not in found:
                found.add(CSRC / m.group(1))
                todo.append(CSRC / m.group(1))
    return found


def read_stamp(lib_dir: Path = LIB_DIR) -> dict | None:
    try:
        return json.loads((lib_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # compiler missing or not executable
        raise BuildError(f"{what}: cannot run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise BuildError(f"{what} failed (exit {proc.returncode}); command: {' '.join(cmd)}")


def build(force: bool = False, use_cuda: bool = True, jobs: int = 2, verbose: bool = True) -> Path:
    info = dali_info()
    nvcc = find_nvcc() if use_cuda else None
    root = cuda_root(nvcc)
    cuda_inc = find_cuda_include(root)
    cc_files = sorted(CSRC.glob("*.cc"))
    cu_files = sorted(CSRC.glob("*.cu")) if nvcc else []
    if not cc_files:
        raise BuildError(f"no C++ sources in {CSRC}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler found (need g++ >= 11 for C++20); set CXX")

    want = {"dali_version": info["version"], "cuda": bool(nvcc), "sources": sources_hash(cc_files)}
    lib = LIB_DIR / LIB_NAME
    stamp = read_stamp(LIB_DIR)
    if not force and lib.is_file() and stamp and all(stamp.get(k) == v for k, v in want.items()):
        if verbose:
            print(f"{lib} is up to date (DALI {info['version']}, CUDA {'yes' if nvcc else 'no'})")
        return lib

    obj_dir = LIB_DIR / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    defines = ["-DMEDSWAV_WITH_CUDA=1"] if nvcc else []
    common = ["-std=c++20", "-O2", *info["compile_flags"], f"-I{CSRC}", f"-I{cuda_inc}", *defines]
    jobs_list = []
    for f in cc_files:
        o = obj_dir / (f.name + ".o")
        jobs_list.append((f, [cxx, *common, *CXX_VECTORIZE, "-fPIC", "-fvisibility=hidden", "-c", str(f), "-o", str(o)], o))
    for f in cu_files:
        o = obj_dir / (f.name + ".o")
        arch = [a for c in CUDA_ARCHS for a in ("-gencode", f"arch=compute_{c},code=sm_{c}")]
        arch += ["-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
        cmd = [nvcc, *common, *arch, "--expt-relaxed-constexpr", "--extended-lambda",
               "-Xcompiler", "-fPIC,-fvisibility=hidden", "-ccbin", cxx, "-c", str(f), "-o", str(o)]
        jobs_list.append((f, cmd, o))

    def compile_one(item):
        # An object is reused while its source, the project headers it includes and its command line
        # are unchanged (DALI's own headers are covered by the DALI version).
        src, cmd, obj = item
        deps = b"".join(h.read_bytes() for h in sorted(local_includes(src)))
        key = hashlib.sha256(src.read_bytes() + deps + "\0".join([info["version"], *cmd]).encode()).hexdigest()
        key_file = obj.with_suffix(".key")
        if not force and obj.is_file() and key_file.is_file() and key_file.read_text() == key:
            return src.name
        hint = " (or build without the CUDA backend: --no-cuda)" if src.suffix == ".cu" else ""
        run(cmd, f"compiling {src.name}{hint}")
        key_file.write_text(key)
        return src.name

    progress = None
    try:
        from tqdm import tqdm
        progress = tqdm(total=len(jobs_list), desc="building medswav DALI plugin", unit="file",
                        disable=not verbose)
    except ImportError:
        pass
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name in pool.map(compile_one, jobs_list):
            if progress is not None:
                progress.set_postfix_str(name)
                progress.update()
    if progress is not None:
        progress.close()

    link = [cxx, "-shared", "-o", str(lib) + ".tmp", *[str(o) for *_, o in jobs_list],
            *info["link_flags"], f"-Wl,-rpath,{info['lib_dir']}"]
    if nvcc:
        link += [f"-L{find_cudart_static(root)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    run(link, "linking")
    os.replace(str(lib) + ".tmp", lib)
    (LIB_DIR / STAMP_NAME).write_text(json.dumps(want, indent=2) + "\n")
    if verbose:
        print(f"built {lib} (DALI {info['version']}, CUDA {'yes' if nvcc else 'no'})")
    return lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m augment_dali.build", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    p.add_argument("--no-cuda", action="store_true", help="CPU backend only, even when nvcc exists")
    p.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = p.parse_args(argv)
    try:
        build(force=args.force, use_cuda=not args.no_cuda, jobs=args.jobs)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
