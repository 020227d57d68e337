"""Where the salt of a dataset comes from, and why it never lives inside the dataset.

Every identifier (UIDs, patient ID, source path) reaches shards and manifests only as a keyed BLAKE2b
with this salt. Patient IDs and UIDs are guessable, so whoever holds the salt can test a guess against
the hashes: the salt must stay with the dataset's owner, not travel with the data.

Precedence: `--salt` > environment `MEDSWAV_SALT` > `salt` in the TOML config > the salt file
`<DATASET>.salt` next to (not inside) the dataset folder. When none exists, a random 256-bit salt is
generated into that file (mode 0600): copying or publishing the dataset folder does not copy the salt,
and a rerun (resume, incremental) finds it again, so keys stay stable. Two first runs racing to create
it agree on one salt: the file appears complete or not at all (hard link of a written temporary), and
the loser reads the winner's.

A salt must be strong (at least MIN_SALT_CHARS characters, MIN_DISTINCT_CHARS of them different): with
a guessable salt, a guessable identifier (patient ID, UID) can be tested against the hashes. A
generated salt is 64 hex digits.

So that a rerun with another salt is refused instead of silently producing different keys, a check
record is kept BESIDE the dataset, in `<DATASET>.salt-check`: a random nonce and scrypt(salt, nonce),
a slow KDF. Nothing inside the dataset folder can be used to test a guessed salt. Datasets built
before this carry a fast fingerprint of the salt in `ingest.json` (and `dataset.json`): it is still
accepted as the check (then replaced by the check file and dropped from `ingest.json`; `dataset.json`
loses it when the run rewrites it), and it is no longer written.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from .config import ConfigError

ENV = "MEDSWAV_SALT"
STATE_FILE = "ingest.json"


MIN_SALT_CHARS = 16
MIN_DISTINCT_CHARS = 8
LEGACY_FINGERPRINT = "salt_fingerprint"  # the key older versions wrote to ingest.json and dataset.json
SCRYPT = {"n": 2**14, "r": 8, "p": 1}    # ~16 MB and tens of ms per try: slow to test guesses against


def beside(root: Path, suffix: str) -> Path:
    """`<DATASET><suffix>` next to (not inside) the dataset folder: what must not travel with the data."""
    root = Path(root).resolve()
    return root.with_name(root.name + suffix)


def salt_file(root: Path) -> Path:
    return beside(root, ".salt")


def check_file(root: Path) -> Path:
    return beside(root, ".salt-check")


def require_strong(salt: str, origin: str) -> None:
    if len(salt) < MIN_SALT_CHARS or len(set(salt)) < MIN_DISTINCT_CHARS:
        raise ConfigError(
            f"the salt is too weak (from {origin}): use at least {MIN_SALT_CHARS} characters with at least "
            f"{MIN_DISTINCT_CHARS} different ones (e.g. `openssl rand -hex 32`), or give none to have one "
            f"generated into DATASET.salt next to the dataset folder")


def _legacy_fingerprint(salt: str) -> str:
    from shards import salted_hash

    return salted_hash("medswav salt fingerprint", salt)[:16]


def _kdf(salt: str, nonce: bytes, n: int, r: int, p: int) -> str:
    return hashlib.scrypt(salt.encode("utf-8"), salt=nonce, n=n, r=r, p=p, maxmem=64 * 2**20, dklen=32).hex()


def _create_once(path: Path, text: str) -> bool:
    """Create `path` holding `text`, complete or not at all (written to a temporary, then hard-linked,
    which fails if the name exists). False when another process created it first."""
    from shards.atomic import write_atomically

    def write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:  # never readable by others
            f.write(text)

    return write_atomically(path, write, exclusive=True)


def _read_complete(path: Path, timeout: float = 10.0) -> str:
    """The stripped content of a file another process creates; waits while it is still empty (a writer
    of an older version creates the name first and writes after)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text().strip()
        if text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def resolve_salt(root: Path, cli_salt: str | None) -> tuple[str, str]:
    """Return (salt, where it came from); create the salt file if no salt is given anywhere."""
    if cli_salt:
        salt, origin = cli_salt, "--salt, MEDSWAV_SALT or the config file"
    elif os.environ.get(ENV):
        salt, origin = os.environ[ENV], f"environment {ENV}"
    elif salt_file(root).exists():
        salt, origin = _read_complete(salt_file(root)), f"file {salt_file(root)}"
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
        if _create_once(path, salt + "\n"):
            origin = f"new file {path}"
        else:  # another first run won the race: use its salt, or the two would write different keys
            salt, origin = _read_complete(path), f"file {path} (created by a concurrent run)"
            if not salt:
                raise ConfigError(f"salt file {path} is empty")
    require_strong(salt, origin)
    check_salt(root, salt)
    return salt, origin


def read_state(root: Path) -> dict:
    path = Path(root) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(root: Path, state: dict) -> None:
    from shards.atomic import write_text_atomically

    write_text_atomically(Path(root) / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _differs(root: Path) -> ConfigError:
    return ConfigError(
        f"the salt differs from the one dataset {root} was built with (keys would not match); "
        f"use the original salt or a new --out folder")


def check_salt(root: Path, salt: str) -> None:
    """Refuse a salt other than the dataset's; record the check beside the dataset on first use."""
    path = check_file(root)
    if path.exists():
        try:
            record = json.loads(_read_complete(path))
            if record["kdf"] != "scrypt":
                raise ValueError(f"unknown kdf {record['kdf']!r}")
            expected = _kdf(salt, bytes.fromhex(record["nonce"]), record["n"], record["r"], record["p"])
            same = hmac.compare_digest(expected, str(record["check"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"salt check file {path} is damaged; restore it, or remove it to accept "
                              f"the given salt unchecked") from None
        if not same:
            raise _differs(root)
    state = read_state(root)
    legacy = state.get(LEGACY_FINGERPRINT)
    if legacy and not hmac.compare_digest(legacy, _legacy_fingerprint(salt)):
        raise _differs(root)
    if not path.exists():
        nonce = secrets.token_bytes(16)
        record = {"kdf": "scrypt", **SCRYPT, "nonce": nonce.hex(), "check": _kdf(salt, nonce, **SCRYPT)}
        path.parent.mkdir(parents=True, exist_ok=True)
        if not _create_once(path, json.dumps(record) + "\n"):
            check_salt(root, salt)  # a concurrent first run recorded its salt: hold ours against it
            return
    if legacy:  # migrated: the check file now holds the check, the dataset stops publishing one
        write_state(root, {k: v for k, v in state.items() if k != LEGACY_FINGERPRINT})
