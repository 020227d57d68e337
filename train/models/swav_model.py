"""Encoder + projection head + per-modality prototypes (+ optional supervised head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import build_encoder


class ProjectionHead(nn.Module):
    """MLP num_features -> hidden -> hidden -> feat_dim with BN+ReLU, as SwAV's 2048-2048-128."""

    def __init__(self, num_features: int, hidden_dim: int, feat_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, feat_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=1)


class SwAVModel(nn.Module):
    """Multi-crop forward: one backbone pass per crop resolution, features regrouped per view.

    ``forward(crops)`` takes the loader's ``crops`` (list of [B, n_g, 1, s_g, s_g]) and returns
      z:       [V, B, F] L2-normalised features, V = sum(n_g) views (views 0, 1 = assigned crops)
      scores:  list over modalities m of [V, B/M, K] = z_m . C_m^T, rows of modality m only
      sup_logits: [A, B, L] supervised head on the backbone features of the A assigned views, or None
    Batch rows are ordered by modality in M equal blocks (INTERFACES section 3).
    """

    def __init__(self, arch: str, num_modalities: int, num_prototypes: int, feat_dim: int = 128,
                 hidden_dim: int = 0, num_labels: int = 0, assigned_views: int = 2):
        super().__init__()
        self.backbone = build_encoder(arch)
        nf = self.backbone.num_features
        # "sizes follow the width": 2048 for ResNet-50, 2048*w for ResNet-50wN, 512 for ResNet-18.
        self.projection = ProjectionHead(nf, hidden_dim or nf, feat_dim)
        self.prototypes = nn.ModuleList(nn.Linear(feat_dim, num_prototypes, bias=False)
                                        for _ in range(num_modalities))
        self.sup_head = nn.Linear(nf, num_labels) if num_labels > 0 else None
        self.num_modalities = num_modalities
        self.assigned_views = assigned_views
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        for proto in self.prototypes:
            proto.weight.copy_(F.normalize(proto.weight, dim=1))

    def forward(self, crops: list[torch.Tensor]):
        batch = crops[0].shape[0]
        feats = []
        for group in crops:  # [B, n, 1, s, s] -> view-major [n*B, 1, s, s]: one pass per resolution
            n = group.shape[1]
            feats.append(self.backbone(group.transpose(0, 1).reshape(n * batch, *group.shape[2:])))
        h = torch.cat(feats)                                   # [V*B, nf], view-major
        z = self.projection(h).view(-1, batch, self.projection.net[-1].out_features)

        # Prototype scores in fp32 even under autocast: they feed exp(score/eps) and log-softmax(score/tau).
        b = batch // self.num_modalities
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            scores = [zf[:, m * b:(m + 1) * b] @ proto.weight.float().t()
                      for m, proto in enumerate(self.prototypes)]

        sup_logits = None
        if self.sup_head is not None:
            a = self.assigned_views
            sup_logits = self.sup_head(h[: a * batch]).view(a, batch, -1)
        return {"h": h, "z": z, "scores": scores, "sup_logits": sup_logits}
