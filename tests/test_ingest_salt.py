"""The salt: strong enough, never testable from the dataset folder, one per dataset, race-free."""
from __future__ import annotations

import json

import pytest

from _ingest_fixtures import cli, manifest_rows, run_ingest

OTHER_STRONG_SALT = "9f4c2e7a1b8d3f60a5c7e9b2d4f6a8c0"


@pytest.fixture(scope="module")
def generated(tmp_path_factory, dicom_dir):
    """The real CT series ingested with no salt given: the salt is generated into DATASET.salt."""
    import os

    out = tmp_path_factory.mktemp("salt") / "ds"
    saved = os.environ.pop("MEDSWAV_SALT", None)
    try:
        run_ingest([dicom_dir / "ct_kits_abdomen_18"], out, salt=None)
    finally:
        if saved is not None:
            os.environ["MEDSWAV_SALT"] = saved
    return out


def _legacy_fingerprint(salt: str) -> str:
    """What datasets published before: a 64-bit keyed hash of a constant, testable against any guess."""
    from shards import salted_hash

    return salted_hash("medswav salt fingerprint", salt)[:16]


@pytest.mark.parametrize("weak", ["x", "medswav", "aaaaaaaaaaaaaaaaaaaaaaaa", "passwordpassword"])
def test_weak_salt_is_refused_with_status_2(tmp_path, dicom_dir, weak):
    r = cli(dicom_dir / "ct_kits_abdomen_18", "--out", tmp_path / "ds", "--salt", weak, "--no-progress",
            env_extra={"MEDSWAV_SALT": ""}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("ingest:")]
    assert len(lines) == 1 and "salt is too weak" in lines[0], r.stderr
    assert not (tmp_path / "ds" / "shards").exists()


def test_dataset_folder_holds_nothing_to_test_a_salt_against(generated):
    salt = generated.with_name("ds.salt").read_text().strip()
    blobs = {p: p.read_bytes() for p in generated.rglob("*") if p.is_file()}
    assert manifest_rows(generated) and blobs
    for path, data in blobs.items():
        assert _legacy_fingerprint(salt).encode() not in data, path
        assert b"salt" not in data or path.suffix not in (".json",), path
    for name in ("dataset.json", "ingest.json"):
        info = json.loads((generated / name).read_text())
        assert not [k for k in json.dumps(info).split('"') if "salt" in k], name
    # The check that refuses another salt lives beside the dataset, with the salt, and is a slow KDF of a
    # random nonce: it never travels with the dataset folder.
    check = json.loads(generated.with_name("ds.salt-check").read_text())
    assert check["kdf"] == "scrypt" and check["n"] >= 2**14 and len(bytes.fromhex(check["nonce"])) >= 16


def test_rerun_with_another_strong_salt_is_refused(generated, dicom_dir):
    r = cli(dicom_dir / "ct_kits_abdomen_18", "--out", generated, "--salt", OTHER_STRONG_SALT, "--no-progress",
            env_extra={"MEDSWAV_SALT": ""}, timeout=120)
    assert r.returncode == 2 and "salt differs" in r.stderr, r.stderr


def test_legacy_fingerprint_is_still_checked_then_no_longer_published(generated, tmp_path):
    import shutil

    from ingest.config import ConfigError
    from ingest.salt import resolve_salt

    root = tmp_path / "old"
    shutil.copytree(generated, root)
    salt = generated.with_name("ds.salt").read_text().strip()
    state = json.loads((root / "ingest.json").read_text())
    (root / "ingest.json").write_text(json.dumps({**state, "salt_fingerprint": _legacy_fingerprint(salt)}))
    with pytest.raises(ConfigError, match="salt differs"):
        resolve_salt(root, OTHER_STRONG_SALT)
    assert resolve_salt(root, salt)[0] == salt
    assert "salt_fingerprint" not in json.loads((root / "ingest.json").read_text())
    assert root.with_name("old.salt-check").exists()
    with pytest.raises(ConfigError, match="salt differs"):
        resolve_salt(root, OTHER_STRONG_SALT)


def test_two_first_runs_racing_for_the_salt_file_share_the_winners_salt(tmp_path, monkeypatch):
    """The loser of the race finds the file created between its look and its own create."""
    import secrets

    from ingest import salt as salt_module

    root = tmp_path / "ds"
    monkeypatch.delenv("MEDSWAV_SALT", raising=False)
    winner = secrets.token_hex(32)
    real_token_hex = secrets.token_hex

    def other_run_wins(n):
        salt_module.salt_file(root).write_text(winner + "\n")  # the other run commits first
        return real_token_hex(n)

    monkeypatch.setattr(salt_module.secrets, "token_hex", other_run_wins)
    salt, origin = salt_module.resolve_salt(root, None)
    assert salt == winner and "ds.salt" in origin


def test_damaged_check_file_is_a_clear_error(tmp_path):
    from ingest.config import ConfigError
    from ingest.salt import check_file, resolve_salt

    root = tmp_path / "ds"
    assert resolve_salt(root, OTHER_STRONG_SALT)[0] == OTHER_STRONG_SALT  # first use records the check
    assert resolve_salt(root, OTHER_STRONG_SALT)[0] == OTHER_STRONG_SALT
    check_file(root).write_text('{"kdf": "scrypt", "nonce": "zz"')
    with pytest.raises(ConfigError, match="salt check file .* is damaged"):
        resolve_salt(root, OTHER_STRONG_SALT)
