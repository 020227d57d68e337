"""Swapped prediction: Sinkhorn-Knopp codes, the feature queue and the multi-crop loss.

Everything here is exact to METHOD.md section 1-3 and runs in fp32 outside autocast.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import MIN_EPSILON


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.03, iterations: int = 3,
             rows: int | None = None, inplace: bool = False) -> torch.Tensor:
    """Codes Q [B, K] for prototype scores [B, K] (rows: this rank's samples), over all ranks.

    Sinkhorn-Knopp on exp(scores / eps): alternately each prototype's mass is normalised to 1/K (sums
    all-reduced, so the equipartition holds over the global batch and two processes give the codes
    of one process on the concatenated batch) and each sample's to 1/B; finally every sample's code
    is scaled to sum to 1. ``rows``: return only the last ``rows`` rows (the batch after a queue).
    ``inplace``: an fp32 ``scores`` may be overwritten (saves a (queue + batch) x K buffer).

    Computed in scaling form, Q = diag(u) E diag(v) with E = exp(scores / eps - max): each iteration is
    two matrix-vector products over E instead of rewriting the matrix (the same arithmetic; a
    (queue + batch) x K problem costs a few reads of E). Subtracting the global max is a constant
    factor removed by the first normalisation (as is SwAV's first division by the total mass, skipped
    here); scores of normalised features lie in [-1, 1], so E >= exp(-2 / eps). That must stay a normal
    number, or a prototype far from every sample gets a column of zeros and 1 / 0 turns every code into
    NaN: fp32 holds it down to eps = 2 / 80 = 0.025 (METHOD's 0.03 and 0.05 run in fp32, whatever
    autocast says); a smaller eps (sharper codes, as the short demo uses) runs in float64, which holds
    down to eps ~ 0.003. The codes are returned in fp32 either way.
    """
    if eps < MIN_EPSILON:
        raise ValueError(f"Sinkhorn epsilon {eps} is below {MIN_EPSILON}: exp(-2 / eps) underflows even float64")
    work = torch.float32 if eps >= 2.0 / 80 else torch.float64
    with torch.autocast(device_type=scores.device.type, enabled=False):
        peak = scores.max().to(work)
        if _dist_on():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        e = scores if inplace and scores.dtype == work else scores.to(work, copy=True)
        e.sub_(peak).mul_(1.0 / eps).exp_()                 # [B, K]
        k = e.shape[1]
        b = e.shape[0] * (dist.get_world_size() if _dist_on() else 1)
        u = torch.ones(e.shape[0], device=e.device, dtype=work)   # per-sample scale
        v = torch.ones(k, device=e.device, dtype=work)            # per-prototype scale
        for _ in range(iterations):
            per_prototype = u @ e                           # [K], before its scale v
            if _dist_on():
                dist.all_reduce(per_prototype)
            v = 1.0 / (k * per_prototype)
            u = 1.0 / (b * (e @ v))
        if rows is not None:
            e, u = e[-rows:], u[-rows:]
        return ((u[:, None] * b) * e * v[None, :]).float()


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
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)   # every view's prediction, once
    loss = scores.new_zeros(())
    codes = []
    for i, v in enumerate(assigned):
        with torch.no_grad():
            if queue is not None and queue.full(modality, i):
                s = torch.empty(queue.length + b, scores.shape[2], device=scores.device)
                torch.mm(queue.features[modality, i], prototypes.detach().float().t(), out=s[:-b])
                s[-b:] = scores[v].detach()
            else:
                s = scores[v].detach().float().clone()
            q = sinkhorn(s, eps, iterations, rows=b, inplace=True)
            if queue is not None and fill_queue:
                queue.push(modality, i, z[v])
        codes.append(q)
        sub = scores.new_zeros(())
        for w in range(views):
            if w != v:
                sub = sub - (q * log_p[w]).sum(1).mean()
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
    # Counts of the prototypes in use, by sorting: deterministic on CUDA (unlike bincount's atomics).
    counts = torch.unique(best, return_counts=True)[1].float()
    p = counts / n
    cap = min(k, n)
    entropy = max(0.0, float(-(p * p.log()).sum()) / math.log(cap)) if cap > 1 else 1.0
    return {"code_entropy": entropy, "proto_usage": counts.numel() / cap}


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
