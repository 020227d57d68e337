"""`SwavLoader`: modality-balanced multi-crop batches from a dataset folder (INTERFACES.md section 3).

    loader = SwavLoader("DATASET", batch_size=32, rank=rank, world_size=world, device="gpu", seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for step in loader:            # len(loader) steps, the same number on every rank
            crops = step["crops"]      # [B, n_g, 1, s_g, s_g] per resolution group ([B, n_g, 1, d_g, s_g, s_g]
                                       # for a volume dataset)
            step["modality"], step["label"], step["labelled"]

Epoch semantics (see augment_dali.plan): every modality contributes B/M samples per step; an epoch is
one pass over the smallest modality's per-rank share, len = min_m (N_m // W) // (B / M), where N_m
counts the requested split. Within an epoch no sample repeats on a rank and ranks read disjoint
samples; larger modalities are read from a part of their data that moves every epoch (the shard order
is redrawn from (seed, epoch, modality)). Epoch e is a function of (seed, e, rank, world_size) only:
`set_epoch(e)` on a fresh loader reproduces it. Without `set_epoch`, each new iteration moves on to the
next epoch.

Mid-epoch resume without replay: during an iteration, `loader.checkpoint()` is the position after the
last step it yielded (a DALI pipeline checkpoint: reader positions and every random generator, a few
tens of KB whatever the data size). `set_epoch(e, start_step=s, checkpoint=c)` on a fresh loader (same
dataset, seed, rank, world size and augmentation) then yields steps s..len-1 of epoch e exactly as an
uninterrupted run would; the earlier steps are neither augmented nor decoded (DALI's readers skip
through the index and read only the few samples still in their shuffle buffer). Without `checkpoint`,
or if DALI refuses it (warning), the first s steps are run and dropped (`batches_replayed` counts them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from shards import Dataset
from shards.layout import DATASET_JSON, manifest_dir, shard_dir, split_member
from shards.verify import DamagedShardError, check_tar

from .config import AugmentConfig
from .normalize import modality_units, normalisation_record
from .pipeline import Branch, build_pipeline
from .plan import EpochPlanner, steps_per_epoch as natural_steps
from .sampling import dataset_kind
from .stats import load_energy_stats


def _derive_seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _copy_into(tensor_list, out, device_id: int | None) -> None:
    """Copy a uniform-shape float32 DALI TensorList into the torch tensor `out` (same shape).

    GPU: a non-blocking copy queued on torch's current stream of the device. DALI makes that stream wait
    until the pipeline has produced the data and keeps its buffer from being reused before the copy has
    run (copy_to_external, non-blocking), so neither side needs a host synchronisation; work the
    consumer queues on the same stream sees the finished copy.
    """
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    if device_id is None:
        feed_ndarray(dense, out)
    else:
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))


def _labels_from_raw(tensor_list, n_labels: int) -> np.ndarray:
    """Raw `.labels.npy` bytes -> float32 [n, L]; a missing member (empty) -> NaN (unknown).

    The .npy data of a float32 vector [L] are its last 4 * L bytes, whatever the header length.
    """
    out = np.full((len(tensor_list), n_labels), np.nan, np.float32)
    for i in range(len(tensor_list)):
        raw = np.asarray(tensor_list[i])
        if raw.size >= 4 * n_labels > 0:
            out[i] = np.frombuffer(raw[-4 * n_labels:].tobytes(), dtype="<f4")
    return out


def _keys(tensor_list) -> list[str]:
    """Sample keys from DALI's source_info ("<tar>:<offset>:<key>.npy")."""
    return [split_member(bytes(np.asarray(tensor_list[i])).decode().rsplit(":", 1)[-1])[0]
            for i in range(len(tensor_list))]


class SwavLoader:
    """Iterable of balanced multi-crop steps; see the module docstring for the epoch semantics.

    `augment` holds every augmentation parameter (AugmentConfig, METHOD defaults); `crop_sizes` and
    `num_crops`, when given, override its crops. `split=None` reads every split. `num_threads` is the
    size of the one DALI pipeline's thread pool (all modalities share it). `cache_dir` receives the
    derived index files (default: a temporary folder removed by `close()`). `with_keys` adds the
    sample keys to each step (tests, debugging). `pin_memory` (CPU loader only) returns the crops in
    page-locked memory, so that `.to("cuda", non_blocking=True)` is a truly asynchronous copy.

    `verify_shards` (default on): before a shard is first read by this loader, its tar's size and
    whole-file CRC-32 are checked against its manifest part (shards.verify.check_tar), and a damaged or
    missing shard raises DamagedShardError naming it. Each rank checks only the shards it reads, each
    once per loader (cost: one sequential read of the rank's share, spread over the epochs that first
    touch each shard). Tars on disk without a manifest part are never read; they are reported by a
    warning when the loader is made.
    """

    def __init__(self, dataset_root, batch_size: int, modalities: list[str] | None = None, rank: int = 0,
                 world_size: int = 1, device: str = "cpu", seed: int = 0, crop_sizes=None,
                 num_crops=None, num_threads: int = 2, split: str | None = "train",
                 augment: AugmentConfig | None = None, device_id: int | None = None,
                 steps_per_epoch: int | None = None, initial_fill: int = 1024, prefetch: int = 2,
                 cache_dir: str | None = None, with_keys: bool = False, pin_memory: bool = False,
                 verify_shards: bool = True):
        self.root = Path(dataset_root)
        self.dataset = Dataset(self.root)
        available = self.dataset.modalities
        if not available:
            raise ValueError(f"{self.root}: no committed shards (run `python -m ingest` first)")
        requested = list(modalities) if modalities else available
        unknown = [m for m in requested if m not in available]
        if unknown:
            raise ValueError(f"modalities {unknown} not in {self.root}; available: {', '.join(available)}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu":
            import augment_dali

            if not augment_dali.plugin_has_cuda():
                raise ValueError("device='gpu' needs the medswav plugin built with its CUDA backend (nvcc was not "
                                 "found when it was built): rebuild with nvcc on PATH, "
                                 "`python -m augment_dali.build --force`, or use device='cpu'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if batch_size <= 0 or batch_size % len(requested):
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the number of "
                             f"modalities ({len(requested)}: {', '.join(requested)})")
        self.modalities = requested
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.per_modality = batch_size // len(requested)
        if device == "gpu" and device_id is None:
            import torch

            device_id = torch.cuda.current_device()
        self.device, self.device_id, self.seed = device, (device_id if device == "gpu" else None), seed
        self.num_threads, self.prefetch, self.initial_fill = num_threads, prefetch, initial_fill
        self.with_keys = with_keys
        self.pin_memory = bool(pin_memory) and device == "cpu"
        self.verify_shards = verify_shards
        self._checked: set[str] = set()  # tars whose checksum passed (one entry per shard, not per sample)
        config = augment or AugmentConfig()
        if crop_sizes is not None or num_crops is not None:
            config = dataclasses.replace(config, crop_sizes=tuple(crop_sizes or config.crop_sizes),
                                         num_crops=tuple(num_crops or config.num_crops))
        self.config = config
        self.volumes = dataset_kind(self.root, self.dataset) == "volumes"
        if self.volumes and not config.volumes:
            raise ValueError(f"{self.root} holds volumes: the augmentation needs crop depths "
                             f"(augment.crop_depths, one per crop group; configs/swav_3d_ct.toml)")
        if config.volumes and not self.volumes:
            raise ValueError(f"{self.root} holds 2-D slices, but the augmentation has crop depths "
                             f"{list(config.crop_depths)} (3-D): drop augment.crop_depths")
        self.units = {m: modality_units(self.dataset.units(m)) for m in self.modalities}
        self.stats = self._check_stats(load_energy_stats(self.root))
        # dataset.json holds them: reading them from a manifest part would list every part first
        info = self.dataset.info if (self.root / DATASET_JSON).exists() else {}
        self.label_names = info["label_names"] if "label_names" in info else self.dataset.label_names()

        self._own_cache = cache_dir is None
        self._cache = Path(cache_dir) if cache_dir else None  # a temporary folder, made on first use
        self._planners = {m: EpochPlanner(self.dataset, m, split, self._cache) for m in requested}
        self._warn_uncommitted()
        counts = {m: p.selected for m, p in self._planners.items()}
        natural = natural_steps(counts, world_size, self.per_modality)
        if natural == 0:
            small = min(counts, key=counts.get)
            raise ValueError(f"modality {small!r} has {counts[small]} {split or ''} samples: fewer than "
                             f"world_size x batch_size / M = {world_size * self.per_modality}; no full step")
        if steps_per_epoch is not None and not 0 < steps_per_epoch <= natural:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} outside [1, {natural}] (more would repeat "
                             "samples of the smallest modality within an epoch)")
        self._steps = steps_per_epoch or natural
        self.samples_per_modality = counts
        self.epoch = 0
        self._start_step, self._resume_from = 0, None
        self._pipe, self._position = None, (0, 0)  # the running iteration's pipeline, (epoch, next step)
        self.batches_run = 0        # pipeline steps run (read + augmented) over the loader's life
        self.batches_replayed = 0   # of those, steps run only to be dropped (resume without checkpoint)

    def _warn_uncommitted(self) -> None:
        """Tars without a manifest part (a crashed ingest, or a manifest part lost) are not read: say so."""
        orphans = []
        for m in self.modalities:
            # the manifest parts present (a folder listing: no file opened per shard)
            committed = {p.stem for p in manifest_dir(self.root, m).glob("*.parquet")}
            orphans += [f"{m}/{t.stem}" for t in sorted(shard_dir(self.root, m).glob("*.tar"))
                        if t.stem not in committed]
        if orphans:
            warnings.warn(f"{self.root}: {len(orphans)} shard tar(s) without a manifest part are not read "
                          f"(uncommitted, or the manifest part is lost), e.g. {orphans[0]}; "
                          f"see `python -m shards verify {self.root}`", stacklevel=3)

    def _check_shards(self, modality: str, tars: list[str]) -> None:
        for tar in tars:
            if tar in self._checked:
                continue
            problem = check_tar(self.root, modality, Path(tar).stem)
            if problem:
                raise DamagedShardError(problem)
            self._checked.add(tar)

    def _check_stats(self, stats: dict) -> dict:
        missing = [m for m in self.modalities if m not in stats["modalities"]]
        if missing:
            raise ValueError(f"stats/energy.json has no entry for {missing}: rerun "
                             f"`python -m augment_dali.stats {self.root}`")
        if [float(s) for s in stats["sigmas"]] != [float(s) for s in self.config.sigmas]:
            raise ValueError(f"stats/energy.json was measured with sigmas {stats['sigmas']}, the pipeline uses "
                             f"{list(self.config.sigmas)}: rerun `python -m augment_dali.stats {self.root}`")
        if list(stats["rescale"]["size_range"]) != list(self.config.size_range):
            warnings.warn(f"stats/energy.json was measured at sizes {stats['rescale']['size_range']}, the pipeline "
                          f"rescales to {list(self.config.size_range)}: band energies depend on image size")
        measured_depth = stats["rescale"].get("depth_range")
        if self.volumes and measured_depth is not None and list(measured_depth) != list(self.config.depth_range):
            warnings.warn(f"stats/energy.json was measured at depths {measured_depth}, the pipeline rescales to "
                          f"{list(self.config.depth_range)}: band energies depend on volume size")
        for m in self.modalities:
            method = self.config.normalize.method_for(m, self.units[m])
            if stats["modalities"][m].get("method", method) != method:
                raise ValueError(f"stats/energy.json measured {m} after {stats['modalities'][m]['method']} "
                                 f"normalisation, its {self.units[m] or 'unrecorded'} pixels get {method}: rerun "
                                 f"`python -m augment_dali.stats {self.root}`")
        return stats

    @property
    def normalisation(self) -> dict:
        """Per modality, what the pipeline does to its pixels (augment_dali.normalize.normalisation_record)."""
        return {m: normalisation_record(m, self.units[m], self.config.normalize) for m in self.modalities}

    def __len__(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int, start_step: int = 0, checkpoint: bytes | None = None) -> None:
        """The next iteration is epoch `epoch` from step `start_step`; `checkpoint` (from `checkpoint()`
        after `start_step` steps of that epoch) lets it start there without running the earlier steps."""
        if not 0 <= start_step < self._steps:
            raise ValueError(f"start_step={start_step} outside [0, {self._steps})")
        pipeline_state = None
        if checkpoint is not None:
            header, _, pipeline_state = bytes(checkpoint).partition(b"\n")
            try:
                taken = json.loads(header)
            except ValueError:
                raise ValueError("not a SwavLoader checkpoint (no header)") from None
            wanted = self._header(int(epoch), int(start_step))
            if taken != wanted:
                diff = {k: (taken.get(k), v) for k, v in wanted.items() if taken.get(k) != v}
                raise ValueError(f"checkpoint does not match this loader and position (taken, wanted): {diff}")
        self.epoch, self._start_step, self._resume_from = int(epoch), int(start_step), pipeline_state

    def _header(self, epoch: int, step: int) -> dict:
        """What a checkpoint is valid for: the position, and everything that shapes the pipeline."""
        shape = repr((self.modalities, self.batch_size, self.device, sorted(self.samples_per_modality.items()),
                      [(s.name, s.selected) for m in self.modalities for s in self._planners[m].shards],
                      self._planners[self.modalities[0]].split, self._steps, dataclasses.asdict(self.config),
                      self.stats["modalities"]))
        return {"epoch": epoch, "step": step, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "pipeline": hashlib.blake2b(shape.encode(), digest_size=8).hexdigest()}

    def checkpoint(self) -> bytes:
        """The running iteration's position after its last yielded step (see the module docstring):
        a one-line JSON header saying what it is valid for, then DALI's pipeline checkpoint."""
        if self._pipe is None:
            raise RuntimeError("checkpoint() needs an iteration in progress")
        epoch, step = self._position
        if step >= self._steps:
            raise RuntimeError(f"epoch {epoch} is over: nothing to resume (start the next epoch)")
        return json.dumps(self._header(epoch, step)).encode() + b"\n" + self._pipe.checkpoint()

    def _pipeline(self, epoch: int, checkpoint: bytes | None = None):
        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="medswav-index-"))
            for planner in self._planners.values():
                planner.cache_dir = self._cache
        branches = []
        for m in self.modalities:
            try:
                files = self._planners[m].files(self.seed, epoch, self.rank, self.world_size)
            except FileNotFoundError as e:  # a shard's index file vanished after the loader was made
                raise DamagedShardError(f"{m}: {e.filename or e}: missing") from None
            if self.verify_shards:
                self._check_shards(m, files.tars)
            s = self.stats["modalities"][m]
            branches.append(Branch(
                modality=m, tars=files.tars, indices=files.indices, energy_mean=s["mean"], energy_std=s["std"],
                read_labels=bool(self.label_names), reader_seed=_derive_seed("reader", self.seed, epoch, self.rank, m),
                initial_fill=max(1, min(self.initial_fill, files.samples)), with_keys=self.with_keys,
                units=self.units[m], volumes=self.volumes))
        return build_pipeline(branches, self.per_modality, self.config, self.device, self.device_id,
                              self.num_threads, _derive_seed("pipe", self.seed, epoch, self.rank), self.prefetch,
                              checkpoint=checkpoint)

    def __iter__(self):
        import torch

        epoch, start, resume_from = self.epoch, self._start_step, self._resume_from
        self.epoch, self._start_step, self._resume_from = epoch + 1, 0, None
        try:
            pipe, names = self._pipeline(epoch, resume_from)
        except RuntimeError as e:  # DALI refuses the state (e.g. saved by another DALI version): replay
            if resume_from is None:
                raise
            warnings.warn(f"cannot restore the pipeline of epoch {epoch} at step {start} "
                          f"({str(e).splitlines()[0]}); replaying {start} steps")
            resume_from = None
            pipe, names = self._pipeline(epoch)
        where = {name: i for i, name in enumerate(names)}
        groups = range(len(self.config.crop_sizes))
        n_labels = len(self.label_names)
        modality = torch.arange(len(self.modalities)).repeat_interleave(self.per_modality)
        self._pipe, self._position = pipe, (epoch, start)
        try:
            for i in range(start if resume_from is not None else 0, self._steps):
                outs = pipe.run()
                self.batches_run += 1
                if i < start:
                    self.batches_replayed += 1
                    continue
                self._position = (epoch, i + 1)
                crops = [self._gather_group(outs, where, g).unsqueeze(2) for g in groups]
                if n_labels:
                    label = np.concatenate([_labels_from_raw(outs[where[m, "labels"]], n_labels)
                                            for m in self.modalities])
                else:
                    label = np.zeros((self.batch_size, 0), np.float32)
                label = torch.from_numpy(label)
                step = {"crops": crops, "modality": modality.clone(), "label": label,
                        "labelled": torch.isfinite(label).any(dim=1)}
                if self.with_keys:
                    step["key"] = [k for m in self.modalities for k in _keys(outs[where[m, "source"]])]
                yield step
        finally:
            self._pipe = None
            del pipe

    def _gather_group(self, outs, where, g: int):
        """Crop group g of every modality, copied once into one [B, n_g, s_g, s_g] tensor (modality-major;
        [B, n_g, d_g, s_g, s_g] for volumes)."""
        import torch

        per = self.per_modality
        shape = outs[where[self.modalities[0], f"crops{g}"]].as_tensor().shape()
        if self.device_id is None:
            out = torch.empty([self.batch_size, *shape[1:]], dtype=torch.float32, pin_memory=self.pin_memory)
        else:
            out = torch.empty([self.batch_size, *shape[1:]], dtype=torch.float32,
                              device=torch.device("cuda", self.device_id))
        for k, m in enumerate(self.modalities):
            _copy_into(outs[where[m, f"crops{g}"]], out[k * per:(k + 1) * per], self.device_id)
        return out

    def close(self) -> None:
        """Remove the derived index files (the loader's own temporary folder); safe to call twice."""
        if self._own_cache and self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
