"""Where the salt of a dataset comes from, and why it never lives inside the dataset.

Every identifier (UIDs, patient ID, source path) reaches shards and manifests only as a keyed BLAKE2b
with this salt. Patient IDs and UIDs are guessable, so whoever holds the salt can test a guess against
the hashes: the salt must stay with the dataset's owner, not travel with the data.

Precedence: `--salt` > environment `MEDSWAV_SALT` > `salt` in the TOML config > the salt file
`<DATASET>.salt` next to (not inside) the dataset folder. When none exists, a random 256-bit salt is
generated into that file (mode 0600): copying or publishing the dataset folder does not copy the salt,
and a rerun (resume, incremental) finds it again, so keys stay stable.

The dataset records only a fingerprint of the salt (`ingest.json`), so a rerun with another salt is
refused instead of silently producing different keys (duplicates).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from .config import ConfigError

ENV = "MEDSWAV_SALT"
STATE_FILE = "ingest.json"


def beside(root: Path, suffix: str) -> Path:
    """`<DATASET><suffix>` next to (not inside) the dataset folder: what must not travel with the data."""
    root = Path(root).resolve()
    return root.with_name(root.name + suffix)


def salt_file(root: Path) -> Path:
    return beside(root, ".salt")


def fingerprint(salt: str) -> str:
    from shards import salted_hash

    return salted_hash("medswav salt fingerprint", salt)[:16]


def resolve_salt(root: Path, cli_salt: str | None) -> tuple[str, str]:
    """Return (salt, where it came from); create the salt file if no salt is given anywhere."""
    if cli_salt:
        salt, origin = cli_salt, "--salt, MEDSWAV_SALT or the config file"
    elif os.environ.get(ENV):
        salt, origin = os.environ[ENV], f"environment {ENV}"
    elif salt_file(root).exists():
        salt, origin = salt_file(root).read_text().strip(), f"file {salt_file(root)}"
        if not salt:
            raise ConfigError(f"salt file {salt_file(root)} is empty")
    else:
        if (Path(root) / STATE_FILE).exists():
            raise ConfigError(
                f"dataset {root} was built with a salt that is not available now: pass --salt, set {ENV} "
                f"or restore {salt_file(root)}"
            )
        path = salt_file(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        salt = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(salt + "\n")
        origin = f"new file {path}"
    check_salt(root, salt)
    return salt, origin


def read_state(root: Path) -> dict:
    path = Path(root) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(root: Path, state: dict) -> None:
    path = Path(root) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_salt(root: Path, salt: str) -> None:
    state = read_state(root)
    if state.get("salt_fingerprint") and state["salt_fingerprint"] != fingerprint(salt):
        raise ConfigError(
            f"the salt differs from the one dataset {root} was built with (keys would not match); "
            f"use the original salt or a new --out folder"
        )
