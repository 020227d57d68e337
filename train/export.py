"""Export the pretrained backbone of a training checkpoint for downstream use.

    python -m train.export runs/swav/checkpoint.pt --out backbone.pt

The file holds {"arch", "num_features", "state_dict", "step", "modalities", "normalisation"}; load it
with ``load_backbone(path)`` (builds the encoder named in the file) or ``load_backbone(path, arch=...)``
(refuses another architecture with an error naming both). "normalisation" maps each pretraining modality
to how its pixels were scaled to [0, 1] (augment_dali.normalize.normalisation_record: units, method and
the NormalizeConfig); `backbone_normalisation(path)` reads it so that downstream inputs are scaled the
same way (None for backbones of runs without a shard dataset, or exported before it was recorded).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .models import build_encoder

PREFIX = "backbone."


def export_backbone(checkpoint: Path, out: Path) -> dict:
    from .checkpoint import load, save_atomic
    from .errors import CheckpointError
    state = load(checkpoint)
    if "model" not in state or "arch" not in state:
        raise CheckpointError(f"{checkpoint} is not a medswav training checkpoint (no model/arch)")
    weights = {k[len(PREFIX):]: v for k, v in state["model"].items() if k.startswith(PREFIX)}
    encoder = build_encoder(state["arch"])
    encoder.load_state_dict(weights)  # proves the export loads before writing it
    blob = {"arch": state["arch"], "num_features": encoder.num_features, "state_dict": weights,
            "step": state.get("step"), "modalities": state.get("modalities"),
            "normalisation": state.get("normalisation")}
    save_atomic(blob, Path(out))
    return blob


def _read(path: str | Path, map_location="cpu") -> dict:
    from .checkpoint import load_plain

    blob = load_plain(Path(path), map_location, what="backbone export")
    if not isinstance(blob, dict) or "arch" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a medswav backbone export (run python -m train.export)")
    return blob


def backbone_normalisation(path: str | Path) -> dict | None:
    """The pretraining normalisation stored in a backbone export: {modality: normalisation record}."""
    return _read(path).get("normalisation")


def load_backbone(path: str | Path, arch: str | None = None, map_location="cpu") -> torch.nn.Module:
    """Only tensors and plain values are unpickled (weights_only): a file that holds more is refused."""
    blob = _read(path, map_location)
    if arch is not None and arch != blob["arch"]:
        raise ValueError(f"{path} holds {blob['arch']} weights; they cannot be loaded into {arch}")
    encoder = build_encoder(blob["arch"])
    encoder.load_state_dict(blob["state_dict"])
    return encoder


def main(argv: list[str] | None = None) -> None:
    from .errors import TrainError

    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="training checkpoint (run folder's checkpoint.pt)")
    parser.add_argument("--out", type=Path, required=True, help="output file for the backbone weights")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        raise SystemExit(f"error: no such checkpoint: {args.checkpoint}")
    try:
        blob = export_backbone(args.checkpoint, args.out)
    except TrainError as e:  # a damaged, unsafe or foreign checkpoint: one line, exit status 1
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {blob['arch']} backbone ({len(blob['state_dict'])} tensors, "
          f"{blob['num_features']} features) from step {blob['step']}")


if __name__ == "__main__":
    main()
