"""Fine-tuning and linear probing of an encoder on a labelled task, with model selection by validation AUC."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .data import Split


@dataclass
class FitConfig:
    mode: str = "finetune"        # finetune: end to end; linear: linear probe on frozen features
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None       # default: 3e-3 fine-tuning, 1e-2 linear probe (AdamW)
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"


@dataclass
class FitResult:
    val_curve: list[float] = field(default_factory=list)  # validation AUC after each epoch
    best_epoch: int = 0                                    # 1-based
    model: nn.Module | None = None                         # the selected (best validation AUC) model


def build_encoder(arch: str, pretrained: str | Path | None, seed: int = 0) -> nn.Module:
    """A fresh encoder of `arch`, initialised from an exported backbone file (`python -m train.export`) when
    given, else randomly from `seed` (so that a random-init run is as reproducible as a pretrained one)."""
    from train.export import load_backbone
    from train.models import build_encoder as _build

    if pretrained:
        return load_backbone(pretrained, arch)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        return _build(arch)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_outputs: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, n_outputs)
        # Feature standardisation (set by the linear probe; identity otherwise).
        self.register_buffer("feature_mean", torch.zeros(encoder.num_features))
        self.register_buffer("feature_std", torch.ones(encoder.num_features))

    def classify(self, features):
        return self.head((features - self.feature_mean) / self.feature_std)

    def forward(self, x):
        return self.classify(self.encoder(x))


def _loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    if task == "multiclass":
        return F.cross_entropy(logits, y.long())
    known = torch.isfinite(y)
    return F.binary_cross_entropy_with_logits(logits[known], y[known].float())


def scores_from_logits(logits: torch.Tensor, task: str) -> np.ndarray:
    if task == "binary":
        return torch.sigmoid(logits[:, 0]).numpy()
    if task == "multiclass":
        return torch.softmax(logits, 1).numpy()
    return torch.sigmoid(logits).numpy()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, task: str, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    model.eval()
    logits = torch.cat([model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])
    return scores_from_logits(logits, task)


def _check_subset(labels: np.ndarray, task: str) -> None:
    if task in ("binary", "multiclass") and len(np.unique(labels)) < 2:
        raise ValueError("the training subset holds a single class: use a larger label fraction")


def fit(encoder: nn.Module, n_outputs: int, task: str, train: Split, val: Split, cfg: FitConfig) -> FitResult:
    """Train a head (and, in finetune mode, the encoder) and keep the epoch with the best validation AUC."""
    _check_subset(train.labels, task)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = Classifier(encoder, n_outputs).to(cfg.device)
    x_train, y_train = train.images, torch.as_tensor(train.labels)
    if cfg.mode == "linear":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        params, lr = model.head.parameters(), cfg.lr or 1e-2
        # Frozen encoder: features once, then only the head trains.
        feats = _features(model.encoder, x_train, cfg)
        val_feats = _features(model.encoder, val.images, cfg)
        # Standardised features make one learning rate fit any backbone's feature scale.
        model.feature_mean.copy_(feats.mean(0))
        model.feature_std.copy_(feats.std(0) + 1e-6)
    elif cfg.mode == "finetune":
        params, lr = model.parameters(), cfg.lr or 3e-3
    else:
        raise ValueError(f"unknown mode {cfg.mode!r}: finetune or linear")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    result = FitResult()
    best_auc, best_state = -np.inf, None
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        model.train(cfg.mode == "finetune")
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if cfg.mode == "finetune" and len(idx) < 2:
                continue  # BatchNorm needs two samples
            if cfg.mode == "linear":
                logits = model.classify(feats[idx])
            else:
                logits = model(x_train[idx].to(cfg.device))
            loss = _loss(logits, y_train[idx].to(cfg.device), task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cfg.mode == "linear":
            with torch.no_grad():
                val_scores = scores_from_logits(model.classify(val_feats).cpu(), task)
        else:
            val_scores = predict(model, val.images, task, device=cfg.device)
        val_auc = metrics.auc(val.labels, val_scores, task)
        result.val_curve.append(float(val_auc))
        if val_auc > best_auc:
            best_auc, best_state, result.best_epoch = val_auc, copy.deepcopy(model.state_dict()), epoch + 1
    if best_state is not None:
        model.load_state_dict(best_state)
    result.model = model.eval()
    return result


@torch.no_grad()
def _features(encoder: nn.Module, images: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(images[i : i + 512].to(cfg.device)) for i in range(0, len(images), 512)])
