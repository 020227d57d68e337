"""Swapped prediction: Sinkhorn-Knopp codes, the feature queue and the multi-crop loss.

Everything here is exact to METHOD.md section 1-3 and runs in fp32 outside autocast.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.03, iterations: int = 3) -> torch.Tensor:
    """Codes Q [B, K] for prototype scores [B, K] (rows: this rank's samples), summed over all ranks.

    Equipartition is global: the total and the row (prototype) sums are all-reduced, so the codes
    equal those of one process holding the concatenated batch. The global maximum is subtracted
    before exp (a constant factor that the first normalisation removes), so exp never overflows
    even in fp32 with eps = 0.03. Each returned row sums to 1.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float() / eps
        peak = scores.max()
        if _dist_on():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        q = torch.exp(scores - peak).t()                   # [K, B]
        k = q.shape[0]
        b = q.shape[1] * (dist.get_world_size() if _dist_on() else 1)

        total = q.sum()
        if _dist_on():
            dist.all_reduce(total)
        q /= total
        for _ in range(iterations):
            rows = q.sum(dim=1, keepdim=True)              # per prototype, over the global batch
            if _dist_on():
                dist.all_reduce(rows)
            q /= rows
            q /= k
            q /= q.sum(dim=0, keepdim=True)                # per sample (local columns)
            q /= b
        q *= b
        return q.t()


class FeatureQueue:
    """FIFO of past features, one per modality and assigned crop (METHOD section 1, "Queue").

    Filling starts at ``start_epoch``; the queue takes part in the codes only once it is full.
    ``length`` is per process and per modality (a multiple of the per-modality sub-batch).
    """

    def __init__(self, num_modalities: int, num_assigned: int, length: int, feat_dim: int,
                 device: torch.device | str = "cpu"):
        self.features = torch.zeros(num_modalities, num_assigned, length, feat_dim, device=device)
        self.filled = torch.zeros(num_modalities, num_assigned, dtype=torch.long)

    @property
    def length(self) -> int:
        return self.features.shape[2]

    def full(self, m: int, a: int) -> bool:
        return int(self.filled[m, a]) >= self.length

    @torch.no_grad()
    def push(self, m: int, a: int, z: torch.Tensor) -> None:
        """Newest first: shift the queue down by len(z) and write z at the front (oldest drop out)."""
        n = z.shape[0]
        buf = self.features[m, a]
        buf[n:] = buf[:-n].clone()
        buf[:n] = z.detach().float()
        self.filled[m, a] = min(self.length, int(self.filled[m, a]) + n)

    def state_dict(self) -> dict:
        return {"features": self.features.cpu(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.features.copy_(state["features"])
        self.filled.copy_(state["filled"])


def swapped_prediction_loss(scores: torch.Tensor, z: torch.Tensor, prototypes: torch.Tensor, *,
                            temperature: float = 0.1, eps: float = 0.03, iterations: int = 3,
                            assigned: tuple[int, ...] = (0, 1), queue: FeatureQueue | None = None,
                            modality: int = 0, fill_queue: bool = False):
    """Multi-crop swapped-prediction loss of ONE modality's sub-batch.

    scores [V, b, K] (z . C^T, with gradient), z [V, b, F] (features, for the queue), prototypes
    [K, F] (the current bank, for scoring queued features). For each assigned view v the codes q_v
    come from Sinkhorn (over queue + batch when the queue is full; only the batch rows are used);
    the loss averages over views w != v the cross-entropy H(q_v, softmax(scores_w / tau)), then
    averages over the assigned views. Returns (loss, codes [A, b, K]).
    """
    views, b, _ = scores.shape
    loss = scores.new_zeros(())
    codes = []
    for i, v in enumerate(assigned):
        with torch.no_grad():
            s = scores[v].detach()
            if queue is not None and queue.full(modality, i):
                queued = queue.features[modality, i] @ prototypes.detach().float().t()
                s = torch.cat([queued, s])
            q = sinkhorn(s, eps, iterations)[-b:]
            if queue is not None and fill_queue:
                queue.push(modality, i, z[v])
        codes.append(q)
        sub = scores.new_zeros(())
        for w in range(views):
            if w != v:
                sub = sub - (q * F.log_softmax(scores[w].float() / temperature, dim=1)).sum(1).mean()
        loss = loss + sub / (views - 1)
    return loss / len(assigned), torch.stack(codes)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """L_sup over labelled entries only; logits [A, B, L] (one per assigned view), labels [B, L].

    bce: multi-label findings, NaN = unknown entries are masked out, mean over known entries.
    ce:  classes given one-hot (or as scores) in [B, L]; a row is labelled iff all entries are finite.
    With no labelled entry the loss is an exact 0 that still touches the head (keeps DDP's graph whole).
    """
    logits = logits.float()
    if kind == "bce":
        known = torch.isfinite(labels)
        target = torch.where(known, labels, torch.zeros_like(labels)).expand_as(logits)
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        mask = known.expand_as(logits).float()
        return (per * mask).sum() / mask.sum().clamp(min=1.0)
    if kind == "ce":
        known = torch.isfinite(labels).all(dim=1)
        target = torch.where(known, torch.nan_to_num(labels).argmax(dim=1), torch.zeros_like(known, dtype=torch.long))
        per = torch.stack([F.cross_entropy(lg, target, reduction="none") for lg in logits])
        mask = known.float().expand_as(per)
        return (per * mask).sum() / mask.sum().clamp(min=1.0)
    raise ValueError(f"unknown supervised loss {kind!r} (bce or ce)")


@torch.no_grad()
def code_stats(scores_assigned: torch.Tensor) -> dict[str, float]:
    """Collapse watch for one modality, from the assigned views' scores [A, b, K].

    code_entropy: entropy of the histogram of each sample's best prototype, divided by its maximum
      ln(min(K, n)): 1 = every sample picks a different prototype, 0 = collapse onto one.
    proto_usage: fraction of the min(K, n) possible prototypes that are some sample's best.
    """
    k = scores_assigned.shape[-1]
    best = scores_assigned.reshape(-1, k).argmax(dim=1)
    n = best.numel()
    hist = torch.bincount(best, minlength=k).float()
    p = hist[hist > 0] / n
    cap = min(k, n)
    entropy = max(0.0, float(-(p * p.log()).sum()) / math.log(cap)) if cap > 1 else 1.0
    return {"code_entropy": entropy, "proto_usage": float((hist > 0).sum()) / cap}


def modality_losses(scores: list[torch.Tensor], z: torch.Tensor, prototypes: list[torch.Tensor],
                    **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-modality swapped prediction (METHOD section 2): modality m's codes and loss come from its
    own rows (block m of the batch), its own prototypes and its own queue only.

    scores: list over m of [V, b, K]; z: [V, M*b, F]; prototypes: list over m of [K, F].
    Returns (losses, codes), one entry per modality; the objective is their sum.
    """
    b = scores[0].shape[1]
    losses, codes = [], []
    for m, (s, c) in enumerate(zip(scores, prototypes)):
        loss, q = swapped_prediction_loss(s, z[:, m * b:(m + 1) * b], c, modality=m, **kwargs)
        losses.append(loss)
        codes.append(q)
    return losses, codes
