"""CRC-32 (the zlib / gzip polynomial) of shard members and whole tars.

Every byte ingested is checksummed twice (its member, and the whole tar), so the implementation matters:
ISA-L's (package `isal`) runs at ~50 GB/s on this project's machines against zlib's ~4 GB/s, and gives
identical values. Where `isal` has no wheel, zlib computes the same checksums, only slower.
"""
from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - platforms without an isal wheel
    from zlib import crc32

__all__ = ["crc32"]
