"""Salted hashes: the only form in which identifiers reach shards and manifests.

A keyed BLAKE2b makes the hashes stable for one salt (resume, incremental ingestion and deduplication
all rely on that) while a party without the salt cannot confirm a guessed UID or patient ID.
"""
from __future__ import annotations

import hashlib

HASH_HEX = 32  # salted_hash length in hex characters (128 bits)
KEY_HEX = 24   # sample key length in hex characters (96 bits: no collision in 1e9 samples in practice)


def _salt_bytes(salt: bytes | str) -> bytes:
    raw = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    if not raw:
        raise ValueError("the salt is empty: set one (see shards/FORMAT.md, 'Privacy')")
    # BLAKE2b keys are limited to 64 bytes; a longer salt is first condensed.
    return raw if len(raw) <= 64 else hashlib.blake2b(raw).digest()


def salted_hash(value: object, salt: bytes | str) -> str:
    """Hex digest of `value` keyed with `salt`; "" for None or an empty value."""
    if value is None:
        return ""
    text = str(value).strip()
    if not text:
        return ""
    return hashlib.blake2b(text.encode("utf-8"), key=_salt_bytes(salt), digest_size=HASH_HEX // 2).hexdigest()


def sample_key(sop_instance_uid: str, frame: int, salt: bytes | str) -> str:
    """Dot-free, stable sample key for one frame of one SOP instance.

    WebDataset and DALI split a member name at its first dot, so a DICOM UID cannot be a key as is.
    """
    if not sop_instance_uid:
        raise ValueError("a sample key needs a SOPInstanceUID")
    text = f"{sop_instance_uid.strip()}/{int(frame)}"
    return hashlib.blake2b(
        text.encode("utf-8"), key=_salt_bytes(salt), digest_size=KEY_HEX // 2, person=b"medswav-key"
    ).hexdigest()
