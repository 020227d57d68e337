"""DALI's webdataset index (`.idx`, version v1.2), written by us as the tar is written.

Format, as read by `nvidia.dali.fn.readers.webdataset`: a first line `v1.2 <number of samples>`, then one
line per sample listing each member as `<extension> <data offset> <size> <member name>`, members in
tar order. Offsets point at the member's data, after its header block(s).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    name: str      # full member name, "<key>.<extension>"
    offset: int    # byte offset of the member's data in the tar
    size: int      # data size in bytes

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def extension(self) -> str:
        return self.name.split(".", 1)[1]


def format_index(samples: list[list[Member]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{m.extension} {m.offset} {m.size} {m.name}" for m in members))
    return "\n".join(lines) + "\n"


def write_index(path: str | os.PathLike, samples: list[list[Member]], sync: bool = False) -> None:
    """sync=True: durable on return (the writer commits the manifest part only after the index)."""
    with open(path, "w", encoding="ascii") as f:
        f.write(format_index(samples))
        if sync:
            f.flush()
            os.fsync(f.fileno())


def read_index(path: str | os.PathLike) -> list[list[Member]]:
    lines = Path(path).read_text(encoding="ascii").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"{path}: expected a '{INDEX_VERSION} N' header, found {lines[0]!r}")
    count = int(head[1])
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{path}:{number}: expected groups of 'ext offset size name'")
        samples.append([Member(parts[i + 3], int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)])
    if len(samples) != count:
        raise ValueError(f"{path}: header announces {count} samples, found {len(samples)}")
    return samples
