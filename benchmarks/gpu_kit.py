"""The GPU kit: what a bare, offline GPU machine needs to run `make gpu-check`, cut into parts that
travel one per call (docs/GPU.md).

    python -m benchmarks.gpu_kit build [--python-tag cp312]  # here (network): build/gpu-kit/part-NN/
    python -m benchmarks.gpu_kit plan                        # the exact run-tool calls that stage it
    python -m benchmarks.gpu_kit stage PART_DIR              # there, one call per part (.gpu/stage.sh K)
    python -m benchmarks.gpu_kit assemble [--install]        # there: verify, reassemble, install offline

The kit is one tar (the payload): the DALI wheel stripped to what the pipeline uses, the wheels of
DALI's and medswav's pure-runtime dependencies that a torch-only machine lacks (the versions installed
here, where the tests pass), and the real test data of the GPU tests (data.tar.gz). The payload is
split into parts of at most 60 MiB (a call carries at most 64 MiB, the working tree included); every
part folder holds its part and the same manifest.json (sha256 and size of every part and of the
payload). `stage` copies a part into the staging folder ($MEDSWAV_GPU_STAGE, default
/tmp/medswav-gpu-kit), checking its checksum; `assemble` refuses a missing, foreign or corrupted
part with the part's name, then checks the whole payload's sha256, unpacks it and installs the
wheels with `pip install --no-index --no-deps --target STAGE/site`.

Standard library only: it runs on the bare machine before anything is installed.
Exit codes of the command line: 0 done, 1 kit error (missing or corrupted part, failed install),
2 usage error.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT_DIR = REPO / "build" / "gpu-kit"
PART_BYTES = 60 * 2**20            # one call carries 64 MiB: a part plus the working tree
MANIFEST = "manifest.json"
PAYLOAD = "kit.tar"
FORMAT = 1
DALI = "nvidia-dali-cuda130==2.4.0"
# DALI's own requirements the pipeline imports (nvimgcodec and nvcomp are loaded only by decoders and
# decompression operators medswav does not use), and medswav's runtime imports on the GPU path
# (shards, augment_dali, the gpu tests); numpy, torch and pytest are on the machine already.
DEPENDENCIES = ("astunparse", "gast", "six", "optree", "typing-extensions", "packaging", "nvtx", "makefun",
                "libcst", "pyyaml", "pyarrow", "pydicom", "webdataset", "braceexpand", "isal",
                "pytest-timeout", "tqdm")
# Real data of the gpu tests and benchmarks, relative to ../shared/data.
DATA = ("dicom/ct_kits_abdomen_18", "dicom/mr_mprage_sagittal_192", "medmnist/pneumoniamnist.npz",
        "medmnist/breastmnist.npz")
# Wheel members the pipeline cannot use: framework plug-ins other than PyTorch's.
DALI_DROP = re.compile(r"^nvidia/dali/plugin/(jax|numba|paddle\.py|tf\.py|triton\.py)")


class KitError(RuntimeError):
    """A kit that cannot be staged, reassembled or installed; the message says which part and what to do."""


def default_stage_dir() -> Path:
    return Path(os.environ.get("MEDSWAV_GPU_STAGE", "/tmp/medswav-gpu-kit"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- split and reassemble ---------------------------------------------------------------------------

def split(payload: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> dict:
    """Cut ``payload`` into ``out_dir/part-NN/{payload}.NN`` (NN from 01) with a manifest in each folder."""
    size = payload.stat().st_size
    count = max(1, -(-size // part_bytes))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*"):
        shutil.rmtree(old)
    parts, whole = [], hashlib.sha256()
    with open(payload, "rb") as src:
        for k in range(1, count + 1):
            data = src.read(part_bytes)
            whole.update(data)
            name = f"{payload.name}.{k:02d}"
            folder = out_dir / f"part-{k:02d}"
            folder.mkdir()
            (folder / name).write_bytes(data)
            parts.append({"index": k, "name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": FORMAT, "payload": payload.name, "size": size, "sha256": whole.hexdigest(),
                "part_bytes": part_bytes, "parts": parts}
    for k in range(1, count + 1):
        (out_dir / f"part-{k:02d}" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KitError(f"cannot read the kit manifest {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise KitError(f"{path}: kit format {manifest.get('format')!r}, this checkout reads {FORMAT}")
    return manifest


def stage(part_dir: Path, stage_dir: Path | None = None) -> Path:
    """Copy one part folder's part into the staging folder, after checking its checksum.

    A staging folder that holds parts of another kit (another payload checksum) is emptied first."""
    stage_dir = stage_dir or default_stage_dir()
    manifest = _read_manifest(part_dir / MANIFEST)
    files = [p for p in manifest["parts"] if (part_dir / p["name"]).exists()]
    if len(files) != 1:
        raise KitError(f"{part_dir}: expected one part of kit {manifest['sha256'][:12]}, found {len(files)}")
    part = files[0]
    if sha256_file(part_dir / part["name"]) != part["sha256"]:
        raise KitError(f"part {part['index']} ({part['name']}) is corrupted in {part_dir}: rebuild it with "
                       f"`python -m benchmarks.gpu_kit build`")
    stage_dir.mkdir(parents=True, exist_ok=True)
    staged = stage_dir / MANIFEST
    if staged.exists() and _read_manifest(staged)["sha256"] != manifest["sha256"]:
        for old in stage_dir.iterdir():   # parts of an older kit: never mix two kits
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    tmp = stage_dir / (part["name"] + ".tmp")
    shutil.copyfile(part_dir / part["name"], tmp)
    os.replace(tmp, stage_dir / part["name"])
    (stage_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return stage_dir / part["name"]


def missing_parts(stage_dir: Path) -> list[int]:
    """Indices of the parts not staged yet (every part when nothing is staged)."""
    if not (stage_dir / MANIFEST).exists():
        return []
    manifest = _read_manifest(stage_dir / MANIFEST)
    return [p["index"] for p in manifest["parts"] if not (stage_dir / p["name"]).exists()]


def reassemble(stage_dir: Path | None = None, dest: Path | None = None) -> Path:
    """Join the staged parts into the payload, refusing a missing or corrupted one; returns the payload."""
    stage_dir = stage_dir or default_stage_dir()
    if not (stage_dir / MANIFEST).exists():
        raise KitError(f"no kit staged in {stage_dir}: stage the parts first (`python -m benchmarks.gpu_kit plan`)")
    manifest = _read_manifest(stage_dir / MANIFEST)
    n = len(manifest["parts"])
    lost = missing_parts(stage_dir)
    if lost:
        raise KitError(f"part(s) {', '.join(map(str, lost))} of {n} missing in {stage_dir}: stage them with "
                       f"`bash .gpu/stage.sh K` (a machine handed back loses what was staged)")
    for p in manifest["parts"]:
        path = stage_dir / p["name"]
        if path.stat().st_size != p["size"] or sha256_file(path) != p["sha256"]:
            raise KitError(f"part {p['index']} of {n} ({p['name']}) is corrupted in {stage_dir} "
                           f"(size or sha256 differs from the manifest): stage it again")
    dest = dest or stage_dir / manifest["payload"]
    whole = hashlib.sha256()
    with open(dest, "wb") as out:
        for p in manifest["parts"]:
            with open(stage_dir / p["name"], "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    whole.update(block)
                    out.write(block)
    if whole.hexdigest() != manifest["sha256"]:
        dest.unlink()
        raise KitError(f"reassembled payload's sha256 differs from the manifest's {manifest['sha256'][:12]}")
    return dest


def unpack(payload: Path, dest: Path) -> Path:
    """Extract the payload tar (wheels/, data.tar.gz, kit.json) and the data under dest/data."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(payload) as tar:
        _extract(tar, dest)
    data = dest / "data.tar.gz"
    if data.exists():
        with tarfile.open(data) as tar:
            _extract(tar, dest / "data")
        data.unlink()
    return dest


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    if sys.version_info >= (3, 12):
        tar.extractall(dest, filter="data")
    else:  # pragma: no cover - our own archive; members are checked to stay inside dest
        root = dest.resolve()
        for m in tar.getmembers():
            if not (root / m.name).resolve().is_relative_to(root):
                raise KitError(f"kit member {m.name!r} points outside {dest}")
        tar.extractall(dest)


def install(wheels: list[Path], target: Path, python: str = sys.executable) -> Path:
    """`pip install --no-index --no-deps --target` (unpacked by hand where the machine's Python has no
    pip); the target's `nvidia` package extends over every `nvidia` folder on sys.path, so that
    nvidia.dali (here) and the CUDA wheels beside torch both import."""
    if not wheels:
        raise KitError("no wheels to install")
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode:
        for wheel in wheels:
            unpack_wheel(wheel, target)
    else:
        cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise KitError(f"offline install into {target} failed: {' | '.join(tail)}")
    if (target / "nvidia").is_dir():
        (target / "nvidia" / "__init__.py").write_text(
            "# Written by benchmarks.gpu_kit: one `nvidia` package over every folder that has one.\n"
            "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    return target


def unpack_wheel(wheel: Path, target: Path) -> None:
    """What `pip install --target` does with a wheel, for a Python without pip: the files where the
    wheel puts them (``NAME.data/purelib`` and ``platlib`` into the target; scripts and headers are
    not needed here), executable bits kept."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            dest = (target / name).resolve()
            if not dest.is_relative_to(root):
                raise KitError(f"{wheel.name}: member {info.filename!r} points outside {target}")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as f, open(dest, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)


def assemble(stage_dir: Path | None = None, install_wheels: bool = True) -> dict:
    """Reassemble, verify, unpack and (optionally) install; returns where things are."""
    stage_dir = stage_dir or default_stage_dir()
    payload = reassemble(stage_dir)
    kit = unpack(payload, stage_dir / "kit")
    payload.unlink()   # the parts stay: a second assemble needs no new staging
    site = stage_dir / "site"
    wheels = sorted((kit / "wheels").glob("*.whl"))
    if install_wheels:
        if site.exists():
            shutil.rmtree(site)
        install(wheels, site)
    return {"site": str(site), "data": str(kit / "data"), "wheels": [w.name for w in wheels]}


# ---- building the kit (here, with network) ---------------------------------------------------------

def strip_wheel(src: Path, dst: Path, python_tag: str = "cp312") -> dict:
    """Copy a DALI wheel without what the pipeline cannot use: extension modules for other Python
    versions and the non-PyTorch framework plug-ins; RECORD lists exactly what stays."""
    kept, dropped = 0, 0
    other_tag = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        names = zin.namelist()
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        keep = []
        for name in names:
            m = other_tag.search(name)
            if (m and f"cp{m.group(1)}" != python_tag) or DALI_DROP.match(name):
                dropped += zin.getinfo(name).file_size
                continue
            keep.append(name)
        kept_set = set(keep)
        for name in keep:
            if name == record_name:
                continue
            info = zin.getinfo(name)
            with zin.open(info) as f, zout.open(_clone_info(info), "w") as g:
                shutil.copyfileobj(f, g, 1 << 20)
            kept += info.file_size
        rows = [r for r in csv.reader(io.StringIO(zin.read(record_name).decode()))
                if r and (r[0] in kept_set or r[0] == record_name)]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        zout.writestr(_clone_info(zin.getinfo(record_name)), buf.getvalue())
    return {"kept_bytes": kept, "dropped_bytes": dropped, "wheel_bytes": dst.stat().st_size}


def _clone_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    out = zipfile.ZipInfo(info.filename, info.date_time)
    out.external_attr = info.external_attr    # keeps the executable bits of the shared libraries
    out.compress_type = zipfile.ZIP_DEFLATED
    return out


def _installed_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def _download(specs: list[str], dest: Path, python_version: str) -> None:
    """Binary wheels for the GPU machine's CPython on x86-64 Linux (abi3 and pure-Python ones included)."""
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--abi", abi, "--abi", "abi3", "--abi", "none",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(dest), *specs]
    if subprocess.run(cmd).returncode:
        raise KitError(f"pip download failed for {' '.join(specs)}")


def build(out_dir: Path = KIT_DIR, python_tag: str = "cp312", data_dir: Path | None = None,
          part_bytes: int = PART_BYTES) -> dict:
    """Download (cached in out_dir/download), strip, pack and split the kit."""
    py = f"{python_tag[2]}.{python_tag[3:]}"
    download = out_dir / "download" / python_tag
    download.mkdir(parents=True, exist_ok=True)
    specs = [DALI] + [f"{n}=={_installed_version(n)}" for n in DEPENDENCIES]
    wanted = {_norm(s.split("==")[0]): s.split("==")[1] for s in specs}
    have = {(_norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in download.glob("*.whl")}
    todo = [s for s in specs if (_norm(s.split("==")[0]), s.split("==")[1]) not in have]
    if todo:
        _download(todo, download, py)
    wheels_dir = out_dir / "payload" / "wheels"
    if wheels_dir.parent.exists():
        shutil.rmtree(wheels_dir.parent)
    wheels_dir.mkdir(parents=True)
    report = {"python_tag": python_tag, "wheels": {}}
    for w in sorted(download.glob("*.whl")):
        name, version = _norm(w.name.split("-")[0]), w.name.split("-")[1]
        if wanted.get(name) != version:
            continue
        if name == "nvidia_dali_cuda130":
            report["dali_strip"] = strip_wheel(w, wheels_dir / w.name, python_tag)
            report["dali_strip"]["original_bytes"] = w.stat().st_size
        else:
            shutil.copyfile(w, wheels_dir / w.name)
        report["wheels"][w.name] = (wheels_dir / w.name).stat().st_size
    data_dir = data_dir or Path(os.environ.get("MEDSWAV_SHARED_DATA", REPO.parent / "shared" / "data"))
    with tarfile.open(out_dir / "payload" / "data.tar.gz", "w:gz", compresslevel=6) as tar:
        for rel in DATA:
            if not (data_dir / rel).exists():
                raise KitError(f"test data {data_dir / rel} not found (set MEDSWAV_SHARED_DATA)")
            tar.add(data_dir / rel, arcname=rel)
    report["data_bytes"] = (out_dir / "payload" / "data.tar.gz").stat().st_size
    (out_dir / "payload" / "kit.json").write_text(json.dumps(report, indent=1) + "\n")
    payload = out_dir / PAYLOAD
    with tarfile.open(payload, "w") as tar:
        for p in sorted((out_dir / "payload").rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(out_dir / "payload")))
    manifest = split(payload, out_dir, part_bytes)
    payload.unlink()
    report.update(payload_bytes=manifest["size"], parts=len(manifest["parts"]), sha256=manifest["sha256"])
    return report


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


# ---- the staging sequence ---------------------------------------------------------------------------

def plan(kit_dir: Path = KIT_DIR) -> list[dict]:
    """The run-tool calls that stage the kit and run the check: one part per call, the check last."""
    folders = sorted(kit_dir.glob("part-*"))
    if not folders:
        raise KitError(f"no kit in {kit_dir}: build it with `make gpu-kit`")
    rel = [str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f) for f in folders]
    calls = [{"call": k, "carry": [r], "command": f"bash .gpu/stage.sh {k}", "timeout_s": 120}
             for k, r in enumerate(rel, 1)]
    calls[-1]["command"] += " && bash .gpu/check.sh"   # the last part's call runs the check (= make gpu-check)
    calls[-1]["timeout_s"] = 600                        # the check's own budget is 480 s
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kit", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 done, 1 kit error, 2 usage error. See docs/GPU.md.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, strip, pack and split the kit into build/gpu-kit/part-NN")
    b.add_argument("--python-tag", default="cp312", help="CPython of the GPU machine (default cp312)")
    b.add_argument("--out", type=Path, default=KIT_DIR, help="kit folder (default build/gpu-kit)")
    b.add_argument("--data", type=Path, help="real data folder (default $MEDSWAV_SHARED_DATA or ../shared/data)")
    pl = sub.add_parser("plan", help="print the run-tool calls that stage the kit and run the check")
    pl.add_argument("--kit", type=Path, default=KIT_DIR, help="kit folder to plan for (default build/gpu-kit)")
    pl.add_argument("--json", action="store_true", help="as JSON")
    s = sub.add_parser("stage", help="copy one carried part folder into the staging folder")
    s.add_argument("part_dir", type=Path, help="one carried part folder, build/gpu-kit/part-NN")
    s.add_argument("--stage-dir", type=Path, default=None, help="staging folder (default $MEDSWAV_GPU_STAGE or /tmp/medswav-gpu-kit)")
    a = sub.add_parser("assemble", help="verify and reassemble the staged parts, unpack, install offline")
    a.add_argument("--stage-dir", type=Path, default=None, help="staging folder (default $MEDSWAV_GPU_STAGE or /tmp/medswav-gpu-kit)")
    a.add_argument("--no-install", action="store_true", help="verify and unpack only, install nothing (default: install)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            r = build(args.out, args.python_tag, args.data)
            mib = 2**20
            if "dali_strip" in r:
                d = r["dali_strip"]
                print(f"DALI wheel: {d['original_bytes'] / mib:.1f} MiB -> {d['wheel_bytes'] / mib:.1f} MiB "
                      f"({d['dropped_bytes'] / mib:.1f} MiB uncompressed dropped)")
            print(f"dependency wheels: {sum(v for k, v in r['wheels'].items() if 'dali' not in k) / mib:.1f} MiB, "
                  f"test data {r['data_bytes'] / mib:.1f} MiB")
            print(f"kit: {r['payload_bytes'] / mib:.1f} MiB in {r['parts']} part(s) under {args.out} "
                  f"(sha256 {r['sha256'][:12]}); next: python -m benchmarks.gpu_kit plan")
        elif args.cmd == "plan":
            calls = plan(args.kit)
            if args.json:
                print(json.dumps(calls, indent=1))
            else:
                for c in calls:
                    print(f"call {c['call']}: carry {c['carry'][0]}; command: {c['command']}; timeout_s {c['timeout_s']}")
                print("Make the calls back to back: a machine idle for 30 s is handed back with what was staged.")
        elif args.cmd == "stage":
            path = stage(args.part_dir, args.stage_dir)
            left = missing_parts(path.parent)
            print(f"staged {path.name} in {path.parent}; " +
                  (f"still to stage: part(s) {', '.join(map(str, left))}" if left else "every part staged"))
        elif args.cmd == "assemble":
            r = assemble(args.stage_dir, not args.no_install)
            print(f"kit assembled: {len(r['wheels'])} wheels" + ("" if args.no_install else f" installed in {r['site']}")
                  + f", data in {r['data']}")
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
