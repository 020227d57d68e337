"""Shared fixtures: where the real data lives, and how a missing data set behaves.

Tests that need `../shared/data` skip on a developer machine without it, but fail when `CI` is set:
a CI run that silently skipped the real-data tests would prove nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSWAV_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if path.exists():
        return path
    msg = f"real test data not found at {path} (set MEDSWAV_SHARED_DATA)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def dicom_dir(shared_data) -> Path:
    return _require(shared_data / "dicom")


@pytest.fixture(scope="session")
def medmnist_dir(shared_data) -> Path:
    return _require(shared_data / "medmnist")
