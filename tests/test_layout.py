"""Where the format's names live: shards/ alone; ingest's modules import without cycles."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_ingest_and_shards_module_imports_first():
    """Each module imported first (the project's modules forgotten in between, third-party ones kept so
    that this stays cheap): a module-level import cycle fails here as "partially initialized module"."""
    modules = sorted([*(f"ingest.{p.stem}" for p in (REPO / "ingest").glob("*.py") if p.stem != "__init__"),
                      *(f"shards.{p.stem}" for p in (REPO / "shards").glob("*.py") if p.stem != "__init__")])
    code = f"""
import importlib, sys
failed = []
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("ingest", "shards")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_config_validation_uses_the_format_modalities_without_the_planner(dicom_dir, tmp_path):
    """The command line's checks take the modality names from shards (one list) and load neither the
    planner (the old config <-> plan cycle) nor pyarrow."""
    code = f"""
import sys
from ingest.config import ConfigError, build_config
import shards.sample
try:
    build_config(sources=[{str(dicom_dir)!r}], out={str(tmp_path / "out")!r}, modality="pet")
except ConfigError as e:
    print(e)
cfg = build_config(sources=[{str(dicom_dir)!r}], out={str(tmp_path / "out")!r}, modality="mr", units="raw")
print(cfg.modality, cfg.units)
print(sorted(m for m in ("ingest.plan", "pyarrow") if m in sys.modules))
print(shards.sample.MODALITIES)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    refused, accepted, loaded, modalities = proc.stdout.strip().splitlines()
    assert refused == f"--modality must be one of {modalities}, got 'pet'"
    assert accepted == "mr raw"
    assert loaded == "[]"
