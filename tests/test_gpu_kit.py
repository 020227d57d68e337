"""The GPU kit's travel path, on the CPU: split, stage, reassemble with checksums, offline install.

The payload holds a real wheel (built here around real DICOM bytes) and the real data tar, as
`benchmarks.gpu_kit build` packs them; parts are small so that a kit of a few hundred KiB has several.
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_kit

REPO = Path(__file__).resolve().parents[1]
PART = 96 * 1024


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, name: str, files: dict[str, bytes], tag: str = "py3-none-any") -> Path:
    """A wheel as pip installs it: the files, METADATA, WHEEL and a RECORD with their hashes."""
    dist = f"{name}-1.0.dist-info"
    files = {**files,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: medswav-test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()}
    path = folder / f"{name}-1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}/RECORD", "\n".join([_record_line(n, d) for n, d in files.items()] + [f"{dist}/RECORD,,"]) + "\n")
    return path


@pytest.fixture()
def dicom_bytes(dicom_dir) -> bytes:
    return sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[0].read_bytes()


@pytest.fixture()
def kit(tmp_path, dicom_bytes, medmnist_dir):
    """A payload as `build` writes it (wheels/, data.tar.gz, kit.json), split into parts of 96 KiB."""
    payload_dir = tmp_path / "payload"
    (payload_dir / "wheels").mkdir(parents=True)
    make_wheel(payload_dir / "wheels", "medswav_kit_probe", {
        "medswav_kit_probe/__init__.py": b"from pathlib import Path\nSAMPLE = Path(__file__).with_name('sample.dcm')\n",
        "medswav_kit_probe/sample.dcm": dicom_bytes,
        "nvidia/medswav_kit_probe/__init__.py": b"WHERE = 'kit'\n"})
    with tarfile.open(payload_dir / "data.tar.gz", "w:gz") as tar:
        tar.add(medmnist_dir / "breastmnist.npz", arcname="medmnist/breastmnist.npz")
    (payload_dir / "kit.json").write_text("{}\n")
    payload = tmp_path / gpu_kit.PAYLOAD
    with tarfile.open(payload, "w") as tar:
        for p in sorted(payload_dir.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(payload_dir)))
    manifest = gpu_kit.split(payload, tmp_path / "kit", PART)
    return {"payload": payload, "manifest": manifest, "parts": sorted((tmp_path / "kit").glob("part-*")),
            "stage": tmp_path / "stage"}


def _stage_all(kit):
    for part in kit["parts"]:
        gpu_kit.stage(part, kit["stage"])


def test_split_stage_reassemble_gives_the_payload_back(kit):
    manifest, parts = kit["manifest"], kit["parts"]
    assert len(parts) == len(manifest["parts"]) >= 3
    assert all(p["size"] <= PART for p in manifest["parts"])
    for part in parts:   # each folder travels alone: its part and the whole manifest
        assert sorted(f.name for f in part.iterdir()) == sorted([gpu_kit.MANIFEST, f"{gpu_kit.PAYLOAD}.{part.name[-2:]}"])
    assert gpu_kit.missing_parts(kit["stage"]) == []
    gpu_kit.stage(parts[0], kit["stage"])
    assert gpu_kit.missing_parts(kit["stage"]) == list(range(2, len(parts) + 1))
    _stage_all(kit)
    out = gpu_kit.reassemble(kit["stage"], kit["stage"] / "joined.tar")
    assert out.read_bytes() == kit["payload"].read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == manifest["sha256"]


def test_flipped_byte_in_a_staged_part_is_refused_by_name(kit):
    _stage_all(kit)
    second = kit["stage"] / kit["manifest"]["parts"][1]["name"]
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0x01
    second.write_bytes(bytes(data))
    n = len(kit["parts"])
    with pytest.raises(gpu_kit.KitError, match=f"part 2 of {n} .* is corrupted"):
        gpu_kit.reassemble(kit["stage"])
    assert not (kit["stage"] / gpu_kit.PAYLOAD).exists()


def test_corrupted_part_is_refused_when_staged(kit):
    part = kit["parts"][0]
    f = next(p for p in part.iterdir() if p.name != gpu_kit.MANIFEST)
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(gpu_kit.KitError, match="part 1 .* is corrupted"):
        gpu_kit.stage(part, kit["stage"])


def test_missing_part_is_refused_and_named(kit):
    for part in kit["parts"][:-1]:
        gpu_kit.stage(part, kit["stage"])
    n = len(kit["parts"])
    with pytest.raises(gpu_kit.KitError, match=rf"part\(s\) {n} of {n} missing"):
        gpu_kit.reassemble(kit["stage"])
    rc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_kit", "assemble", "--stage-dir", str(kit["stage"])],
                        cwd=REPO, capture_output=True, text=True)
    assert rc.returncode == 1 and f"part(s) {n} of {n} missing" in rc.stderr


def test_parts_of_another_kit_are_not_mixed(kit, tmp_path):
    gpu_kit.stage(kit["parts"][0], kit["stage"])
    other = tmp_path / "other.tar"
    other.write_bytes(kit["payload"].read_bytes()[::-1])
    gpu_kit.split(other, tmp_path / "other-kit", PART)
    gpu_kit.stage(tmp_path / "other-kit" / "part-02", kit["stage"])
    assert gpu_kit.missing_parts(kit["stage"])[0] == 1   # the first kit's part 1 was dropped


def test_assemble_installs_offline_and_imports_beside_the_machines_nvidia_package(kit, dicom_bytes, tmp_path):
    _stage_all(kit)
    where = gpu_kit.assemble(kit["stage"])
    assert where["wheels"] == ["medswav_kit_probe-1.0-py3-none-any.whl"]
    assert (Path(where["data"]) / "medmnist" / "breastmnist.npz").exists()
    # The machine's own `nvidia` package (CUDA wheels beside torch) as a plain package after the kit on
    # sys.path: both its subpackages and the kit's must import.
    machine = tmp_path / "machine-site"
    (machine / "nvidia" / "cu13").mkdir(parents=True)
    (machine / "nvidia" / "__init__.py").write_text("")
    (machine / "nvidia" / "cu13" / "__init__.py").write_text("WHERE = 'machine'\n")
    probe = ("import medswav_kit_probe, nvidia.medswav_kit_probe as p, nvidia.cu13 as c; "
             "print(medswav_kit_probe.__file__); print(p.WHERE, c.WHERE); "
             "print(medswav_kit_probe.SAMPLE.read_bytes().hex())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([where["site"], str(machine)])}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    file_, where_kit, where_machine, sample = run.stdout.split()
    assert file_.startswith(where["site"]) and (where_kit, where_machine) == ("kit", "machine")
    assert bytes.fromhex(sample) == dicom_bytes


def test_strip_keeps_one_python_and_a_consistent_record(tmp_path, dicom_bytes):
    files = {f"nvidia/dali/backend_impl.cpython-{v}-x86_64-linux-gnu.so": dicom_bytes[:4096] + v.encode()
             for v in ("310", "311", "312", "313", "314t")}
    files.update({"nvidia/dali/__init__.py": b"", "nvidia/dali/libdali.so": dicom_bytes,
                  "nvidia/dali/plugin/pytorch/__init__.py": b"", "nvidia/dali/plugin/tf.py": b"",
                  "nvidia/dali/plugin/jax/__init__.py": b""})
    src = make_wheel(tmp_path, "nvidia_dali_cuda130", files, tag="py3-none-manylinux_2_28_x86_64")
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / src.name
    report = gpu_kit.strip_wheel(src, dst, "cp312")
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = z.read("nvidia_dali_cuda130-1.0.dist-info/RECORD").decode()
        assert z.read("nvidia/dali/libdali.so") == dicom_bytes
    assert "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so" in names
    assert not any(f"cpython-{v}" in n for n in names for v in ("310", "311", "313", "314t"))
    assert "nvidia/dali/plugin/pytorch/__init__.py" in names
    assert not any(n.startswith(("nvidia/dali/plugin/tf", "nvidia/dali/plugin/jax")) for n in names)
    assert {line.split(",")[0] for line in record.splitlines()} == names
    assert report["dropped_bytes"] == 4 * (4096 + 3) + 1   # four other tags ("314t": 4 chars) and nothing else
    gpu_kit.install([dst], tmp_path / "site")
    assert (tmp_path / "site" / "nvidia" / "dali" / "libdali.so").read_bytes() == dicom_bytes


def test_plan_names_one_part_per_call_and_ends_with_the_check(kit):
    calls = gpu_kit.plan(kit["parts"][0].parent)
    assert [c["call"] for c in calls] == list(range(1, len(kit["parts"]) + 1))
    assert [c["carry"] for c in calls] == [[str(p)] for p in kit["parts"]]
    assert all(c["command"].startswith(f"bash .gpu/stage.sh {c['call']}") for c in calls)
    assert calls[-1]["command"].endswith("&& bash .gpu/check.sh")


def test_unpacking_without_pip_gives_what_pip_installs(tmp_path, dicom_bytes):
    files = {"probe_pkg/__init__.py": b"X = 1\n", "probe_pkg/lib.so": dicom_bytes}
    wheel = make_wheel(tmp_path, "probe_pkg", files)
    with zipfile.ZipFile(wheel, "a") as z:   # a platlib file under NAME.data, as compiled wheels may have
        z.writestr("probe_pkg-1.0.data/platlib/probe_extra.py", b"Y = 2\n")
        z.writestr("probe_pkg-1.0.data/scripts/probe-cli", b"#!/bin/sh\n")
    gpu_kit.install([wheel], tmp_path / "pip")
    gpu_kit.unpack_wheel(wheel, tmp_path / "hand")

    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and "dist-info" not in str(p) and "/bin/" not in f"/{p.relative_to(root)}"}
    assert tree(tmp_path / "hand") == tree(tmp_path / "pip")
    assert tree(tmp_path / "hand")["probe_pkg/lib.so"] == dicom_bytes and "probe_extra.py" in tree(tmp_path / "hand")
