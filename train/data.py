"""Batch sources for the trainer, all yielding INTERFACES.md section 3's dict:

  {"crops": [ [B, n_g, 1, s_g, s_g] float32 per resolution group ], "modality": long [B],
   "label": float32 [B, L] (NaN = unknown), "labelled": bool [B]}

with rows ordered by modality in equal blocks. Every source is addressed by (epoch, step) so a
resumed run sees exactly the batches it would have seen: ``source.epoch_iter(epoch, start_step)``.
No source replays the steps before ``start_step``: the synthetic and NPZ sources compute any step
directly from (seed, epoch, step, rank); the shard source restores its DALI pipeline from the position
saved in the checkpoint (``data_position`` / ``restore_position``, gathered over ranks by the trainer).

- ``SyntheticSource``: random crops (benchmarks, smoke tests).
- ``NpzSource``: real images from MedMNIST-style .npz files (one file = one modality) with simple
  torch multi-crop augmentations (random resized crops, gamma, linear), seeded by (seed, epoch, step, rank).
- ``ShardSource``: the production path, ``augment_dali.loader.SwavLoader`` over a shard dataset.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shards.layout import DATASET_JSON

from .errors import DataError


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _labelled(label: torch.Tensor) -> torch.Tensor:
    if label.shape[1] == 0:
        return torch.zeros(label.shape[0], dtype=torch.bool)
    return torch.isfinite(label).any(dim=1)


class SyntheticSource:
    def __init__(self, batch_size: int, crop_sizes, num_crops, num_modalities: int = 1,
                 num_labels: int = 0, steps_per_epoch: int = 100, seed: int = 0, rank: int = 0,
                 crop_depths=()):
        if batch_size % num_modalities:
            raise ValueError(f"batch size {batch_size} is not a multiple of {num_modalities} modalities")
        self.batch_size, self.crop_sizes, self.num_crops = batch_size, tuple(crop_sizes), tuple(num_crops)
        self.modalities = [f"synthetic{m}" for m in range(num_modalities)]
        self.num_labels, self.steps_per_epoch, self.seed, self.rank = num_labels, steps_per_epoch, seed, rank
        self.shapes = [(d, s, s) for d, s in zip(crop_depths, crop_sizes)] if crop_depths else \
            [(s, s) for s in crop_sizes]

    def batch(self, epoch: int, step: int) -> dict:
        g = _generator(self.seed, epoch, step, self.rank)
        b, m = self.batch_size, len(self.modalities)
        crops = [torch.rand(b, n, 1, *shape, generator=g) for shape, n in zip(self.shapes, self.num_crops)]
        label = torch.randint(0, 2, (b, self.num_labels), generator=g).float()
        label[torch.rand(b, generator=g) < 0.5] = float("nan")   # half unlabelled
        return {"crops": crops, "modality": torch.arange(m).repeat_interleave(b // m),
                "label": label, "labelled": _labelled(label)}

    def epoch_iter(self, epoch: int, start_step: int = 0):
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


def multicrop(images: torch.Tensor, g: torch.Generator, crop_sizes, num_crops,
              min_scale, max_scale) -> list[torch.Tensor]:
    """Random resized crops + gamma / linear intensity of [N, H, W] images in [0, 1].

    Per crop: area fraction ~ U[min_scale, max_scale], aspect ratio ~ logU[3/4, 4/3], uniform position;
    gamma ~ U[1.8, 2.6] with probability 1/2; then a*I + b with a ~ U[0.9, 1.1], b ~ U[-0.2, 0.2] x the
    crop's intensity range (METHOD section 4, intensity augmentations).
    """
    n_img = images.shape[0]
    out = []
    for size, n, lo, hi in zip(crop_sizes, num_crops, min_scale, max_scale):
        total = n_img * n
        area = lo + (hi - lo) * torch.rand(total, generator=g)
        ratio = torch.exp((torch.rand(total, generator=g) - 0.5) * 2 * np.log(4 / 3))
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * torch.rand(total, generator=g) - 1)
        cy = (1 - h) * (2 * torch.rand(total, generator=g) - 1)
        theta = torch.zeros(total, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
        grid = F.affine_grid(theta, (total, 1, size, size), align_corners=False)
        src = images.repeat_interleave(n, dim=0)[:, None]
        x = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gamma = 1.8 + 0.8 * torch.rand(total, 1, 1, 1, generator=g)
        use_gamma = torch.rand(total, 1, 1, 1, generator=g) < 0.5
        x = torch.where(use_gamma, x.clamp(0, 1) ** gamma, x)
        span = (x.amax(dim=(2, 3), keepdim=True) - x.amin(dim=(2, 3), keepdim=True))
        a = 0.9 + 0.2 * torch.rand(total, 1, 1, 1, generator=g)
        b = (0.4 * torch.rand(total, 1, 1, 1, generator=g) - 0.2) * span
        out.append((a * x + b).view(n_img, n, 1, size, size))
    return out


class NpzSource:
    """MedMNIST-style .npz files (``{split}_images`` uint8 [N, H, W], ``{split}_labels`` [N, c]).

    Each file is one modality (named by its stem); label columns of all files are concatenated, the
    other files' columns being NaN. ``label_fraction`` keeps the labels of a fixed random subset only.
    Each process draws its own disjoint slice of a per-epoch permutation of every modality.
    """

    def __init__(self, paths, batch_size: int, crop_sizes, num_crops, min_scale, max_scale,
                 split: str = "train", seed: int = 0, rank: int = 0, world_size: int = 1,
                 label_fraction: float = 1.0):
        paths = [Path(p) for p in paths]
        if batch_size % len(paths):
            raise ValueError(f"batch size {batch_size} is not a multiple of {len(paths)} modalities")
        self.images, labels = [], []
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"NPZ data file not found: {p}")
            with np.load(p) as z:
                if f"{split}_images" not in z:
                    raise ValueError(f"{p}: no array '{split}_images' (has {sorted(z.files)})")
                self.images.append(torch.from_numpy(z[f"{split}_images"].astype(np.float32) / 255.0))
                lab = z[f"{split}_labels"] if f"{split}_labels" in z else np.zeros((len(self.images[-1]), 0))
                labels.append(lab.reshape(len(lab), -1).astype(np.float32))
        self.modalities = [p.stem for p in paths]
        self.num_labels = sum(l.shape[1] for l in labels)
        self.labels, col = [], 0
        for m, lab in enumerate(labels):
            full = np.full((len(lab), self.num_labels), np.nan, np.float32)
            keep = np.random.default_rng([seed, m]).random(len(lab)) < label_fraction
            full[keep, col:col + lab.shape[1]] = lab[keep]
            col += lab.shape[1]
            self.labels.append(torch.from_numpy(full))
        self.sub_batch = batch_size // len(paths)
        self.batch_size, self.crop_sizes, self.num_crops = batch_size, tuple(crop_sizes), tuple(num_crops)
        self.min_scale, self.max_scale = tuple(min_scale), tuple(max_scale)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = min(len(x) for x in self.images) // (self.sub_batch * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError("NPZ data set smaller than one global batch")
        self._perm_epoch, self._perms = None, None

    def _permutations(self, epoch: int):
        if self._perm_epoch != epoch:
            self._perms = [torch.randperm(len(x), generator=_generator(self.seed, epoch, m, 7))
                           for m, x in enumerate(self.images)]
            self._perm_epoch = epoch
        return self._perms

    def batch(self, epoch: int, step: int) -> dict:
        b = self.sub_batch
        start = (step * self.world_size + self.rank) * b
        idx = [perm[start:start + b] for perm in self._permutations(epoch)]
        images = torch.cat([x[i] for x, i in zip(self.images, idx)])
        label = torch.cat([y[i] for y, i in zip(self.labels, idx)])
        g = _generator(self.seed, epoch, step, self.rank)
        crops = multicrop(images, g, self.crop_sizes, self.num_crops, self.min_scale, self.max_scale)
        return {"crops": crops, "modality": torch.arange(len(self.images)).repeat_interleave(b),
                "label": label, "labelled": _labelled(label)}

    def epoch_iter(self, epoch: int, start_step: int = 0):
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


class ShardSource:
    """augment_dali's SwavLoader over a shard dataset (imported only here, only when used)."""

    prefetches = True  # DALI runs ahead on its own: no extra thread

    def __init__(self, root: str, batch_size: int, augment, modalities=(), split="train",
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: str = "cpu", num_threads: int = 2,
                 verify_shards: bool = True):
        try:
            from augment_dali.loader import DamagedShardError, SwavLoader
        except ImportError as e:
            raise DataError(f"cannot read shard dataset {root}: augment_dali.loader unavailable ({e})") from None
        try:
            self.loader = SwavLoader(root, batch_size=batch_size, modalities=list(modalities) or None,
                                     rank=rank, world_size=world_size, device="gpu" if device == "cuda" else "cpu",
                                     seed=seed, num_threads=num_threads, split=split, augment=augment,
                                     verify_shards=verify_shards)
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"{root}: {e}") from None
        self.damaged = DamagedShardError
        self.root = root
        self.modalities = list(self.loader.modalities)
        self.normalisation = self.loader.normalisation  # per modality: units, method, NormalizeConfig
        self.steps_per_epoch = len(self.loader)
        names = getattr(self.loader, "label_names", None)
        if names is None:
            info = Path(root, DATASET_JSON)
            names = json.loads(info.read_text()).get("label_names", []) if info.exists() else []
        self.num_labels = len(names)
        self._restored = None  # (epoch, step, loader checkpoint) to continue from, set by restore_position

    @property
    def batches_replayed(self) -> int:
        return self.loader.batches_replayed

    def data_position(self) -> bytes:
        """Where the running epoch stands (after its last yielded step): the loader's checkpoint."""
        return self.loader.checkpoint()

    def restore_position(self, epoch: int, start_step: int, position: bytes) -> None:
        """Make ``epoch_iter(epoch, start_step)`` continue from ``position`` instead of replaying."""
        self._restored = (epoch, start_step, position)

    def close(self) -> None:
        if hasattr(self.loader, "close"):
            self.loader.close()

    def epoch_iter(self, epoch: int, start_step: int = 0):
        # Without a restored position for this very step the loader replays and drops the first batches.
        position = None
        if self._restored is not None and self._restored[:2] == (epoch, start_step):
            position = self._restored[2]
        self._restored = None
        try:
            self.loader.set_epoch(epoch, start_step, position)
        except ValueError as e:  # e.g. augmentation options changed since the checkpoint: same steps, replayed
            print(f"warning: saved data position not usable ({e}); replaying {start_step} steps",
                  file=sys.stderr, flush=True)
            self.loader.set_epoch(epoch, start_step)
        try:
            yield from self.loader
        except self.damaged as e:  # stop before reading it: training on damaged pixels is silently wrong
            raise DataError(f"{e}. `python -m shards verify {self.root}` lists every damage; "
                             f"--no-verify-shards skips this check") from None


def gather_data_positions(source, world_size: int) -> list[torch.Tensor] | None:
    """Every process's data position mid-epoch, rank by rank, as uint8 tensors (a checkpoint loadable
    with ``torch.load(weights_only=True)``); None for sources that need none. Collective when
    ``world_size > 1``: every process calls it at the same step."""
    if not hasattr(source, "data_position"):
        return None
    mine = source.data_position()
    positions = [mine]
    if world_size > 1:
        import torch.distributed as dist

        positions = [None] * world_size
        dist.all_gather_object(positions, mine)
    return [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in positions]


def build_source(cfg, rank: int, world_size: int, device: str):
    if cfg.synthetic:
        return SyntheticSource(cfg.batch_size, cfg.crop_sizes, cfg.num_crops, cfg.synthetic_modalities,
                               cfg.synthetic_labels, cfg.synthetic_steps, seed=cfg.seed, rank=rank,
                               crop_depths=cfg.crop_depths)
    paths = [p for p in cfg.data.split(",") if p]
    if all(p.endswith(".npz") for p in paths):
        try:
            return NpzSource(paths, cfg.batch_size, cfg.crop_sizes, cfg.num_crops, cfg.min_scale_crops,
                             cfg.max_scale_crops, split=cfg.split, seed=cfg.seed, rank=rank,
                             world_size=world_size, label_fraction=cfg.npz_label_fraction)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"--data {cfg.data}: {e}") from None
    if not Path(cfg.data).is_dir():
        raise DataError(f"--data {cfg.data}: not a shard dataset folder nor .npz files")
    return ShardSource(cfg.data, cfg.batch_size, cfg.augment, cfg.modalities, cfg.split,
                       cfg.seed, rank, world_size, device, cfg.num_workers,
                       verify_shards=cfg.verify_shards)


class Prefetcher:
    """Runs an iterator ``depth`` batches ahead in a thread (overlaps augmentation with the step)."""

    _END = object()

    def __init__(self, iterator, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self._thread.start()

    def _fill(self, iterator):
        try:
            for item in iterator:
                self._q.put(item)
        except BaseException as e:  # surfaced in the training thread
            self._q.put(e)
        self._q.put(self._END)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
