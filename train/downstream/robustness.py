"""Robustness: relative change of the predicted probability when test images are transformed.

Transforms follow the paper: gamma with gamma ~ U[1.8, 2.6] on intensities in [0, 1], a random rotation
and a random isotropic scaling (both by an affine resampling that keeps the image size). Each of
`n_images` test images gets `n_transforms` random transforms; the statistic per pair is
|p(T(x)) - p(x)| / p(x), p being the probability of the class predicted for the original image
(max(q, 1 - q) for a positive-class probability q). Dividing by the positive-class probability itself
would let confidently negative images (q near 0) dominate with arbitrarily large ratios; the predicted
class's probability is at least 0.5, so the statistic lies in [0, 1].
Volumes ([N, 1, D, H, W]): the same gamma, the rotation about the depth axis (in the rows/cols plane)
and the isotropic scaling along all three axes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RobustnessConfig:
    n_images: int = 50
    n_transforms: int = 50
    gamma: tuple[float, float] = (1.8, 2.6)
    max_rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    seed: int = 0


def relative_change(p_original, p_transformed, eps: float = 1e-6) -> np.ndarray:
    p0 = np.asarray(p_original, dtype=np.float64)
    pt = np.asarray(p_transformed, dtype=np.float64)
    return np.abs(pt - p0) / np.maximum(p0, eps)


def random_transform(images: torch.Tensor, generator: torch.Generator, cfg: RobustnessConfig) -> torch.Tensor:
    """images: [N, 1, H, W] (or volumes [N, 1, D, H, W]) in [0, 1]. One independent transform per image."""
    n = images.shape[0]
    u = torch.rand(n, 3, generator=generator)
    gamma = cfg.gamma[0] + (cfg.gamma[1] - cfg.gamma[0]) * u[:, 0]
    angle = (2 * u[:, 1] - 1) * math.radians(cfg.max_rotation_deg)
    scale = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 2]
    out = images.clamp(0, 1) ** gamma.view(n, *[1] * (images.dim() - 1))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros(n)
    if images.dim() == 5:  # grid coordinates (x, y, z) = (cols, rows, depth): rotate x-y, scale all three
        theta = torch.stack([torch.stack([cos, -sin, zero, zero], 1), torch.stack([sin, cos, zero, zero], 1),
                             torch.stack([zero, zero, 1 / scale, zero], 1)], 1)
    else:
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    return F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def robustness_changes(predict_proba, images: torch.Tensor, cfg: RobustnessConfig) -> np.ndarray:
    """[n_images, n_transforms] relative changes of the predicted class's probability;
    `predict_proba(images) -> [N]` gives the positive-class probability."""
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(images.shape[0], generator=g)[: cfg.n_images]
    x = images[pick]
    q0 = predict_proba(x).cpu().numpy().astype(np.float64)
    positive = q0 >= 0.5
    p0 = np.where(positive, q0, 1 - q0)
    changes = np.empty((len(pick), cfg.n_transforms))
    for t in range(cfg.n_transforms):
        qt = predict_proba(random_transform(x, g, cfg)).cpu().numpy().astype(np.float64)
        changes[:, t] = relative_change(p0, np.where(positive, qt, 1 - qt))
    return changes
