"""The three protocols of the paper's evaluation, each comparing a pretrained and a randomly initialised
encoder on the same labelled data: label efficiency, convergence and robustness."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import convergence, metrics, robustness
from .data import LabelledData, Split
from .finetune import FitConfig, build_encoder, fit, predict
from .subsets import stratified_nested_subsets

INITS = ("pretrained", "random")


@dataclass
class ProtocolConfig:
    arch: str = "resnet18"
    mode: str = "finetune"
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.01)
    repeats: int = 5
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    seed: int = 0
    n_boot: int = 1000
    n_images: int = 50
    n_transforms: int = 50
    train_fraction: float = 1.0   # convergence and robustness: stratified share of the training labels
    device: str = "cpu"


def _fit_config(cfg: ProtocolConfig, seed: int) -> FitConfig:
    return FitConfig(mode=cfg.mode, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, device=cfg.device)


def _stratify_on(labels: np.ndarray) -> np.ndarray:
    return labels if labels.ndim == 1 else np.nan_to_num(labels[:, 0]).astype(int)


def _subset(split: Split, idx: np.ndarray) -> Split:
    return Split(split.images[idx], split.labels[idx])


def _mean_auc_ci(labels, score_sets, task, n_boot, seed) -> metrics.Interval:
    """Bootstrap over test cases of the mean AUC across repeats (all repeats see the same resample)."""
    stacked = np.stack(score_sets, axis=1)  # [N, R, ...]

    def mean_auc(y, s):
        return float(np.nanmean([metrics.auc(y, s[:, r], task) for r in range(s.shape[1])]))

    return metrics.bootstrap_ci(mean_auc, labels, stacked, n_boot=n_boot, seed=seed)


def label_efficiency(data: LabelledData, pretrained: str, cfg: ProtocolConfig, log=print) -> dict:
    test = data["test"]
    runs = {init: {f: [] for f in cfg.fractions} for init in INITS}
    for r in range(cfg.repeats):
        subsets = stratified_nested_subsets(_stratify_on(data["train"].labels), cfg.fractions, seed=cfg.seed + r)
        for f in cfg.fractions:
            train = _subset(data["train"], subsets[f])
            for init in INITS:
                start = time.time()
                encoder = build_encoder(cfg.arch, pretrained if init == "pretrained" else None, seed=cfg.seed + r)
                result = fit(encoder, data.n_outputs, data.task, train, data["val"], _fit_config(cfg, cfg.seed + r))
                scores = predict(result.model, test.images, data.task, device=cfg.device)
                auc = metrics.auc(test.labels, scores, data.task)
                runs[init][f].append({"repeat": r, "n_train": len(train.labels), "test_auc": auc,
                                      "best_epoch": result.best_epoch, "scores": scores})
                log(f"label-efficiency  {f:>6.0%}  repeat {r}  {init:<10}  n={len(train.labels):>5}  "
                    f"test AUC {auc:.3f}  ({time.time() - start:.0f} s)")
    settings = []
    for f in cfg.fractions:
        row = {"fraction": f}
        for init in INITS:
            aucs = [run["test_auc"] for run in runs[init][f]]
            ci = _mean_auc_ci(test.labels, [run["scores"] for run in runs[init][f]], data.task, cfg.n_boot, cfg.seed)
            row[init] = {"mean": float(np.mean(aucs)), "std": float(np.std(aucs)), "ci_low": ci.low, "ci_high": ci.high,
                         "n_train": runs[init][f][0]["n_train"],
                         "repeats": [{k: v for k, v in run.items() if k != "scores"} for run in runs[init][f]]}
        settings.append(row)
    return {"protocol": "label-efficiency", "settings": settings}


def convergence_protocol(data: LabelledData, pretrained: str, cfg: ProtocolConfig, log=print) -> dict:
    """Both initialisations trained on the same `train_fraction` of the labels; returns (result, models)."""
    out = {"protocol": "convergence", "fraction_of_best": 0.98, "train_fraction": cfg.train_fraction, "runs": {}}
    train = data["train"]
    if cfg.train_fraction < 1.0:
        idx = stratified_nested_subsets(_stratify_on(train.labels), [cfg.train_fraction], seed=cfg.seed)[cfg.train_fraction]
        train = _subset(train, idx)
    models = {}
    for init in INITS:
        curves, epochs = [], []
        for r in range(cfg.repeats):
            encoder = build_encoder(cfg.arch, pretrained if init == "pretrained" else None, seed=cfg.seed + r)
            result = fit(encoder, data.n_outputs, data.task, train, data["val"], _fit_config(cfg, cfg.seed + r))
            curves.append(result.val_curve)
            epochs.append(convergence.epochs_to_fraction_of_best(result.val_curve, 0.98))
            models.setdefault(init, result.model)
            log(f"convergence  {init:<10}  repeat {r}  best val AUC {max(result.val_curve):.3f}  "
                f"98% of best at epoch {epochs[-1]}")
        out["runs"][init] = {"val_auc_per_epoch": curves, "epochs_to_98": epochs, "mean_epochs_to_98": float(np.mean(epochs))}
    out["speedup"] = convergence.speedup(out["runs"]["pretrained"]["mean_epochs_to_98"], out["runs"]["random"]["mean_epochs_to_98"])
    return out, models


def robustness_protocol(data: LabelledData, models: dict, cfg: ProtocolConfig, log=print) -> dict:
    if data.task != "binary":
        raise ValueError("the robustness protocol measures a positive-class probability: binary tasks only")
    rcfg = robustness.RobustnessConfig(n_images=cfg.n_images, n_transforms=cfg.n_transforms, seed=cfg.seed)
    out = {"protocol": "robustness", "settings": asdict(rcfg), "runs": {}}
    for init, model in models.items():
        def proba(x, model=model):
            return torch.from_numpy(predict(model, x, "binary", device=cfg.device))

        changes = robustness.robustness_changes(proba, data["test"].images, rcfg)
        out["runs"][init] = {"median": float(np.median(changes)), "mean": float(changes.mean()),
                             "q25": float(np.quantile(changes, 0.25)), "q75": float(np.quantile(changes, 0.75)),
                             "per_image_mean": changes.mean(1).tolist()}
        log(f"robustness  {init:<10}  median relative change {out['runs'][init]['median']:.3f}")
    return out
