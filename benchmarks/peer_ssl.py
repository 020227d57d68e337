"""Peer pretraining arms of `benchmarks.representation`: lightly's SwAV and SimCLR with their stock heads,
losses, optimisers and augmentations, on medswav's own ResNet-18, for a wall-clock budget.

    .venv-peer/bin/python -m benchmarks.peer_ssl {swav,simclr} --data X.npz --budget 240 --out backbone.pt

Runs in the peer environment (`make bench-peer-env`: torch 2.14.1 + torchvision 0.29.1 + lightly), never in
medswav's: lightly needs torchvision, whose wheel here does not match medswav's CPU torch. It imports only
torch, torchvision, lightly, numpy and `train.models` (pure torch), so that every arm trains the very same
encoder (`train.models.build_encoder`: 1-channel input, 7x7/2 stem + max-pool, 512 features).

Images: the npz's train split, labels unused, as 1-channel PIL images; lightly's transforms with
`normalize=None` give tensors in [0, 1] (uint8 / 255), the scaling the probe then feeds these encoders. The crop
sizes are lightly's stock ones scaled to 28-pixel images (SimCLR 224 -> 28; SwAV 224/96 -> 28/12).
The output is a backbone file in `python -m train.export`'s format; the last line printed is a JSON
summary (steps, seconds, images_per_s, cpu_s: CPU seconds of all the process's threads).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Stock recipes of lightly's examples (SimCLR: batch 256, SGD lr 0.06 momentum 0.9; SwAV: batch 128,
# Adam lr 1e-3, 512 prototypes, 2 high- + 6 low-resolution crops), crop sizes scaled to 28 px.
RECIPES = {
    "simclr": {"batch_size": 256, "input_size": 28},
    "swav": {"batch_size": 128, "crop_sizes": (28, 12), "crop_counts": (2, 6), "n_prototypes": 512},
}


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform):
        from PIL import Image

        self.pil = [Image.fromarray(np.asarray(im, dtype=np.uint8), mode="L") for im in images]
        self.transform = transform

    def __len__(self):
        return len(self.pil)

    def __getitem__(self, i):
        return self.transform(self.pil[i])


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module):
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, 512, 128)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class SwaV(nn.Module):
    def __init__(self, backbone: nn.Module, n_prototypes: int):
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(backbone.num_features, 512, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=n_prototypes)

    def forward(self, x):
        z = nn.functional.normalize(self.projection_head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)
        return self.prototypes(z)


def _setup(method: str, images: np.ndarray, seed: int):
    from train.models import build_encoder

    torch.manual_seed(seed)
    backbone = build_encoder("resnet18")
    recipe = RECIPES[method]
    if method == "simclr":
        from lightly.loss import NTXentLoss
        from lightly.transforms.simclr_transform import SimCLRTransform

        model = SimCLR(backbone)
        transform = SimCLRTransform(input_size=recipe["input_size"], normalize=None)
        criterion = NTXentLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)

        def loss_of(views):
            return criterion(model(views[0]), model(views[1]))
    else:
        from lightly.loss import SwaVLoss
        from lightly.transforms.swav_transform import SwaVTransform

        model = SwaV(backbone, recipe["n_prototypes"])
        transform = SwaVTransform(crop_sizes=recipe["crop_sizes"], crop_counts=recipe["crop_counts"], normalize=None)
        criterion = SwaVLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def loss_of(views):
            model.prototypes.normalize()
            outputs = [model(v) for v in views]
            n_high = recipe["crop_counts"][0]
            return criterion(outputs[:n_high], outputs[n_high:])

    loader = torch.utils.data.DataLoader(
        _Images(images, transform), batch_size=recipe["batch_size"], shuffle=True, drop_last=True,
        num_workers=0, generator=torch.Generator().manual_seed(seed))
    return model, backbone, loader, optimizer, loss_of


def pretrain(method: str, images: np.ndarray, budget_s: float, seed: int = 0, max_steps: int = 0) -> dict:
    """Train until the step that spends `budget_s` seconds (data loading included); returns the backbone."""
    model, backbone, loader, optimizer, loss_of = _setup(method, images, seed)
    model.train()
    steps, seen, losses = 0, 0, []
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        for views in loader:
            loss = loss_of(views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(views[0])
            losses.append(float(loss.detach()))
            if time.perf_counter() - start >= budget_s or (max_steps and steps >= max_steps):
                seconds = time.perf_counter() - start
                return {"backbone": backbone, "steps": steps, "seconds": seconds, "images_per_s": seen / seconds,
                        "cpu_s": time.process_time() - cpu_start,
                        "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_ssl", description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=sorted(RECIPES))
    p.add_argument("--data", required=True, help="MedMNIST-layout .npz (its train_images are used)")
    p.add_argument("--budget", type=float, required=True, help="wall-clock seconds of pretraining")
    p.add_argument("--out", type=Path, required=True, help="backbone file to write (train.export format)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the cores every arm gets)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with np.load(args.data) as archive:
        if "train_images" not in archive or archive["train_images"].ndim != 3:
            raise SystemExit(f"error: {args.data}: no grey-level train_images [N, H, W] (MedMNIST layout)")
        images = archive["train_images"]
    result = pretrain(args.method, images, args.budget, args.seed)
    backbone = result.pop("backbone")
    blob = {"arch": "resnet18", "num_features": backbone.num_features, "state_dict": backbone.state_dict(),
            "step": result["steps"], "modalities": None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, args.out)
    print(json.dumps({"method": args.method, "torch": torch.__version__, **result}))


if __name__ == "__main__":
    main()
