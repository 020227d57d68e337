"""DALI's webdataset index (`.idx`, version v1.2), written by us as the tar is written.

Format, as read by `nvidia.dali.fn.readers.webdataset`: a first line `v1.2 <number of samples>`, then one
line per sample listing each member as `<extension> <data offset> <size> <member name>`, members in
tar order. Offsets point at the member's data, after its header block(s).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .layout import split_member

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    name: str      # full member name, "<key>.<extension>"
    offset: int    # byte offset of the member's data in the tar
    size: int      # data size in bytes

    @property
    def key(self) -> str:
        return split_member(self.name)[0]

    @property
    def extension(self) -> str:
        return split_member(self.name)[1]


def format_index_lines(lines: list[str]) -> str:
    """An index file's text from its sample lines (as `read_index_lines` returns them)."""
    return "\n".join([f"{INDEX_VERSION} {len(lines)}", *lines]) + "\n"


def format_index(samples: list[list[Member]]) -> str:
    return format_index_lines([" ".join(f"{m.extension} {m.offset} {m.size} {m.name}" for m in members)
                               for members in samples])


def write_index(path: str | os.PathLike, samples: list[list[Member]]) -> None:
    """Plain write; ShardWriter makes it durable and atomic (shards.atomic)."""
    Path(path).write_text(format_index(samples), encoding="ascii")


def _header_and_lines(path: str | os.PathLike) -> tuple[int, list[str]]:
    lines = Path(path).read_text(encoding="ascii").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"{path}: expected a '{INDEX_VERSION} N' header, found {lines[0]!r}")
    return int(head[1]), lines


def read_index_lines(path: str | os.PathLike) -> list[str]:
    """The sample lines of an index, unparsed (a derived index of some of the samples copies them)."""
    return _header_and_lines(path)[1][1:]


def read_index(path: str | os.PathLike) -> list[list[Member]]:
    count, lines = _header_and_lines(path)
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{path}:{number}: expected groups of 'ext offset size name'")
        samples.append([Member(parts[i + 3], int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)])
    if len(samples) != count:
        raise ValueError(f"{path}: header announces {count} samples, found {len(samples)}")
    return samples
